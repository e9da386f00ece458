"""Tuning a list of shapes: run the real launchers on each, let the autotuners benchmark, keep it all.

Tool layer (triton_bn.tune), above the kernels. For each shape it builds an input of that
size, dtype and layout and calls the launchers the autograd Function calls
(``bn_forward_train``, ``bn_forward_eval``, ``bn_backward``), so the autotune keys are those
a training job produces. Running statistics are scratch buffers made here: no model's state
is read or written. The launchers run with the on-chip path off (``use_onchip(False)``): it is
not autotuned, and a shape whose slab fits on chip would otherwise tune nothing. The timings
are the autotuners' own (record.py).

Bandwidth counts the bytes each kernel moves per call (T = numel, e = element size;
per-channel vectors are noise), over the median time, as a % of a device-to-device copy
measured once with the same benchmarker. Under the interpreter the benchmarker runs each
candidate once and returns 0: the file says ``"measured": false`` and no GB/s is computed.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

from ..kernels import bn_backward, bn_forward_eval, bn_forward_train
from ..kernels.tuning import autotuned_kernels, do_bench, gpu_pruning, pinned, use_onchip
from . import machine
from .progress import Progress
from .record import Recorder
from .shapes import Shape
from .store import FORMAT, VERSION

EPS = 1e-5
OPS = ("forward", "eval", "backward")  # training forward, eval forward, training backward
OP_TEXT = {"forward": "training forward", "eval": "eval forward", "backward": "training backward"}

# Bytes each autotuned kernel moves per call, in units of T*e, by op where they differ. A
# kernel not listed (renamed or new) is tuned and recorded all the same, without GB/s.
KERNEL_TRAFFIC: Dict[str, Callable[[str], int]] = {
    "_bn_stats_partial_kernel": lambda op: 1,  # reads x
    "_bn_normalize_kernel": lambda op: 2,  # reads x, writes y
    "_bn_backward_partial_kernel": lambda op: 2,  # reads x, dy
    "_bn_backward_dx_kernel": lambda op: 3 if op == "backward" else 2,  # reads x (training), dy; writes dx
}


def kernel_bytes(name: str, op: str, shape: Shape) -> Optional[int]:
    units = KERNEL_TRAFFIC.get(name)
    return None if units is None else units(op) * shape.numel * torch.empty((), dtype=shape.dtype).element_size()


def copy_ceiling_gbps(device: torch.device, nbytes: int = 1 << 30) -> Optional[float]:
    """Bytes read + written per second by a large device-to-device copy (GB/s), timed with
    the library's benchmarker; None off the GPU, where the benchmarker measures nothing."""
    if not machine.on_gpu():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


class _Inputs:
    """x (of the shape's size, dtype and layout), dy, and the per-channel tensors a layer has."""

    def __init__(self, shape: Shape, device: torch.device):
        generator = torch.Generator(device=device).manual_seed(0)
        dims = shape.dims
        if shape.channels_last:  # allocate (N, *spatial, C), view as (N, C, *spatial)
            order = (0, *range(2, len(dims)), 1)
            base = torch.randn([dims[i] for i in order], dtype=shape.dtype, device=device, generator=generator)
            self.x = base.permute(0, len(dims) - 1, *range(1, len(dims) - 1))
        else:
            self.x = torch.randn(dims, dtype=shape.dtype, device=device, generator=generator)
        self.dy = torch.randn_like(self.x)  # same strides as x (dense tensor)
        C = dims[1]
        options = {"dtype": shape.param_dtype, "device": device}
        self.weight = torch.ones(C, **options) if shape.has_weight else None
        self.bias = torch.zeros(C, **options) if shape.has_bias else None
        self.running_mean, self.running_var = torch.zeros(C, **options), torch.ones(C, **options)  # scratch
        reduce = [d for d in range(len(dims)) if d != 1]
        acc = torch.float64 if shape.dtype == torch.float64 else torch.float32
        # the saved statistics the backward receives; computed by torch so that tuning the
        # backward alone does not tune the forward kernels too
        x = self.x.to(acc)
        self.mean = x.mean(reduce)
        self.invstd = torch.rsqrt(x.var(reduce, unbiased=False) + EPS)


@use_onchip(False)
def _run(op: str, t: _Inputs):
    if op == "forward":
        bn_forward_train(t.x, t.weight, t.bias, t.running_mean, t.running_var, 0.1, EPS)
    elif op == "eval":
        bn_forward_eval(t.x, t.weight, t.bias, t.running_mean, t.running_var, EPS)
    elif op == "backward":
        bn_backward(t.dy, t.x, t.weight, t.mean, t.invstd, EPS, training=True)
    else:
        raise ValueError(f"unknown op {op!r}: use {', '.join(OPS)}")


def header(command: Optional[str] = None) -> dict:
    """The file's description of this run: format, machine, date, whether times are measured."""
    here = machine.describe()
    data = {"format": FORMAT, "version": VERSION, "measured": machine.on_gpu(), "interpreter": here["interpreter"],
            "machine": here, "date": machine.utc_now(),
            "command": command or "triton_bn.tune.bench.tune()",
            "settings": {"pinned": pinned(), "gpu_pruning": gpu_pruning(),
                         "benchmarker": "triton_bn.kernels.tuning.do_bench"}}
    if here["interpreter"]:
        data["note"] = (f"{machine.NOT_A_MEASUREMENT}: made by the Triton CPU interpreter, whose benchmarker runs "
                        "each candidate once and returns 0 ms; wall_ms is one interpreted run. Never applied on a GPU.")
    return data


def tune(shapes: Sequence[Shape], ops: Iterable[str] = OPS, device: Optional[torch.device] = None,
         progress: Optional[Progress] = None, command: Optional[str] = None,
         on_shape: Optional[Callable[[dict, dict], None]] = None) -> dict:
    """Autotune every autotuned kernel on every shape and op; the tuning file's contents.

    ``on_shape(data, shape_record)`` is called after each shape (the CLI prints its table)."""
    ops = list(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}: use {', '.join(OPS)}")
    device = device or torch.device("cuda" if machine.on_gpu() else "cpu")
    data = header(command)
    data["copy_gbps"] = copy_ceiling_gbps(device)
    data["ops"] = ops
    data["shapes"] = []
    current = {"shape": None, "op": None}

    def bytes_of(name):
        return kernel_bytes(name, current["op"], current["shape"])

    recorder = Recorder(autotuned_kernels(), bytes_of, progress)
    data["entries"] = recorder.entries
    with recorder.attached():
        for shape in shapes:
            current["shape"] = shape
            recorder.used = []
            inputs = _Inputs(shape, device)
            for op in ops:
                current["op"] = op
                # torch refuses training with one value per channel; so do the callers of these launchers
                skip = op != "eval" and shape.numel == shape.dims[1]
                if progress is not None:
                    progress.step(f"{shape.label()} {op}" + (" (skipped: one value per channel)" if skip else ""))
                if not skip:
                    _run(op, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record = {**shape.to_json(), "ops": ops, "entries": list(recorder.used)}
            data["shapes"].append(record)
            if on_shape is not None:
                on_shape(data, record)
    return data
