"""Timing: triton.testing.do_bench medians on a GPU, wall-clock medians under the interpreter.

On a GPU, do_bench runs the call ``warmup`` ms untimed, then times each repetition with CUDA
events after zeroing a buffer larger than L2 (its cache flush), so every repetition reads its
inputs from device memory, as a layer in a real network does. Autotuning and compilation have
already happened in the correctness check, so they are not in the timings.

Under the CPU interpreter the times are those of numpy executing each program: they exercise
the pipeline and mean nothing about bandwidth (every output is labelled so).
"""
from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import torch

from . import env

QUANTILES = (0.5, 0.2, 0.8)


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float


def bench(fn, warmup_ms: int = 10, rep_ms: int = 50, cpu_reps: int = 2) -> Timing:
    if env.mode() == env.GPU:
        import triton.testing
        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(median, p20, p80)
    times = []
    for _ in range(max(1, cpu_reps)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return Timing(statistics.median(times), times[0], times[-1])


def copy_ceiling_gbps(device: torch.device) -> float:
    """The device's copy bandwidth (bytes read + written per second, GB/s) from one large copy:
    1 GiB on a GPU (far beyond L2), 4 MiB on the CPU (a pipeline check only)."""
    nbytes = (1 << 30) if device.type == "cuda" else (4 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = bench(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200, cpu_reps=5)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9
