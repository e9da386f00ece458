"""Bytes and FLOPs per op: the x-axis of the roofline and the numerator of every GB/s we report.

T = numel, e = element size. Effective bandwidth = unique bytes / median time (design.md):

    op             unique bytes                    3-pass design moves    best effective share
    forward-train  read x, write y      = 2 T e    3 T e (x read twice)   2/3  = 67 % of copy
    forward-eval   read x, write y      = 2 T e    2 T e                  1    = 100 %
    backward       read x, dy, write dx = 3 T e    5 T e                  3/5  = 60 %
    fwd+bwd        forward + backward   = 5 T e    8 T e                  5/8  = 62.5 %
    copy           read x, write copy   = 2 T e    2 T e                  the ceiling itself

fwd+bwd counts x twice: in training the two run at different times, so x must be read again.
Shapes whose slab per channel fits on chip (kernels/onchip.py, tuning.onchip_tile) take a
one-read path instead: they move the unique bytes (2 T e forward-train, 3 T e backward), and
``moved_bytes`` (the split path's) overstates them.
Per-channel vectors (C floats) are noise at real sizes and are left out.

Masked cases (issue 20) add the bool mask, S_m = N x spatial bytes, once per pass that reads
it: the statistics pass (forward-train) and the dx pass (backward); normalize computes y at
every position and dbias / dweight sum over all positions, so neither reads it, nor does eval:

    forward-train  2 T e + S_m      backward  3 T e + S_m      fwd+bwd  5 T e + 2 S_m
    forward-eval   2 T e            copy      2 T e (the ceiling copies x only)

The 3-pass design's moved bytes add the same S_m per op (one statistics pass, one dx pass).

FLOPs count the math once per element, an FMA as 2 (so the roofline places every op, not the
implementation's tricks):
    forward-train 7: mean (1 add), centered square sum (sub + FMA = 3), normalize (sub + FMA = 3)
    forward-eval  3: normalize
    backward     10: sum dy (1), sum dy*(x - mean) (sub + FMA = 3), dx (xhat 2, FMA + sub 3, scale 1)
    fwd+bwd      17
"""
from __future__ import annotations

import torch

OPS = ("forward-train", "forward-eval", "backward", "fwd+bwd")
COPY = "copy"

UNIQUE_PASSES = {"forward-train": 2, "forward-eval": 2, "backward": 3, "fwd+bwd": 5, COPY: 2}
THREE_PASS_MOVED_PASSES = {"forward-train": 3, "forward-eval": 2, "backward": 5, "fwd+bwd": 8, COPY: 2}
MASK_PASSES = {"forward-train": 1, "forward-eval": 0, "backward": 1, "fwd+bwd": 2, COPY: 0}
FLOPS_PER_ELEMENT = {"forward-train": 7, "forward-eval": 3, "backward": 10, "fwd+bwd": 17, COPY: 0}

ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


def mask_bytes(op: str, mask_numel: int) -> int:
    """The bool mask's bytes an op reads (0 for an unmasked case, ``mask_numel`` = 0)."""
    return MASK_PASSES[op] * mask_numel


def unique_bytes(op: str, numel: int, dtype: str, mask_numel: int = 0) -> int:
    return UNIQUE_PASSES[op] * numel * ELEMENT_SIZE[dtype] + mask_bytes(op, mask_numel)


def moved_bytes(op: str, numel: int, dtype: str, mask_numel: int = 0) -> int:
    """Bytes the 3-pass design moves through device memory (each pass streams the tensor once)."""
    return THREE_PASS_MOVED_PASSES[op] * numel * ELEMENT_SIZE[dtype] + mask_bytes(op, mask_numel)


def best_share_of_copy(op: str) -> float:
    """The prediction: at copy speed for every pass, effective bandwidth / copy bandwidth."""
    return UNIQUE_PASSES[op] / THREE_PASS_MOVED_PASSES[op]


def flops(op: str, numel: int) -> int:
    return FLOPS_PER_ELEMENT[op] * numel


def intensity(op: str, dtype: str) -> float:
    """Arithmetic intensity, FLOPs per unique byte (independent of the size)."""
    return FLOPS_PER_ELEMENT[op] / (UNIQUE_PASSES[op] * ELEMENT_SIZE[dtype])


def gbps(nbytes: float, time_ms: float) -> float:
    return nbytes / (time_ms * 1e-3) / 1e9
