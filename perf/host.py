"""Host cost per call (``python -m perf host``): triton_bn's CPU-side cost against torch's, no GPU.

Why: on an H200 a BatchNorm layer of ResNet-50's 14x14 and 7x7 stages moves a few MB, 1-15 us
of memory time. When the host needs longer than that to issue the call, the GPU waits for
Python. This benchmark measures that host cost on any machine.

How: ``main`` starts a fresh process (``python -m perf.host``) whose environment has
  TRITON_INTERPRET unset    compiled kernels, not the interpreter (read when kernels are defined)
  TRITON_BN_CPU_KERNELS=1   triton_bn runs its kernels on CPU tensors: a Triton driver that
                            accepts CPU pointers is active (host_driver's stub)
  TRITON_BN_PIN_CONFIG=1    each autotuned kernel pinned to one config, so the autotuner
                            benchmarks nothing (there is no GPU timer); after tuning, a call
                            pays the same cache lookup either way
and installs ``host_driver``: kernels compile for sm_90 for real and Triton's C launcher runs
for real; only cuLaunchKernelEx is a no-op, which counts. Then, per (op, api), it times
triton_bn and torch in turns, block by block (default: blocks of one call), after warm-up and
with the garbage collector paused, on one small CPU tensor with one torch thread, and reports
the median over blocks. One-call blocks keep the median clear of the few calls a busy machine
preempts (a preempted call takes milliseconds).

  ops   forward-train; forward-eval (under no_grad); backward (torch.autograd.grad over a
        retained graph: the layer's own backward node); fwd+bwd (forward, then autograd.grad)
  apis  module      triton_bn.BatchNorm2d        vs torch.nn.BatchNorm2d
        functional  triton_bn.batch_norm         vs torch.nn.functional.batch_norm
        launchers   triton_bn's layer-1 launchers vs torch's aten op, no autograd (perf.impls)

Read the numbers as host cost against host cost. triton_bn's include everything a GPU call
does on the host but the driver's launch itself; torch's are its CPU eager path on the same
tensor (dispatch plus a CPU kernel over a few hundred elements), where on a GPU torch would
pay a cudaLaunchKernel per kernel instead. Neither is GPU time; the ratio is no speed-up.
Output: a table (us per call, ratio, launches per call) and ``<out>/host-cost-<cpu>.csv``, whose
header records the torch and Triton versions and the launch path the plans took (``launch_path``:
``c:packed``, ``c:varargs`` or ``triton``, see LAUNCH_PATHS).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

from .results import write_commented_csv

OPS = ("forward-train", "forward-eval", "backward", "fwd+bwd")
APIS = ("module", "functional", "launchers")
LABEL = "host cost per call, launch stubbed, not GPU time"
COLUMNS = ("op", "api", "shape", "dtype", "triton_bn_us", "triton_bn_p20_us", "triton_bn_p80_us", "torch_us",
           "torch_p20_us", "torch_p80_us", "ratio", "launches", "reps", "calls_per_rep")
WORKER_ENV = {"TRITON_BN_CPU_KERNELS": "1", "TRITON_BN_PIN_CONFIG": "1",
              # A real GPU stays out of this process: the stub must be its only libcuda.
              "CUDA_VISIBLE_DEVICES": ""}


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="plots", help="folder of the CSV (default: plots)")
    parser.add_argument("--shape", default="2x8x4x4", help="N x C x H x W of the float32 input (default: 2x8x4x4)")
    parser.add_argument("--reps", type=int, default=1000, help="timed blocks per implementation (default: 1000)")
    parser.add_argument("--calls", type=int, default=1, help="calls per timed block (default: 1)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (default: 20)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before the run is stopped (default: 600)")
    args = parser.parse_args(argv)
    args.shape = tuple(int(s) for s in args.shape.lower().split("x"))
    if len(args.shape) != 4 or min(args.shape) < 1 or args.reps < 1 or args.calls < 1 or args.warmup < 1:
        parser.error("--shape needs 4 positive sizes; --reps, --calls and --warmup at least 1")
    return args


# ------------------------------------------------------------------------------------------ parent

def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(WORKER_ENV)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def main(argv) -> int:
    """Run the benchmark in a fresh process (see the module docstring); its exit status."""
    args = parse(argv)
    try:
        return subprocess.run([sys.executable, "-m", "perf.host", *argv], env=worker_env(),
                              timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"host benchmark: stopped after {args.timeout} s", file=sys.stderr)
        return 124


# ------------------------------------------------------------------------------------------ worker

class Timing(NamedTuple):
    median_us: float
    p20_us: float
    p80_us: float


class Side(NamedTuple):
    """One implementation's module, functional form and launchers."""
    module: object
    functional: Callable
    launchers: object


