"""What to compile: the launches the library really makes, for representative shapes.

The launchers run on ``meta`` tensors (no memory, no kernel) with every kernel of
``triton_bn.kernels`` swapped for a recorder, so each recorded launch carries the launcher's
own argument order, ints and constexprs. Arguments are then specialized as Triton's JIT does
it (``_specialize``), and the launch is paired with every config it can run with: all of an
autotuned kernel's configs (``kept`` marks those the pruning keeps for the shape), or the
fixed launch config of a kernel that is not autotuned.

Assumptions, stated once: tensor pointers are 16-byte aligned (PyTorch's allocator aligns
to 512 bytes; the pruning targets 16-byte-aligned inputs); the statistics split is the one
an H200 (132 SMs) gets.

The representative shapes take the split path (its scenarios run with ``use_onchip(False)``);
the on-chip kernels (kernels/onchip.py) are recorded on a slab of the same layout and dtype
at the on-chip bound (``onchip_slab``: ONCHIP_MAX_ELEMENTS padded elements per program, 16
warps), plain and with the heaviest epilogue (leaky_relu, residual; backward from the output
with dresidual: four tiles live), the latter as variant "train-fused".
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import pkgutil
from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

# Representative shapes: a ResNet-50 stage-1 batch norm, (N, C, H, W) = (32, 64, 56, 56).
# NCHW: K = S = 3136 (a multiple of 16), strides (C*S, S, 1). NHWC: K = C = 64, Q = S,
# strides (S*C, C, 1). NC: BatchNorm1d's 2-D input, channels-last with Q = 1.
LAYOUTS = {
    "NCHW": lambda dtype: torch.empty((32, 64, 56, 56), dtype=dtype, device="meta"),
    "NHWC": lambda dtype: torch.empty((32, 64, 56, 56), dtype=dtype, device="meta")
    .to(memory_format=torch.channels_last),
    "NC": lambda dtype: torch.empty((256, 1024), dtype=dtype, device="meta"),
}
# Rows the 2-D tile cannot vectorize (K % 16 != 0): the elementwise kernels walk them flat
# (tuning.flat_walk). ResNet-50's 7x7 and 14x14 stages (NCHW, K = S = 49, 196) and a network's
# 3-channel input (channels-last, K = C = 3).
LAYOUTS.update({
    "NCHW-S49": lambda dtype: torch.empty((32, 2048, 7, 7), dtype=dtype, device="meta"),
    "NCHW-S196": lambda dtype: torch.empty((32, 1024, 14, 14), dtype=dtype, device="meta"),
    "NHWC-C3": lambda dtype: torch.empty((32, 3, 224, 224), dtype=dtype, device="meta")
    .to(memory_format=torch.channels_last),
})
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
H200_SMS = 132

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                    torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                    torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """One (kernel specialization, config, arch) to compile; plain data, JSON-able."""
    kernel: str  # "module:attribute" of the launched kernel object
    name: str  # short label, e.g. "normalize"
    variant: str  # "train" / "eval" / "sync" (SyncBatchNorm's partials alone, then its combine)
    dtype: str
    layout: str
    signature: Tuple[Tuple[str, str], ...]  # (param, triton type or "constexpr"), in order
    constexprs: Tuple[Tuple[str, Any], ...]  # tl dtypes encoded as ("tl", "fp32")
    divisible: Tuple[str, ...]  # params with tt.divisibility=16
    config: Tuple[Tuple[str, Any], ...]  # BLOCK_* constexprs of the config
    num_warps: int
    num_stages: int
    autotuned: bool
    kept: bool  # the autotuner's pruning keeps this config for this shape on a GPU
    arch: int
    options: Tuple[Tuple[str, Any], ...] = ()  # other launch options (the cooperative kernels': maxnreg, ...)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CompileJob":
        def frozen(v):  # JSON turned the tuples into lists
            return tuple(map(frozen, v)) if isinstance(v, list) else v
        return cls(**{k: frozen(v) for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def config_label(self) -> str:
        return ",".join([f"{k}={v}" for k, v in self.config] + [f"w{self.num_warps}"])


@dataclasses.dataclass
class _Launch:
    kernel: Any
    qualname: str
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, qualname, sink):
        self.kernel, self.qualname, self.sink = kernel, qualname, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(_Launch(self.kernel, self.qualname, args, kwargs))


def _python_fn(kernel):
    inner = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    return inner.fn


def _is_launchable_kernel(name: str, obj) -> bool:
    if isinstance(obj, triton.runtime.Autotuner):
        return True
    return name.endswith("_kernel") and callable(getattr(obj, "__getitem__", None)) and hasattr(obj, "fn")


def _kernel_modules():
    import triton_bn.kernels as package
    return [importlib.import_module(f"{package.__name__}.{m.name}")
            for m in pkgutil.iter_modules(package.__path__)]


@contextlib.contextmanager
def _recording(sink: list):
    """Every module global that is a kernel becomes a recorder; the statistics split is an
    H200's; the tuning rules are the GPU's (not the interpreter's, not pinned)."""
    from triton_bn.kernels import launch, tuning
    saved, saved_env = [], {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_BN_PIN_CONFIG")}
    try:
        for module in _kernel_modules():
            for name, obj in list(vars(module).items()):
                if _is_launchable_kernel(name, obj):
                    fn = _python_fn(obj)
                    saved.append((module, name, obj))
                    setattr(module, name, _Recorder(obj, f"{fn.__module__}:{fn.__name__}", sink))
        for kernel_launch in launch.all_launches():  # the launchers call kernels through these
            fn = _python_fn(kernel_launch.fn)
            saved += [(kernel_launch, "fn", kernel_launch.fn), (kernel_launch, "direct", kernel_launch.direct)]
            kernel_launch.fn = _Recorder(kernel_launch.fn, f"{fn.__module__}:{fn.__name__}", sink)
            kernel_launch.direct = False
        # The GPU's tuning rules, not the interpreter's (tuning reads the flag once, at import).
        saved += [(tuning, "_INTERPRETING", tuning._INTERPRETING), (tuning, "_CPU_KERNELS", tuning._CPU_KERNELS)]
        tuning._INTERPRETING = False
        saved.append((tuning, "_target_programs", tuning._target_programs))
        tuning._target_programs = lambda device: tuning.gpu_target_programs(H200_SMS)
        os.environ.update(TRITON_INTERPRET="0", TRITON_BN_PIN_CONFIG="0")
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Compile options a launch may pass besides num_warps/num_stages (the cooperative kernels').
LAUNCH_OPTIONS = ("maxnreg", "launch_cooperative_grid")


def _scenarios(x: torch.Tensor, dispatched: bool = False, cooperative: bool = False, masked: bool = False):
    """(variant, thunk) for each way the library launches kernels on x (the split path), then
    the on-chip kernels' launches on ``onchip_slab(x)``. ``dispatched``: the launches on x
    alone, on whichever path the launchers pick under the current on-chip switch (the
    ResNet-50 sweep records each shape with the switch off and on). ``masked``: the training
    launches with a mask too (variant "train-masked"; masked batch norm, docs/masked.md)."""
    from triton_bn.kernels import (bn_backward, bn_forward_eval, bn_forward_train, bn_stats_combine,
                                   bn_stats_partial, input_view)
    from triton_bn.kernels.tuning import use_onchip
    C = x.shape[1]
    vec = lambda: torch.empty(C, dtype=torch.float32, device=x.device)  # noqa: E731
    dy = torch.empty_like(x)
    split = (lambda thunk: thunk) if dispatched else (lambda thunk: lambda: _call_with(use_onchip(False), thunk))
    slab = onchip_slab(x)
    slab_dy, slab_r = torch.empty_like(slab), torch.empty_like(slab)
    svec = lambda: torch.empty(slab.shape[1], dtype=torch.float32, device=x.device)  # noqa: E731
    leaky = dict(activation=2, residual=slab_r)
    on_x = [
        ("train", split(lambda: bn_forward_train(x, vec(), vec(), vec(), vec(), 0.1, 1e-5))),
        # SyncBatchNorm: partials alone, then the combine kernel over every rank's moments
        # (its own variant: the partial kernel without the fused combine is another binary).
        ("sync", lambda: bn_stats_combine(bn_stats_partial(input_view(x)), 1e-5, vec(), vec())),
        ("eval", lambda: bn_forward_eval(x, vec(), vec(), vec(), vec(), 1e-5)),
        ("train", split(lambda: bn_backward(dy, x, vec(), vec(), vec(), 1e-5, training=True))),
        ("eval", split(lambda: bn_backward(dy, x, vec(), vec(), vec(), 1e-5, training=False))),
    ]
    if masked:
        on_x += _masked_scenarios(x, split)
    if dispatched:
        return on_x
    return on_x + (_cooperative_scenarios(x, masked) if cooperative else []) + \
        (_masked_scenarios(slab, lambda thunk: thunk) if masked else []) + [
        ("train", lambda: bn_forward_train(slab, svec(), svec(), svec(), svec(), 0.1, 1e-5)),
        ("train-fused", lambda: bn_forward_train(slab, svec(), svec(), svec(), svec(), 0.1, 1e-5, **leaky)),
        ("train", lambda: bn_backward(slab_dy, slab, svec(), svec(), svec(), 1e-5, training=True)),
        ("train-fused", lambda: bn_backward(slab_dy, slab, svec(), svec(), svec(), 1e-5, True, (True,) * 4,
                                            bias=svec(), from_output=True, **leaky)),
        ("eval", lambda: bn_backward(slab_dy, slab, svec(), svec(), svec(), 1e-5, training=False)),
    ]


def _masked_scenarios(x: torch.Tensor, path):
    """Forward-train and backward on x with a mask of x's positions (N, *spatial), through
    ``path`` (the split path's context, or none: whatever the launchers dispatch to)."""
    from triton_bn.kernels import bn_backward, bn_forward_train
    mask = torch.empty((x.shape[0], *x.shape[2:]), dtype=torch.bool, device=x.device)
    vec = lambda: torch.empty(x.shape[1], dtype=torch.float32, device=x.device)  # noqa: E731
    dy = torch.empty_like(x)
    return [
        ("train-masked", path(lambda: bn_forward_train(x, vec(), vec(), vec(), vec(), 0.1, 1e-5, mask=mask))),
        ("train-masked", path(lambda: bn_backward(dy, x, vec(), vec(), vec(), 1e-5, True, mask=mask,
                                                  inv_counts=torch.empty((x.shape[1], 2), device=x.device)))),
    ]


def cooperative_slab(x: torch.Tensor) -> torch.Tensor:
    """A meta tensor of x's layout and dtype that takes the cooperative path with several programs
    per channel (block): NHWC 64x512x7x7 (ResNet-50's layer4 at batch 64: 200 programs in fp16),
    NCHW 32x64x28x28 (256), NC 8192x96 (128 fp16, 192 fp32)."""
    if x.dim() == 2:
        return torch.empty((8192, 96), dtype=x.dtype, device="meta")
    if x.is_contiguous():
        return torch.empty((32, 64, 28, 28), dtype=x.dtype, device="meta")
    return torch.empty((64, 512, 7, 7), dtype=x.dtype, device="meta").to(memory_format=torch.channels_last)


def _cooperative_scenarios(x: torch.Tensor, masked: bool = False):
    """The cooperative kernels (kernels/cooperative.py) on cooperative_slab(x), plain and with the
    heaviest epilogue (and ``masked``, with a mask), recorded with the switch on; the on-chip path
    off, so the slab cannot go there. Its single launch (PHASE 0: tuning's interpreter flag is off
    while recording)."""
    from triton_bn.kernels.view import mask_view
    from triton_bn.kernels import cooperative, input_view
    from triton_bn.kernels.tuning import use_cooperative
    slab = cooperative_slab(x)
    dy, r = torch.empty_like(slab), torch.empty_like(slab)
    vec = lambda: torch.empty(slab.shape[1], dtype=torch.float32, device=x.device)  # noqa: E731
    leaky = dict(activation=2, residual=r)
    mask = torch.empty((slab.shape[0], *slab.shape[2:]), dtype=torch.bool, device=x.device)
    inv_counts = torch.empty((slab.shape[1], 2), device=x.device)

    def on(thunk):
        def run():
            with use_cooperative(True):
                view = input_view(slab)
                plan = cooperative.cooperative_plan_for(view)
                if plan is None:
                    raise RuntimeError(f"cooperative_slab {tuple(slab.shape)} is not co-resident")
                return thunk(view, plan)
        return run
    return [
        ("train", on(lambda v, p: cooperative.bn_cooperative_forward(v, p, vec(), vec(), vec(), vec(), 0.1, 1e-5))),
        ("train-fused", on(lambda v, p: cooperative.bn_cooperative_forward(v, p, vec(), vec(), vec(), vec(), 0.1,
                                                                           1e-5, **leaky))),
        ("train", on(lambda v, p: cooperative.bn_cooperative_backward(v, p, dy, vec(), vec(), vec(), 1e-5, True,
                                                                      (True, True, True, False)))),
        ("train-fused", on(lambda v, p: cooperative.bn_cooperative_backward(
            v, p, dy, vec(), vec(), vec(), 1e-5, True, (True,) * 4, bias=vec(), from_output=True, **leaky))),
    ] + ([
        ("train-masked", on(lambda v, p: cooperative.bn_cooperative_forward(
            v, p, vec(), vec(), vec(), vec(), 0.1, 1e-5, mask=mask_view(v, mask)))),
        ("train-masked", on(lambda v, p: cooperative.bn_cooperative_backward(
            v, p, dy, vec(), vec(), vec(), 1e-5, True, (True, True, True, False), mask=mask_view(v, mask),
            inv_counts=inv_counts))),
    ] if masked else [])


def _call_with(context, thunk):
    with context:
        return thunk()


def onchip_slab(x: torch.Tensor) -> torch.Tensor:
    """A meta tensor of x's layout and dtype whose slab per program is exactly at the on-chip
    bound: NCHW 64 samples x 128 positions per channel; channels-last (NHWC, NC) the rows that
    fill ONCHIP_MAX_ELEMENTS with 16 bytes of channels (2048 fp32 / 1024 fp16 rows)."""
    from triton_bn.kernels.tuning import ONCHIP_MAX_ELEMENTS
    rows = ONCHIP_MAX_ELEMENTS // (16 // x.element_size())
    if x.dim() == 2:
        return torch.empty((rows, 64), dtype=x.dtype, device="meta")
    if x.is_contiguous():
        return torch.empty((64, 8, 8, 16), dtype=x.dtype, device="meta")
    return torch.empty((rows // 64, 64, 8, 8), dtype=x.dtype, device="meta").to(memory_format=torch.channels_last)


def _specialize(name: str, value, do_not_specialize) -> Tuple[str, Any, bool]:
    """(triton type, constexpr value or None, divisible by 16) the way Triton's JIT
    specializes a runtime argument: ints equal to 1 become constants, ints and pointers
    divisible by 16 get tt.divisibility=16; floats are fp32 and never specialized."""
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype], None, True  # 16-byte aligned, see above
    if value is None:
        return "constexpr", None, False
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if name not in do_not_specialize and value == 1:
            return "constexpr", 1, False
        kind = "i32" if -2**31 <= value < 2**31 else ("i64" if -2**63 <= value < 2**63 else "u64")
        return kind, None, name not in do_not_specialize and value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"cannot specialize argument {name}={value!r}")


def _encode_constexpr(value):
    if isinstance(value, tl.dtype):
        return ("tl", value.name)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"constexpr {value!r} has no JSON form")


def _launch_jobs(launch: _Launch, variant: str, dtype: str, layout: str, arch: int) -> List[CompileJob]:
    kernel = launch.kernel
    fn = _python_fn(kernel)
    annotations = {p.name: p.annotation for p in inspect.signature(fn).parameters.values()}
    params = list(annotations)
    bound = dict(zip(params, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k in params})
    inner = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    do_not_specialize = {params[i] if isinstance(i, int) else i
                         for i in getattr(inner, "do_not_specialize", ())}
    signature, constexprs, divisible = [], [], []
    for p in params:
        if p not in bound:  # filled in by the autotune config
            signature.append((p, "constexpr"))
            continue
        if "constexpr" in str(annotations[p]):
            signature.append((p, "constexpr"))
            constexprs.append((p, _encode_constexpr(bound[p])))
            continue
        kind, const, div = _specialize(p, bound[p], do_not_specialize)
        signature.append((p, kind))
        if kind == "constexpr":
            constexprs.append((p, const))
        if div:
            divisible.append(p)
    common = dict(kernel=launch.qualname, name=fn.__name__.removeprefix("_bn_").removesuffix("_kernel"),
                  variant=variant, dtype=dtype, layout=layout, signature=tuple(signature),
                  constexprs=tuple(constexprs), divisible=tuple(divisible), arch=arch)
    if not isinstance(kernel, triton.runtime.Autotuner):
        blocks = tuple((k, v) for k, v in constexprs if k.startswith("BLOCK_"))
        options = tuple((k, launch.kwargs[k]) for k in LAUNCH_OPTIONS if k in launch.kwargs)
        return [CompileJob(**common, config=blocks, num_warps=launch.kwargs.get("num_warps", 4),
                           num_stages=launch.kwargs.get("num_stages", 3), autotuned=False, kept=True,
                           options=options)]
    prune = kernel.early_config_prune
    kept = prune(kernel.configs, bound, **launch.kwargs) if prune else kernel.configs
    return [CompileJob(**common, config=tuple(sorted(c.kwargs.items())), num_warps=c.num_warps,
                       num_stages=c.num_stages, autotuned=True, kept=c in kept)
            for c in kernel.configs]


def job_key(job: CompileJob) -> tuple:
    """Two jobs with equal keys compile to the same binary (shapes differing only in ints
    that Triton does not specialize on share one)."""
    return (job.kernel, job.signature, job.constexprs, job.config, job.num_warps, job.num_stages, job.arch,
            job.layout, job.options)


def recorded_jobs(x: torch.Tensor, dtype: str, layout: str, archs=(90,), dispatched: bool = False,
                  cooperative: bool = False, masked: bool = False) -> List[CompileJob]:
    """The distinct jobs of every launch the library makes on ``x`` (a meta tensor), each
    launch paired with every config it can run with (``dispatched``, ``cooperative``,
    ``masked``: see _scenarios)."""
    jobs: Dict[tuple, CompileJob] = {}
    for variant, launch_all in _scenarios(x, dispatched, cooperative, masked):
        sink: List[_Launch] = []
        with _recording(sink):
            launch_all()
        for launch in sink:
            for arch in archs:
                for job in _launch_jobs(launch, variant, dtype, layout, arch):
                    jobs.setdefault(job_key(job), job)
    return list(jobs.values())


def compile_jobs(archs=(90,), dtypes=("fp32", "fp16", "bf16"), layouts=("NCHW", "NHWC"),
                 kernels: Optional[List[str]] = None, kept_only: bool = False,
                 cooperative: bool = False, masked: bool = False) -> List[CompileJob]:
    """Every distinct (kernel specialization, config, arch) the library launches for the
    representative shapes. ``kernels``: keep names containing any of these substrings;
    ``cooperative``: the cooperative kernels too (behind their switch, off by default);
    ``masked``: the masked training variants too."""
    jobs: Dict[tuple, CompileJob] = {}
    for layout in layouts:
        for dtype in dtypes:
            for job in recorded_jobs(LAYOUTS[layout](DTYPES[dtype]), dtype, layout, archs, cooperative=cooperative,
                                     masked=masked):
                jobs.setdefault(job_key(job), job)
    selected = [j for j in jobs.values()
                if (not kernels or any(k in j.name for k in kernels)) and (j.kept or not kept_only)]
    return selected
