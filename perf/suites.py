"""Named suites: lists of sweeps, each a set of shapes crossed with dtypes and layouts.

Sweeps (the issue's a-d):
  resnet50  the BatchNorm inputs of ResNet-50 (channels x spatial per stage) at batch 64 / 256
  size      total input size from 1 MB up at fixed C (16 x 64 x H x W)
  channels  channel count 3 .. 4096 at a fixed total size (few channels, huge spatial: where
            torch is weakest)
  bn1d      BatchNorm1d input (N, C) with N up to 10^6

Suites: ``tiny`` (the CPU interpreter's pipeline check; seconds per case there), ``quick`` (a
handful of GPU shapes, meant to fit 3 minutes including autotuning and torch.compile),
``default`` and ``full``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .bytes_model import ELEMENT_SIZE

RESNET50_CHW = ((64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
                (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7))
DTYPES = ("float32", "float16", "bfloat16")
IMAGE_LAYOUTS = ("nchw", "channels_last")
MB = 1 << 20


@dataclass(frozen=True)
class Case:
    sweep: str
    shape: tuple
    dtype: str
    layout: str  # nchw | channels_last (4-D), nc (2-D)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def N(self) -> int:
        return self.shape[0]

    @property
    def C(self) -> int:
        return self.shape[1]

    @property
    def spatial(self) -> int:
        return math.prod(self.shape[2:])

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    def __str__(self) -> str:
        return f"{self.sweep} {self.shape_str} {self.dtype} {self.layout}"


@dataclass(frozen=True)
class Sweep:
    name: str
    shapes: Callable[[str], Sequence[tuple]]  # dtype -> shapes (size sweeps depend on e)
    dtypes: Sequence[str] = DTYPES
    layouts: Sequence[str] = IMAGE_LAYOUTS

    def cases(self):
        return [Case(self.name, tuple(shape), dtype, layout)
                for dtype in self.dtypes for layout in self.layouts for shape in self.shapes(dtype)]


def resnet50(batches):
    return lambda dtype: [(b, c, h, w) for b in batches for c, h, w in RESNET50_CHW]


def _near_square(s: int) -> tuple:
    """(H, W) with H*W = s exactly when s has a divisor in [sqrt(s)/4, sqrt(s)], else about s."""
    root = max(1, math.isqrt(s))
    h = next((d for d in range(root, max(1, root // 4) - 1, -1) if s % d == 0), root)
    return h, max(1, s // h)


def by_size(sizes_bytes, C: int = 64, N: int = 16):
    """(N, C, H, W) with N*C*H*W*e as close to each size as whole H, W allow."""
    return lambda dtype: [(N, C, *_near_square(max(1, size // (ELEMENT_SIZE[dtype] * N * C))))
                          for size in sizes_bytes]


def by_channels(channels, size_bytes: int, N: int = 32):
    return lambda dtype: [(N, c, *_near_square(max(1, size_bytes // (ELEMENT_SIZE[dtype] * N * c))))
                          for c in channels]


def bn1d(rows, C: int):
    return lambda dtype: [(n, C) for n in rows]


def fixed(*shapes):
    return lambda dtype: list(shapes)


def _powers(lo: int, hi: int, factor: int):
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= factor
    return out


SUITES = {
    "tiny": [  # stand-ins of each sweep, small enough for the interpreter (not ResNet-50's sizes)
        Sweep("resnet50", fixed((2, 8, 8, 8))),
        Sweep("size", by_size([8 << 10, 32 << 10], C=4, N=2), dtypes=("float32",)),
        Sweep("channels", by_channels([3, 16], 16 << 10, N=2), dtypes=("float32",)),
        Sweep("bn1d", bn1d([256, 1024], 8), dtypes=("float32",), layouts=("nc",)),
    ],
    "quick": [
        Sweep("resnet50", fixed((256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7)),
              dtypes=("float16",)),
        Sweep("resnet50", fixed((256, 64, 56, 56)), dtypes=("float32",), layouts=("nchw",)),
        Sweep("channels", by_channels([3], 256 * MB), dtypes=("float16",), layouts=("nchw",)),
        Sweep("bn1d", bn1d([10 ** 6], 256), dtypes=("float16",), layouts=("nc",)),
    ],
    "default": [
        Sweep("resnet50", resnet50([256])),
        Sweep("size", by_size(_powers(MB, 2048 * MB, 4) + [2048 * MB])),
        Sweep("channels", by_channels([3, 8, 32, 128, 512, 2048, 4096], 256 * MB)),
        Sweep("bn1d", bn1d([10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6], 256), layouts=("nc",)),
    ],
    "full": [
        Sweep("resnet50", resnet50([64, 256])),
        Sweep("size", by_size(_powers(MB, 2048 * MB, 2))),
        Sweep("channels", by_channels([3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], 256 * MB)),
        Sweep("bn1d", bn1d([10 ** 2, 10 ** 3, 3 * 10 ** 3, 10 ** 4, 3 * 10 ** 4, 10 ** 5, 3 * 10 ** 5, 10 ** 6], 256),
              layouts=("nc",)),
    ],
}


def suite_cases(name: str, dtypes=None, layouts=None) -> list:
    """The suite's cases, optionally restricted to some dtypes / layouts (duplicates dropped)."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    cases = []
    for sweep in SUITES[name]:
        for case in sweep.cases():
            if (dtypes and case.dtype not in dtypes) or (layouts and case.layout not in layouts):
                continue
            if case not in cases:
                cases.append(case)
    return cases