def make_call(side: Side, op: str, api: str, x, dy) -> Callable[[], object]:
    """A zero-argument call doing ``op`` once through ``api``; builds what it needs first."""
    import torch
    from .impls import EPS, MOMENTUM
    m = side.module
    w, b, rm, rv = m.weight, m.bias, m.running_mean, m.running_var
    if api == "launchers":
        impl, xd, wd, bd = side.launchers, x.detach(), w.detach(), b.detach()
        if op == "forward-train":
            return lambda: impl.forward_train(xd, wd, bd, rm, rv)
        if op == "forward-eval":
            return lambda: impl.forward_eval(xd, wd, bd, rm, rv)
        if op == "backward":
            saved = impl.forward_train(xd, wd, bd, rm, rv)[1]
            return lambda: impl.backward(dy, xd, wd, saved)
        return lambda: impl.backward(dy, xd, wd, impl.forward_train(xd, wd, bd, rm, rv)[1])
    training = op != "forward-eval"
    if api == "module":
        m.train(training)
        forward = m
    else:
        forward = lambda t: side.functional(t, rm, rv, w, b, training, MOMENTUM, EPS)  # noqa: E731
    if op in ("forward-train", "forward-eval"):
        return lambda: forward(x)
    inputs = (x, w, b)
    if op == "backward":
        y = forward(x)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(forward(x), inputs, dy)


