"""Named suites: lists of sweeps, each a set of shapes crossed with dtypes and layouts.

Sweeps (the issue's a-d):
  resnet50  the 12 distinct BatchNorm inputs of ResNet-50 (resnet50_layers) at batch 64 / 256;
            each case carries how many of the network's 53 BN layers have its shape (the
            summary weighs the ResNet-50 goal by it)
  size      total input size from 1 MB up at fixed C (16 x 64 x H x W)
  channels  channel count 3 .. 4096 at a fixed total size (few channels, huge spatial: where
            torch is weakest)
  bn1d      BatchNorm1d input (N, C) with N up to 10^6
  masked    masked BatchNorm1d on speech-like (N, C, L) inputs (issue 20): each case carries the
            mean fraction of valid positions, the samples right-padded to L (perf/masked.py
            draws the lengths); fp16/bf16 only, against the torch composition a user writes
Only resnet50 counts toward the goals; the other sweeps are reported beside them.

Suites: ``tiny`` (the CPU interpreter's pipeline check; seconds per case there), ``quick`` (a
handful of GPU shapes, one of them masked, meant to fit 4 minutes including autotuning and
torch.compile), ``default`` (every ResNet-50 shape at both batches, the other sweeps; masked:
2 shapes x 4 valid fractions x fp16/bf16 x 2 layouts = 32 cases) and ``full``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .bytes_model import ELEMENT_SIZE
from .resnet50_layers import SHAPES as RESNET50_CHW, layers_of

# The tiny suite's interpreter-sized stand-ins (N = 2, C / 32, H / 7, W / 7) and the ResNet-50
# shape each stands for, whose layer count it carries.
TINY_RESNET50 = {(2, 2, 8, 8): (64, 56, 56), (2, 8, 2, 2): (256, 14, 14), (2, 32, 2, 2): (1024, 14, 14)}
DTYPES = ("float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
IMAGE_LAYOUTS = ("nchw", "channels_last")
MB = 1 << 20


@dataclass(frozen=True)
class Case:
    sweep: str
    shape: tuple
    dtype: str
    layout: str  # nchw | channels_last (4-D), nc (2-D)
    layers: int = 0  # ResNet-50 BN layers with this shape: the case's weight in the goal (0: not in it)
    valid: Optional[float] = None  # masked cases: mean fraction of positions counted (None: no mask)

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
    def mask_numel(self) -> int:
        """Elements of the (N, *spatial) bool mask: its bytes per pass that reads it (0 unmasked)."""
        return 0 if self.valid is None else self.N * self.spatial

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    def __str__(self) -> str:
        masked = "" if self.valid is None else f" valid {self.valid:.0%}"
        return f"{self.sweep} {self.shape_str} {self.dtype} {self.layout}{masked}"


@dataclass(frozen=True)
class Sweep:
    name: str
    shapes: Callable[[str], Sequence[tuple]]  # dtype -> shapes (size sweeps depend on e)
    dtypes: Sequence[str] = DTYPES
    layouts: Sequence[str] = IMAGE_LAYOUTS
    layers: Callable[[tuple], int] = lambda shape: 0  # shape -> ResNet-50 layers it weighs for
    valid: Sequence[Optional[float]] = (None,)  # valid fractions (masked sweeps); None: no mask

    def cases(self):
        return [Case(self.name, tuple(shape), dtype, layout, self.layers(tuple(shape)), valid)
                for dtype in self.dtypes for layout in self.layouts for shape in self.shapes(dtype)
                for valid in self.valid]


def resnet50(batches):
    return lambda dtype: [(b, c, h, w) for b in batches for c, h, w in RESNET50_CHW]


def resnet50_sweep(shapes, **kwargs) -> Sweep:
    """A resnet50 sweep over real ResNet-50 shapes, each weighted by its layer count."""
    return Sweep("resnet50", shapes, layers=lambda shape: layers_of(shape[1:]), **kwargs)


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


def masked(shapes, valid, dtypes=HALF_DTYPES, layouts=IMAGE_LAYOUTS) -> Sweep:
    """A masked sweep: (N, C, L) shapes, each at every valid fraction (not in the goal)."""
    return Sweep("masked", fixed(*shapes), dtypes=dtypes, layouts=layouts, valid=tuple(valid))


# Speech-like BatchNorm1d inputs: 512 channels over Whisper's 1500 encoder frames, and the 80
# log-mel features of 30 s of audio (few channels, long rows); full adds wider and longer ones.
SPEECH = ((32, 512, 1500), (32, 80, 3000))
SPEECH_FULL = SPEECH + ((64, 256, 1500), (16, 1024, 3000))


def _powers(lo: int, hi: int, factor: int):
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= factor
    return out


SUITES = {
    "tiny": [  # stand-ins of each sweep, small enough for the interpreter (not ResNet-50's sizes)
        Sweep("resnet50", fixed(*TINY_RESNET50), layers=lambda shape: layers_of(TINY_RESNET50[shape])),
        Sweep("size", by_size([8 << 10, 32 << 10], C=4, N=2), dtypes=("float32",)),
        Sweep("channels", by_channels([3, 16], 16 << 10, N=2), dtypes=("float32",)),
        Sweep("bn1d", bn1d([256, 1024], 8), dtypes=("float32",), layouts=("nc",)),
        masked([(3, 4, 16)], [0.5, 1.0], dtypes=("float32",)),
    ],
    "quick": [  # the largest shape, the one with the most layers (11) and the smallest
        resnet50_sweep(fixed((256, 64, 112, 112), (256, 256, 14, 14), (256, 2048, 7, 7)), dtypes=("float16",)),
        resnet50_sweep(fixed((256, 64, 56, 56)), dtypes=("float32",), layouts=("nchw",)),
        Sweep("channels", by_channels([3], 256 * MB), dtypes=("float16",), layouts=("nchw",)),
        Sweep("bn1d", bn1d([10 ** 6], 256), dtypes=("float16",), layouts=("nc",)),
        # last, so that a quick run cut short by its time limit loses only this case
        masked([(32, 512, 1500)], [0.5], dtypes=("float16",), layouts=("channels_last",)),
    ],
    "default": [
        resnet50_sweep(resnet50([64, 256])),
        Sweep("size", by_size(_powers(MB, 2048 * MB, 4) + [2048 * MB])),
        Sweep("channels", by_channels([3, 8, 32, 128, 512, 2048, 4096], 256 * MB)),
        Sweep("bn1d", bn1d([10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6], 256), layouts=("nc",)),
        masked(SPEECH, [0.2, 0.5, 0.8, 1.0]),
    ],
    "full": [
        resnet50_sweep(resnet50([64, 256])),
        Sweep("size", by_size(_powers(MB, 2048 * MB, 2))),
        Sweep("channels", by_channels([3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], 256 * MB)),
        Sweep("bn1d", bn1d([10 ** 2, 10 ** 3, 3 * 10 ** 3, 10 ** 4, 3 * 10 ** 4, 10 ** 5, 3 * 10 ** 5, 10 ** 6], 256),
              layouts=("nc",)),
        masked(SPEECH_FULL, [0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 1.0]),
    ],
}


def suite_cases(name: str, dtypes=None, layouts=None, sweeps=None) -> list:
    """The suite's cases, optionally restricted to some dtypes / layouts / sweeps (duplicates dropped)."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    known = list(dict.fromkeys(sweep.name for sweep in SUITES[name]))
    unknown = [s for s in sweeps or () if s not in known]
    if unknown:
        raise KeyError(f"suite {name!r} has no sweep(s) {unknown}; its sweeps: {', '.join(known)}")
    cases = []
    for sweep in SUITES[name]:
        if sweeps and sweep.name not in sweeps:
            continue
        for case in sweep.cases():
            if (dtypes and case.dtype not in dtypes) or (layouts and case.layout not in layouts):
                continue
            if case not in cases:
                cases.append(case)
    return cases