def time_interleaved(calls: dict, reps: int, per_rep: int, warmup: int) -> dict:
    """{name: Timing in us per call}; the implementations take turns block by block, so a
    noisy neighbour on a shared machine slows both alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, call in calls.items():
                start = time.perf_counter_ns()
                for _ in range(per_rep):
                    call()
                samples[name].append((time.perf_counter_ns() - start) / per_rep / 1e3)
    finally:
        gc.enable()
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = Timing(statistics.median(values), values[int(0.2 * (len(values) - 1))],
                           values[int(0.8 * (len(values) - 1))])
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def benchmark(args, count_launches: Callable[[], int]) -> int:
    """Measure every (op, api), print the table, write the CSV. The stub driver is installed."""
    import torch
    from torch import nn
    import torch.nn.functional as F
    import triton
    import triton_bn
    from .env import file_slug
    from .impls import TorchEager, TritonBN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.shape, requires_grad=True)  # an inner layer's input: its gradient is wanted
    dy = torch.randn(args.shape)
    C = args.shape[1]
    sides = {"triton_bn": Side(triton_bn.BatchNorm2d(C), triton_bn.batch_norm, TritonBN()),
             "torch": Side(nn.BatchNorm2d(C), F.batch_norm, TorchEager(cudnn_enabled=True))}
    shape = "x".join(map(str, args.shape))
    print(f"*** {LABEL} ***\ntriton_bn vs torch on a {shape} float32 CPU tensor, 1 thread, "
          f"{args.reps} x {args.calls} call(s) per (op, api) and implementation; first calls compile for sm_90")
    print(_table_header())
    rows = []
    for op in OPS:
        for api in APIS:
            context = torch.no_grad() if op == "forward-eval" else nullcontext()
            with context:
                calls = {name: make_call(side, op, api, x, dy) for name, side in sides.items()}
                calls["triton_bn"]()  # compiles on the first call of a new specialization
                before = count_launches()
                calls["triton_bn"]()
                launches = count_launches() - before
                if launches == 0:
                    print(f"error: triton_bn launched no kernel for {op} ({api}): it ran torch's fallback. "
                          "triton_bn.functional.uses_kernels must honour TRITON_BN_CPU_KERNELS=1",
                          file=sys.stderr)
                    return 1
                timing = time_interleaved(calls, args.reps, args.calls, args.warmup)
            ours, theirs = timing["triton_bn"], timing["torch"]
            rows.append({"op": op, "api": api, "shape": shape, "dtype": "float32",
                         "triton_bn_us": ours.median_us, "triton_bn_p20_us": ours.p20_us,
                         "triton_bn_p80_us": ours.p80_us, "torch_us": theirs.median_us,
                         "torch_p20_us": theirs.p20_us, "torch_p80_us": theirs.p80_us,
                         "ratio": ours.median_us / theirs.median_us, "launches": launches,
                         "reps": args.reps, "calls_per_rep": args.calls})
            print(_table_line(rows[-1]), flush=True)
    path = launch_paths()
    print(f"launch path: {path} ({LAUNCH_PATHS.get(path, 'mixed')}), Triton {triton.__version__}")
    meta = {"label": LABEL, "cpu": cpu_model(), "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "threads": "1", "launch_path": path,
            "triton_bn": f"kernels compiled for sm_90, {LAUNCH_PATHS.get(path, path)}, cuLaunchKernelEx stubbed; "
                         "TRITON_BN_PIN_CONFIG=1",
            "torch_side": "CPU eager on the same tensor (dispatch + CPU kernel, no launch)",
            "ratio": "triton_bn us / torch us (host cost, not a speed-up)"}
    path = Path(args.out) / f"host-cost-{file_slug(meta['cpu'])}.csv"
    write_csv(path, meta, rows)
    print(f"wrote {path}\n*** {LABEL} ***")
    return 0


# How triton_bn's recorded plans launch (triton_bn/kernels/launch.py), by the name each plan's
# launch function carries; which one a Triton version takes: triton_bn.compat.C_LAUNCH_LAYOUTS.
LAUNCH_PATHS = {"c:packed": "Triton's C launch function called directly (Triton >= 3.7 signature)",
                "c:varargs": "the kernel's C launcher called directly (Triton 3.5/3.6 signature)",
                "triton": "Triton's Python launcher (kernel.run; no known C launch signature)"}


def launch_paths() -> str:
    """The launch path(s) of every plan recorded in this process, '+'-joined ('none' if none)."""
    from triton_bn.kernels.launch import all_launches
    paths = {getattr(plan.go, "path", "unknown") for launch in all_launches() for plan in launch.plans.values()}
    return "+".join(sorted(paths)) or "none"


def _table_header() -> str:
    return f"{'op':<15}{'api':<12}{'triton_bn us':>13}{'torch us':>10}{'ratio':>8}{'launches':>10}"


def _table_line(row: dict) -> str:
    return (f"{row['op']:<15}{row['api']:<12}{row['triton_bn_us']:>13.1f}{row['torch_us']:>10.1f}"
            f"{row['ratio']:>7.1f}x{row['launches']:>10}")


def write_csv(path: Path, meta: dict, rows: list) -> Path:
    return write_commented_csv(path, meta, COLUMNS, rows, ".4g")


def worker(argv) -> int:
    """The measuring process: refuses an environment where the numbers would mean something else."""
    wrong = {k: os.environ.get(k) for k, v in WORKER_ENV.items() if os.environ.get(k) != v}
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or wrong:
        print("run it as `python -m perf host` (it prepares this process's environment)", file=sys.stderr)
        return 2
    import warnings
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # a Triton 3.9 notice
    # A CUDA build of torch asks the (stub) driver for devices in autograd's backward, and warns.
    warnings.filterwarnings("ignore", message="CUDA initialization")
    from .host_driver import install
    return benchmark(parse(argv), install())


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
