"""Property-based differential tests: triton_bn against torch, both measured against float64.

Hypothesis draws whole batch-norm calls: rank 2-5, N, C and spatial sizes (1 and odd primes
included); dtype fp32/fp16/bf16/fp64 with float32 or same-dtype parameters; memory layout
(contiguous, channels-last, permuted, sliced with a step, expanded with stride 0, storage
offset, or all of them at once); the feature axis (``axis=k``); train/eval; weight, bias and
running statistics present or not (one running statistic alone included); momentum (None for
the modules' cumulative average), eps; and per-channel data flavours: offsets with
|mean| >> std (up to 1e5 in fp32, 1e8 in fp64), constant channels, NaN/±Inf at random places.

Every call runs three times on the same arguments:

* ``ours``   — triton_bn (the kernels, through Triton's interpreter on the CPU);
* ``torch``  — torch at the same dtypes, the implementation we replace;
* ``ref``    — torch in float64 on upcast copies, the reference. With batch statistics it
  runs on data shifted per channel by a pivot (``shifted``): the results are shift-invariant,
  and float64's own rounding at |mean| = 1e8 would otherwise be as large as the errors under
  test. running_mean, and everything in eval mode, come from the unshifted copies, where
  float64 is well-conditioned.

The rules, for outputs, input/weight/bias gradients and running statistics:

1. Where ``ref`` is NaN, ours is NaN; where ``ref`` is ±inf, ours is the same inf.
2. Where ``ref`` is finite, ours is finite (no unwritten or out-of-bounds element: inputs sit
   in NaN-filled storage, so a read outside the view shows up as a NaN).
3. Per channel, ``max|ours - ref| <= max(K_TORCH * max|torch - ref|, floor)``: at most
   ``K_TORCH`` (4) times torch's own error. The floor covers the channels where torch happens
   to be (nearly) exact: ``TOLERANCE[dtype] * max(1, max|ref|)`` (tests/reference.py) plus a
   budget of roundings in the accumulation dtype (``rounding_budgets``): ``ROUNDINGS`` of
   the result's operands, which matters where a sum cancels (torch on the CPU accumulates in
   float64 and is exact there), and ``MEAN_ROUNDINGS`` of x - mean, which matters at
   |mean| >> std (the saved mean is rounded, torch's too, and torch's is sometimes luckier).
   running_var gets no budget: issue 13's bug A asks for torch's accuracy at any offset.
4. A call torch rejects raises the same exception class (and where torch's message names a
   dtype, such as 'Long', ours names it too), and leaves running_mean and running_var
   untouched. (``num_batches_tracked`` is not compared after a failed module call: torch
   increments it before its checks, triton_bn deliberately only after.)

One class of inputs is left out of rules 2 and 3 on purpose: elements where torch at
fp16/bf16 overflows (inf/NaN where the float64 reference is finite, e.g. a bias gradient over
65504). torch's own result says nothing about the achievable accuracy there.

Each test also runs explicit examples first, in every profile: the bugs that differential
fuzzing found in issue 13 (A-F), as reproduced there.

Hypothesis profiles (registered in tests/conftest.py, selected with ``--hypothesis-profile``):

* ``ci`` (default): derandomized (a fixed seed, the same examples every run), no deadline, a
  fixed budget of examples sized so that ``python -m pytest -n 2 tests/test_properties.py``
  stays under about 2.5 minutes on 2 CPU cores, and no shrinking (on the interpreter it can
  take minutes): a failure is reported as drawn; its repr holds every parameter and seed.
* ``dev``: the ci examples, with shrinking, to minimize a ci failure by hand.
* ``long``: randomized, ~25x the examples, with shrinking; run it by hand after touching
  the kernels, e.g. ``python -m pytest -n 2 tests/test_properties.py --hypothesis-profile=long``.

Each test's budget is a share of the profile's ``max_examples`` (``_budget``), so the
profiles scale every test alike.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import triton_bn
from tests.reference import TOLERANCE

# NaN/inf data makes the interpreter's numpy ops warn; the results are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

# Ours may be this many times further from float64 than torch at the same dtype.
K_TORCH = 4
# ... or within a budget of roundings in the accumulation dtype (``rounding_budgets``): torch on
# the CPU accumulates in float64, and is exact where cancellation makes any float32 order
# inexact, or lucky where its saved mean happens to round well.
ROUNDINGS = 16  # of each result's operands
MEAN_ROUNDINGS = 2  # of x - mean: the saved mean's rounding and the subtraction's

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# |mean| / std reachable in each dtype: fp16 tops out at 65504, bf16 keeps 8 bits.
OFFSETS = {torch.float32: (1e2, 1e3, 1e4, 1e5), torch.float64: (1e2, 1e4, 1e6, 1e8),
           torch.float16: (1e1, 1e2, 1e3), torch.bfloat16: (1e1, 1e2, 1e3)}
# The interpreter runs a few hundred calls a minute: keep inputs to a few thousand elements.
MAX_ELEMENTS = 2048


def _weighted(*pairs):
    """One of the strategies, drawn with the given integer weights."""
    return st.sampled_from([s for w, s in pairs for _ in range(w)]).flatmap(lambda s: s)


# Odd primes and 1 alongside small sizes: no tile or vector width divides them. Now and then a
# long axis: more than one tile per channel, so tiles merge (and a NaN/inf in the first one
# must survive the merge).
LONG = st.sampled_from((127, 257, 300))
SIZES = _weighted((3, st.sampled_from((1, 2, 3, 5, 7, 11, 13))), (3, st.integers(1, 16)), (1, LONG))
BATCH = _weighted((6, st.integers(1, 8)), (1, LONG))
NONFINITE = (math.nan, math.inf, -math.inf)


def _budget(share: float):
    """This test's share of the active profile's max_examples (at least 1)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * share)))


def _prod(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------
# Layouts: where the elements of a logical (N, ..., C, ...) tensor sit in memory.

@dataclass(frozen=True)
class Layout:
    """A strided view built from a NaN-filled storage: dims in memory order ``perm`` (outermost
    first), every dim ``d`` sliced ``start[d]::step[d]`` from an allocation ``step[d]`` times
    larger, dims with ``expanded[d]`` of stride 0, and ``offset`` elements before the first."""
    name: str
    perm: Tuple[int, ...]
    step: Tuple[int, ...]
    start: Tuple[int, ...]
    expanded: Tuple[bool, ...]
    offset: int


LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "expanded", "offset", "mixed")


def memory_orders(rank: int, feature_axis: int):
    """Any order, or one that real tensors have: contiguous, feature axis innermost
    (channels-last), batch innermost (a transposed (C, N) array), reversed (Fortran order)."""
    dims = tuple(range(rank))
    common = (dims, tuple(d for d in dims if d != feature_axis) + (feature_axis,), dims[1:] + (0,), dims[::-1])
    return st.one_of(st.sampled_from(common), st.permutations(dims).map(tuple))


def expansions(rank: int):
    """Stride-0 dims: one (a broadcast along one axis, the usual case) or any subset."""
    one = st.integers(0, rank - 1).map(lambda d: tuple(i == d for i in range(rank)))
    return st.one_of(one, st.lists(st.booleans(), min_size=rank, max_size=rank).map(tuple))


@st.composite
def layouts(draw, rank: int, feature_axis: int, names=LAYOUTS) -> Layout:
    """A layout of one of ``names``; "mixed" combines an order, steps, stride 0 and an offset."""
    name = draw(st.sampled_from(names))
    perm = tuple(range(rank))
    step, start, expanded, offset = (1,) * rank, (0,) * rank, (False,) * rank, 0
    if name == "channels_last":  # the feature axis innermost, the others in order
        perm = tuple(d for d in range(rank) if d != feature_axis) + (feature_axis,)
    if name in ("permuted", "expanded", "mixed"):
        perm = draw(memory_orders(rank, feature_axis))
    if name in ("sliced", "mixed"):
        step = tuple(draw(st.lists(st.sampled_from((1, 2, 3)), min_size=rank, max_size=rank)))
        if name == "sliced" and max(step) == 1:
            step = step[:-1] + (2,)
        start = tuple(draw(st.integers(0, s - 1)) for s in step)
    if name in ("expanded", "mixed"):
        expanded = draw(expansions(rank))
        if name == "expanded" and not any(expanded):
            expanded = (False,) * (rank - 1) + (True,)
    if name in ("offset", "mixed"):
        offset = draw(st.integers(1 if name == "offset" else 0, 17))
    return Layout(name, perm, step, start, expanded, offset)


def contiguous(rank: int) -> Layout:
    return Layout("contiguous", tuple(range(rank)), (1,) * rank, (0,) * rank, (False,) * rank, 0)


def base_shape(shape, layout: Layout):
    """The shape of the distinct values: 1 along stride-0 (expanded) dims."""
    return tuple(1 if e else s for s, e in zip(shape, layout.expanded))


def materialize(values: torch.Tensor, shape, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (of ``base_shape``) placed in ``layout`` and expanded to ``shape``. The rest of
    the storage is NaN (inf-free: an integer dtype gets zeros), so a read outside the view
    poisons the result."""
    rank = len(shape)
    alloc = [b * st_ for b, st_ in zip(values.shape, layout.step)]
    alloc_memory = [alloc[d] for d in layout.perm]
    fill = math.nan if dtype.is_floating_point else 0
    storage = torch.full((layout.offset + _prod(alloc_memory),), fill, dtype=dtype)
    inverse = [layout.perm.index(d) for d in range(rank)]
    logical = storage[layout.offset:].view(alloc_memory).permute(inverse)
    view = logical[tuple(slice(s0, None, st_) for s0, st_ in zip(layout.start, layout.step))]
    view.copy_(values.to(dtype))
    return view.expand(shape)


# ---------------------------------------------------------------------------------------------
# Data: per-channel flavours, non-finite values, gradients, parameters.

@dataclass(frozen=True)
class Flavour:
    """One channel's data: ``kind`` normal (mean ``center``, std ``std``), offset (the same with
    |center| >> std) or constant (every element ``center``)."""
    kind: str
    center: float
    std: float


@st.composite
def flavours(draw, dtype: torch.dtype, C: int):
    out = []
    for _ in range(C):
        kind = draw(st.sampled_from(("normal", "normal", "offset", "constant")))
        if kind == "normal":
            center = draw(st.floats(-3, 3, allow_nan=False))
            std = draw(st.sampled_from((0.5, 1.0, 3.0)))
        else:
            sign = draw(st.sampled_from((1.0, -1.0)))
            magnitude = draw(st.sampled_from((0.0, 1.0) + OFFSETS[dtype] if kind == "constant" else OFFSETS[dtype]))
            center = sign * magnitude * draw(st.sampled_from((1.0, 1.37)))
            std = 0.0 if kind == "constant" else draw(st.sampled_from((0.1, 1.0, 10.0)))
        out.append(Flavour(kind, center, std))
    return tuple(out)


def channel_data(shape, feature_axis: int, flavour_list, seed: int, nonfinite=()) -> torch.Tensor:
    """Float64 values of ``shape``, channel c (along ``feature_axis``) of ``flavour_list[c]``,
    with ``nonfinite`` (flat index mod numel, value) pairs written in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    by_channel = x.movedim(feature_axis, 0)
    for c in range(by_channel.shape[0]):  # 1 when the feature axis is expanded (stride 0)
        f = flavour_list[c]
        if f.kind == "constant":
            by_channel[c] = f.center
        else:
            by_channel[c] = by_channel[c] * f.std + f.center
    flat = x.view(-1)
    for index, value in nonfinite:
        flat[index % flat.numel()] = value
    return x


def nonfinite_values(max_count=3):
    # Mostly none: a non-finite value blanks out the numeric comparison of its channel.
    count = st.sampled_from((0, 0, 0, 0, 1, 2, max_count))
    return count.flatmap(lambda n: st.lists(st.tuples(st.integers(0, 1 << 20), st.sampled_from(NONFINITE)),
                                            min_size=n, max_size=n).map(tuple))


@dataclass(frozen=True)
class GradSpec:
    """dy: ``kind`` random (N(0, scale^2)) or constant (every element ``scale``: its sums are
    exact, and large ones overflow fp16 unless accumulated wider)."""
    kind: str
    scale: float
    layout: Layout


@st.composite
def grad_specs(draw, rank: int, feature_axis: int):
    kind = draw(st.sampled_from(("random", "random", "constant")))
    scale = draw(st.sampled_from((1.0, 30.0) if kind == "random" else (1.0, -7.0, 200.0, 1000.0)))
    return GradSpec(kind, scale, draw(layouts(rank, feature_axis, ("contiguous", "channels_last", "mixed"))))


def make_grad(spec: GradSpec, shape, feature_axis: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    base = base_shape(shape, spec.layout)
    if spec.kind == "constant":
        values = torch.full(base, spec.scale, dtype=torch.float64)
    else:
        values = torch.randn(base, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spec.scale
    return materialize(values, shape, spec.layout, dtype)


def make_params(C: int, dtype: torch.dtype, seed: int):
    """(weight, bias, running_mean, running_var): weights of both signs, positive variances."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    return u(-2.0, 2.0), u(-1.0, 1.0), u(-1.0, 1.0), u(0.5, 2.0)


@st.composite
def shapes(draw, rank: int, max_elements: int = MAX_ELEMENTS, C: Optional[int] = None):
    """(N, C, *spatial) with C first-class; the largest dims halve until within budget."""
    dims = [draw(BATCH), C if C is not None else draw(st.integers(1, 6))]
    dims += [draw(SIZES) for _ in range(rank - 2)]
    while _prod(dims) > max_elements:
        i = max((d for d in range(len(dims)) if d != 1), key=lambda d: dims[d])
        dims[i] = (dims[i] + 1) // 2
    return tuple(dims)


def with_feature_axis(canonical, axis: int):
    """(N, C, *spatial) rearranged so that C sits at ``axis``."""
    dims = [canonical[0]] + list(canonical[2:])
    dims.insert(axis, canonical[1])
    return tuple(dims)


def param_dtypes(dtype):
    # Half input runs with float32 parameters (AMP) or with its own dtype.
    return st.sampled_from((torch.float32, dtype)) if dtype in HALF else st.just(dtype)


# ---------------------------------------------------------------------------------------------
# Comparisons.

def _where(index, shape) -> str:
    return str(tuple(int(i) for i in torch.unravel_index(torch.tensor(index), shape)))


def rounding_budgets(x, dy, weight, bias, running_mean, running_var, batch_stats: bool, momentum, eps: float,
                     feature_dim: int) -> dict:
    """Per result and channel, the error that a few roundings in the accumulation dtype cause,
    in units of that dtype's epsilon; computed in float64 from the call's arguments.

    A sum or a difference that cancels is only as accurate as its operands, whatever its own
    size: each result gets ``ROUNDINGS`` roundings of its operands' size, plus
    ``MEAN_ROUNDINGS`` of the subtraction x - mean (the saved mean is itself rounded, as
    torch's is) propagated to the result:

        y      = w*xhat + b                                    xhat = (x - mean)*invstd
        dx     = w*invstd*(dy - mean(dy) - xhat*mean(dy*xhat))  (dy*w*invstd in eval)
        dw     = sum(dy*xhat),  db = sum(dy)
        running_mean = (1-m)*running_mean + m*mean(x)
        running_var: none, it is held to TOLERANCE and torch's error alone (issue 13, bug A).

    Non-finite elements are left out (their channels are compared by pattern, rule 1).
    """
    def by_channel(t):
        return t.detach().to(torch.float64).movedim(feature_dim, 0).reshape(t.shape[feature_dim], -1)

    xs, dys = by_channel(x), by_channel(dy)
    finite = xs.isfinite() & dys.isfinite()
    zero = torch.zeros((), dtype=torch.float64)
    xs, dys = torch.where(finite, xs, zero), torch.where(finite, dys, zero)
    count = finite.sum(1).clamp(min=1)
    C = xs.shape[0]
    if batch_stats:
        mean = xs.sum(1) / count
        var = torch.where(finite, (xs - mean[:, None]) ** 2, zero).sum(1) / count
    else:
        mean, var = running_mean.detach().double(), running_var.detach().double()
    invstd = 1.0 / torch.sqrt(var + eps)
    xhat = torch.where(finite, (xs - mean[:, None]) * invstd[:, None], zero)
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.detach().double().abs()
    b = torch.zeros(C, dtype=torch.float64) if bias is None else bias.detach().double().abs()
    max_xhat, max_dy, sum_dy = xhat.abs().amax(1), dys.abs().amax(1), dys.abs().sum(1)
    # The shift of x - mean from rounding its operands, in units of eps.
    shift = torch.maximum(xs.abs().amax(1), mean.abs())
    if batch_stats:
        dx_shift = w * invstd ** 2 * shift * ((dys * xhat).sum(1).abs() / count + max_xhat * dys.sum(1).abs() / count)
        dx = ROUNDINGS * w * invstd * max_dy * (2.0 + max_xhat) + MEAN_ROUNDINGS * dx_shift
    else:
        dx = ROUNDINGS * w * invstd * max_dy
    out = {"y": ROUNDINGS * (w * max_xhat + b) + MEAN_ROUNDINGS * w * invstd * shift, "dx": dx,
           "dweight": ROUNDINGS * (dys * xhat).abs().sum(1) + MEAN_ROUNDINGS * invstd * shift * sum_dy,
           "dbias": ROUNDINGS * sum_dy}
    if running_mean is not None:
        m, keep = (1.0, 1.0) if momentum is None else (abs(momentum), abs(1.0 - momentum))
        out["running_mean"] = ROUNDINGS * (keep * running_mean.detach().double().abs() + m * xs.abs().amax(1))
    return {k: v.nan_to_num(0.0, 0.0, 0.0) for k, v in out.items()}


def assert_matches(name: str, ours: torch.Tensor, ref: torch.Tensor, theirs: torch.Tensor,
                   feature_dim: int = 0, budget: Optional[torch.Tensor] = None):
    """Rules 1-3 of the module docstring for one tensor; ``feature_dim`` is its channel axis,
    ``budget`` its rounding budget per channel (``rounding_budgets``), in units of eps."""
    assert ours is not None, f"{name}: missing (torch computes one)"
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, torch gives {theirs.dtype}"
    dtype = theirs.dtype
    o, r, t = (a.detach().to(torch.float64).contiguous() for a in (ours, ref, theirs))
    if o.numel() == 0:
        return
    # Rule 1: the float64 reference's NaN and ±inf, in place. Where torch at the same dtype
    # differs (momentum 1 - 1e-16 rounds to 1 in float32, and (1 - m) * inf becomes NaN), its
    # pattern is as good: non-finite arithmetic has no rounding to be more or less accurate.
    def pattern_differs(expected):
        return (expected.isnan() & ~o.isnan()) | (expected.isinf() & (o != expected))
    missed = pattern_differs(r) & (pattern_differs(t) | t.isfinite())
    if missed.any():
        i = int(missed.view(-1).nonzero()[0])
        raise AssertionError(f"{name}: non-finite pattern differs at {_where(i, r.shape)}: got {o.view(-1)[i].item()}, "
                             f"float64 reference {r.view(-1)[i].item()}, torch {t.view(-1)[i].item()}; "
                             f"{int(missed.sum())} of {r.numel()} elements")
    compared = r.isfinite()
    if dtype in HALF:
        compared &= t.isfinite()  # torch's own fp16/bf16 overflow: see the module docstring
    # Rule 2: finite where the reference is.
    lost = compared & ~o.isfinite()
    if lost.any():
        i = int(lost.view(-1).nonzero()[0])
        raise AssertionError(f"{name}: {o.view(-1)[i].item()} at {_where(i, r.shape)} where the float64 reference is "
                             f"{r.view(-1)[i].item()} (torch {t.view(-1)[i].item()}); {int(lost.sum())} of "
                             f"{r.numel()} elements not finite")
    # Rule 3, channel by channel.
    zero = torch.zeros((), dtype=torch.float64)
    C = r.shape[feature_dim]
    by_channel = lambda a: a.movedim(feature_dim, 0).reshape(C, -1)
    err_ours = by_channel(torch.where(compared, (o - r).abs(), zero))
    err_torch = by_channel(torch.where(compared & t.isfinite(), (t - r).abs(), zero)).amax(1)
    scale = by_channel(torch.where(compared, r.abs(), zero)).amax(1).clamp(min=1.0)
    budget = torch.zeros(C, dtype=torch.float64) if budget is None else budget
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    floor = TOLERANCE[dtype] * scale + eps * budget
    allowed = torch.maximum(K_TORCH * err_torch, floor)
    worst = err_ours.amax(1)
    over = worst > allowed
    if over.any():
        c = int((worst / allowed).argmax())
        j = int(err_ours[c].argmax())
        flat = int(by_channel(torch.arange(r.numel()).view(r.shape))[c, j])
        raise AssertionError(
            f"{name}: channel {c} is off by {worst[c].item():.3e} at {_where(flat, r.shape)} (got "
            f"{o.view(-1)[flat].item():.10g}, float64 reference {r.view(-1)[flat].item():.10g}, torch "
            f"{t.view(-1)[flat].item():.10g}); allowed {allowed[c].item():.3e} = max({K_TORCH} x torch's error "
            f"{err_torch[c].item():.3e}, {TOLERANCE[dtype]:.0e} x {scale[c].item():.3g} + {eps:.1e} x rounding budget "
            f"{budget[c].item():.3g}); {int(over.sum())} of {len(over)} channels over")


def unchanged(after: Optional[torch.Tensor], before: Optional[torch.Tensor]) -> bool:
    """Equal elementwise, NaN equal to NaN."""
    if after is None or before is None:
        return after is before
    return after.shape == before.shape and after.dtype == before.dtype and \
        bool(((after == before) | (after.isnan() & before.isnan())).all())


def assert_same_error(ours: Optional[BaseException], theirs: BaseException, where: str):
    """Rule 4's first half: torch raised ``theirs``; ours must raise the same class."""
    assert ours is not None, f"{where}: torch raises {type(theirs).__name__}({theirs}), triton_bn returns a result"
    assert type(ours) is type(theirs), (f"{where}: triton_bn raises {type(ours).__name__}({ours}), "
                                        f"torch raises {type(theirs).__name__}({theirs})")


def _call(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the exception class is what is compared
        return None, e


def _leaf(t: Optional[torch.Tensor], grad: bool = True, dtype=None) -> Optional[torch.Tensor]:
    """A fresh leaf sharing ``t``'s values (and, for the input, its strides)."""
    if t is None:
        return None
    t = t.detach() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_(grad and t.is_floating_point())


def _clone(t: Optional[torch.Tensor], dtype=None) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dtype or t.dtype).clone()


def shifted(x: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """float64 ``x`` minus a per-channel pivot, the channel's median finite element (0 if none).

    Everything but running_mean is invariant under a per-channel shift, and x - pivot is exact
    in float64 for values near the pivot, so float64 on shifted data stays accurate at any
    offset; on raw data at |mean| = 1e8 its own rounding (1e-8 absolute) would be as large as
    the errors under test.
    """
    x = x.detach().to(torch.float64)
    by_channel = x.movedim(feature_dim, 0).reshape(x.shape[feature_dim], -1)
    finite = torch.where(by_channel.isfinite(), by_channel, torch.full((), math.nan, dtype=torch.float64))
    pivot = finite.nanmedian(dim=1).values.nan_to_num(0.0)
    view = [1] * x.dim()
    view[feature_dim] = -1
    return x - pivot.view(view)


# ---------------------------------------------------------------------------------------------
# The functional API: triton_bn.batch_norm(..., axis=k) vs torch.nn.functional.batch_norm.

@dataclass(frozen=True)
class Call:
    """One batch_norm call, with the seeds of its data."""
    shape: Tuple[int, ...]
    axis: int  # as passed (may be negative)
    dtype: torch.dtype
    param_dtype: torch.dtype
    layout: Layout
    flavours: tuple
    nonfinite: tuple
    grad: GradSpec
    training: bool
    weight: bool
    bias: bool
    stats: str  # both, none, mean_only, var_only
    momentum: Optional[float]
    eps: float
    seed: int
    # Deliberate faults (bad calls): (kind, detail) pairs applied after the tensors are built.
    faults: tuple = ()


MOMENTA = st.one_of(st.sampled_from((0.1, 0.0, 1.0, 0.5)), st.floats(0.0, 1.0), st.sampled_from((2.5, -0.5)))
EPSILONS = st.sampled_from((1e-5, 1e-5, 1e-3, 0.1, 1.0))


@st.composite
def calls(draw, ranks=(2, 3, 4, 5), max_elements=MAX_ELEMENTS, dtypes=DTYPES, stats=None,
          nonfinite=True, layout_names=LAYOUTS):
    rank = draw(st.sampled_from(ranks))
    canonical = draw(shapes(rank, max_elements))
    feature = draw(st.integers(1, rank - 1)) if draw(st.booleans()) else 1
    axis = feature - rank if draw(st.booleans()) else feature
    shape = with_feature_axis(canonical, feature)
    dtype = draw(st.sampled_from(dtypes))
    stats = draw(st.sampled_from(("both", "both", "none", "mean_only", "var_only"))) if stats is None else stats
    return Call(
        shape=shape, axis=axis, dtype=dtype, param_dtype=draw(param_dtypes(dtype)),
        layout=draw(layouts(rank, feature, layout_names)),
        flavours=draw(flavours(dtype, shape[feature])),
        nonfinite=draw(nonfinite_values()) if nonfinite else (),
        grad=draw(grad_specs(rank, feature)), training=draw(st.booleans()),
        weight=draw(st.booleans()), bias=draw(st.booleans()), stats=stats,
        momentum=draw(MOMENTA), eps=draw(EPSILONS), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _build(call: Call):
    feature = call.axis % len(call.shape)
    base = base_shape(call.shape, call.layout)
    values = channel_data(base, feature, call.flavours, call.seed, call.nonfinite)
    x = materialize(values, call.shape, call.layout, call.dtype)
    dy = make_grad(call.grad, call.shape, feature, call.dtype, call.seed + 1)
    w, b, rm, rv = make_params(call.shape[feature], call.param_dtype, call.seed + 2)
    args = {"input": x, "running_mean": rm if call.stats in ("both", "mean_only") else None,
            "running_var": rv if call.stats in ("both", "var_only") else None,
            "weight": w if call.weight else None, "bias": b if call.bias else None,
            "training": call.training, "momentum": call.momentum, "eps": call.eps}
    for kind, detail in call.faults:
        _apply_fault(args, kind, detail, feature, call.param_dtype)
    return args, dy


def _run_functional(fn, args, dy, dtype=None, dense=False):
    """fn(input, rm, rv, w, b, ...) on fresh leaves (cast to ``dtype`` if given; input and dy
    made contiguous if ``dense``), backward with dy.
    Returns (y, grads (dx, dweight, dbias), running_mean, running_var) or raises."""
    if dense:
        args, dy = {**args, "input": args["input"].contiguous()}, dy.contiguous()
    x = _leaf(args["input"], dtype=dtype)
    w, b = _leaf(args["weight"], dtype=dtype), _leaf(args["bias"], dtype=dtype)
    rm, rv = _clone(args["running_mean"], dtype), _clone(args["running_var"], dtype)
    y = fn(x, rm, rv, w, b, args["training"], args["momentum"], args["eps"])
    if y.requires_grad:
        y.backward(dy.to(y.dtype))
    grads = tuple(None if t is None else t.grad for t in (x, w, b))
    return y, grads, rm, rv


# torch runs on contiguous copies of the input and dy: its CPU backward misreads some layouts
# (x of shape (3, 2, 7, 1) and strides (14, 1, 2, 1) with a contiguous dy: wrong dbias, in
# float64 too), and the values batch norm computes do not depend on the layout.
TORCH_DENSE = True


def _torch_fn(axis):
    def fn(x, rm, rv, w, b, training, momentum, eps):
        return F.batch_norm(x.movedim(axis, 1), rm, rv, w, b, training, momentum, eps).movedim(1, axis)
    return fn


def _ours_fn(axis):
    def fn(x, rm, rv, w, b, training, momentum, eps):
        return triton_bn.batch_norm(x, rm, rv, w, b, training, momentum, eps, axis=axis)
    return fn


def check_call(call: Call):
    """Run ``call`` through triton_bn, torch and float64 torch and apply rules 1-4."""
    args, dy = _build(call)
    axis = call.axis % len(call.shape)
    x_before = args["input"].clone()
    theirs, torch_error = _call(lambda: _run_functional(_torch_fn(axis), args, dy, dense=TORCH_DENSE))
    ours, our_error = _call(lambda: _run_functional(_ours_fn(call.axis), args, dy))
    # The call's running statistics as passed (each run above worked on its own clones): a
    # failed call must leave them untouched, which a call on the originals checks directly.
    if torch_error is not None:
        originals = [_clone(args[k]) for k in ("running_mean", "running_var")]
        _, direct_error = _call(lambda: triton_bn.batch_norm(
            args["input"], args["running_mean"], args["running_var"], args["weight"], args["bias"],
            args["training"], args["momentum"], args["eps"], axis=call.axis))
        assert_same_error(our_error, torch_error, "batch_norm")
        assert_same_error(direct_error, torch_error, "batch_norm on the original buffers")
        if isinstance(torch_error, NotImplementedError) and "'" in str(torch_error):
            quoted = str(torch_error).split("'")[1]  # torch names the dtype, e.g. 'Long'
            assert f"'{quoted}'" in str(our_error), f"torch's message names '{quoted}': {torch_error} vs {our_error}"
        for name, before in zip(("running_mean", "running_var"), originals):
            assert unchanged(args[name], before), f"{name} changed by a failed call: {before} -> {args[name]}"
        return
    if our_error is not None:
        raise AssertionError(f"torch computes a result, triton_bn raises {type(our_error).__name__}: "
                             f"{our_error}") from our_error
    ref_raw = _run_functional(_torch_fn(axis), args, dy, dtype=torch.float64, dense=TORCH_DENSE)
    # Batch statistics are shift-invariant, the running ones are not: eval normalizes raw data.
    ref = _run_functional(_torch_fn(axis), {**args, "input": shifted(args["input"], axis)}, dy,
                          dtype=torch.float64, dense=TORCH_DENSE) if call.training else ref_raw
    assert unchanged(args["input"], x_before), "the input was written to"
    y, grads, rm, rv = ours
    y_t, grads_t, rm_t, rv_t = theirs
    y_r, grads_r, _, rv_r = ref
    budgets = rounding_budgets(args["input"], dy, args["weight"], args["bias"], args["running_mean"],
                               args["running_var"], call.training, call.momentum, call.eps, axis)
    assert_matches("y", y, y_r, y_t, axis, budgets["y"])
    for name, g, g_r, g_t, dim in zip(("dx", "dweight", "dbias"), grads, grads_r, grads_t, (axis, 0, 0)):
        if g_t is not None:
            assert_matches(name, g, g_r, g_t, dim, budgets[name])
    for name, got, want, torch_got, before in zip(("running_mean", "running_var"), (rm, rv), (ref_raw[2], rv_r),
                                                  (rm_t, rv_t), (args["running_mean"], args["running_var"])):
        if before is None:
            continue
        if not call.training:
            assert unchanged(got, before), f"{name} changed in eval mode"
        assert_matches(name, got, want, torch_got, budget=budgets.get(name))


def issue_call(shape, dtype=torch.float32, **kwargs) -> Call:
    """A plain call (contiguous N(0, 1) data, random dy, no parameters, training), changed by
    ``kwargs``: the explicit examples below, each a bug once found by differential fuzzing
    (issue 13), run first in every profile."""
    fields = dict(shape=shape, axis=1, dtype=dtype, param_dtype=torch.float32 if dtype in HALF else dtype,
                  layout=contiguous(len(shape)), flavours=(Flavour("normal", 0.0, 1.0),) * shape[1],
                  nonfinite=(), grad=GradSpec("random", 1.0, contiguous(len(shape))), training=True,
                  weight=False, bias=False, stats="none", momentum=0.1, eps=1e-5, seed=0)
    return Call(**{**fields, **kwargs})


@_budget(1.0)
@given(calls())
# B: the bias gradient with weight=None accumulated in the input's half dtype (inf for fp16).
@example(issue_call((16, 3, 40), torch.float16, bias=True, grad=GradSpec("constant", 200.0, contiguous(3))))
@example(issue_call((16, 3, 40), torch.bfloat16, bias=True))
# C: training with one running statistic: torch raises ValueError.
@example(issue_call((4, 3, 5), stats="mean_only"))
# E: +inf in a channel's first element gave a NaN running_mean (torch: inf).
@example(issue_call((300, 3), stats="both", nonfinite=((0, math.inf),)))
# F: spatial dims that merge in x but not in empty_like(x): strides (1, 0, 12, 4).
@example(issue_call((4, 2, 5, 3), layout=Layout("expanded", (2, 3, 1, 0), (1,) * 4, (0,) * 4,
                                                (False, True, False, False), 0)))
def test_batch_norm_matches_torch(call):
    check_call(call)


# ---------------------------------------------------------------------------------------------
# Bad calls: one or two faults on an otherwise valid call; torch says what the error is.

FAULTS = ("wrong_size", "one_running_stat", "integer_input", "one_value_per_channel", "bad_eps",
          "mixed_dtype", "momentum_none")


def _apply_fault(args, kind, detail, feature, param_dtype):
    x = args["input"]
    C = x.shape[feature]
    if kind == "wrong_size":
        name, delta = detail
        args[name] = torch.ones(max(0, C + delta), dtype=param_dtype)
    elif kind == "one_running_stat":
        args["running_mean" if detail else "running_var"] = None
    elif kind == "integer_input":
        args["input"] = (x.nan_to_num(0.0, 0.0, 0.0).round() if x.is_floating_point() else x).to(detail)
    elif kind == "one_value_per_channel":
        # Keep the view's strides: index 0 of every dim but the feature axis.
        args["input"] = x[tuple(slice(None) if d == feature else slice(0, 1) for d in range(x.dim()))]
        args["training"] = True
    elif kind == "bad_eps":
        args["eps"] = detail
    elif kind == "mixed_dtype":
        name, dtype = detail
        args[name] = (args[name] if args[name] is not None else torch.ones(C)).to(dtype)
    elif kind == "momentum_none":
        args["momentum"] = None


@st.composite
def faults(draw):
    kind = draw(st.sampled_from(FAULTS))
    names = ("running_mean", "running_var", "weight", "bias")
    detail = {
        "wrong_size": st.tuples(st.sampled_from(names), st.sampled_from((-1, 1, 2))),
        "one_running_stat": st.booleans(),
        "integer_input": st.sampled_from((torch.int64, torch.int32, torch.bool)),
        "one_value_per_channel": st.none(),
        "bad_eps": st.sampled_from((0.0, -1e-5, -1.0)),
        "mixed_dtype": st.tuples(st.sampled_from(names), st.sampled_from(DTYPES)),
        "momentum_none": st.none(),
    }[kind]
    return kind, draw(detail)


@st.composite
def bad_calls(draw):
    call = draw(calls(max_elements=256, nonfinite=False))
    return dataclasses.replace(call, faults=tuple(draw(st.lists(faults(), min_size=1, max_size=2))))


@_budget(2.0)
@given(bad_calls())
# D: one value per channel with a long input: torch's ValueError comes first.
@example(issue_call((1, 3), faults=(("integer_input", torch.int64),)))
# D: torch names the dtype 'Long' in its message.
@example(issue_call((4, 3), faults=(("integer_input", torch.int64),)))
def test_bad_calls_raise_like_torch(call):
    """A faulty call raises torch's exception class and changes no running statistic; a
    'fault' torch accepts (eps=0 in eval, ...) is a valid call and must match torch's result."""
    check_call(call)


# ---------------------------------------------------------------------------------------------
# Statistics at |mean| >> std, on inputs big enough to split each channel's reduction.

@st.composite
def offset_calls(draw):
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    rank = draw(st.sampled_from((2, 3, 4)))
    canonical = draw(shapes(rank, max_elements=8192))
    C = canonical[1]
    offset = draw(st.sampled_from(OFFSETS[dtype]))
    kinds = draw(st.lists(st.sampled_from(("offset", "offset", "constant")), min_size=C, max_size=C))
    signs = draw(st.lists(st.sampled_from((1.0, -1.0)), min_size=C, max_size=C))
    flavour_list = tuple(Flavour(k, s * offset * 1.37, 0.0 if k == "constant" else 1.0) for k, s in zip(kinds, signs))
    feature = draw(st.integers(1, rank - 1))
    return Call(shape=with_feature_axis(canonical, feature), axis=feature, dtype=dtype, param_dtype=dtype,
                layout=draw(layouts(rank, feature, ("contiguous", "channels_last"))), flavours=flavour_list,
                nonfinite=(), grad=GradSpec("random", 1.0, contiguous(rank)),
                training=True, weight=draw(st.booleans()), bias=draw(st.booleans()), stats="both",
                momentum=draw(st.sampled_from((1.0, 0.1))), eps=1e-5, seed=draw(st.integers(0, 2 ** 31 - 1)))


@_budget(0.3)
@given(offset_calls())
# A: the running variance at |mean| >> std, fp32 at 1e4 (64 x 4 x 32: split reductions) and
# fp64 at 1e8.
@example(issue_call((64, 4, 32), stats="both", momentum=1.0, flavours=(Flavour("offset", 1e4, 1.0),) * 4))
@example(issue_call((64, 4, 32), torch.float64, stats="both", momentum=1.0,
                    flavours=(Flavour("offset", 1e8, 1.0),) * 4))
@example(issue_call((64, 3, 16), stats="both", momentum=1.0, flavours=(Flavour("constant", 1e4 + 0.37, 0.0),) * 3))
def test_statistics_stay_accurate_at_large_offsets(call):
    """Running variance and outputs as accurate as torch's at offsets up to 1e5 (fp32) and 1e8
    (fp64), channels-first and channels-last, up to 8192 elements (several reduction splits)."""
    check_call(call)


# ---------------------------------------------------------------------------------------------
# Modules: BatchNorm1d/2d/3d against torch.nn's, BatchNorm(C, axis=k) against torch.nn's on
# the moved view. Several steps, so momentum=None's cumulative average is exercised.

TORCH_MODULE_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
OURS_BY_NAME = {"BatchNorm1d": triton_bn.BatchNorm1d, "BatchNorm2d": triton_bn.BatchNorm2d,
                "BatchNorm3d": triton_bn.BatchNorm3d}
RANKS_BY_NAME = {"BatchNorm1d": (2, 3), "BatchNorm2d": (4,), "BatchNorm3d": (5,), "BatchNorm": (2, 3, 4, 5)}


@dataclass(frozen=True)
class Step:
    """One forward and backward through a module: its mode, input and dy."""
    training: bool
    shape: Tuple[int, ...]
    layout: Layout
    flavours: tuple
    nonfinite: tuple
    grad: GradSpec
    seed: int


@dataclass(frozen=True)
class ModuleCase:
    """A module, its options and parameter seed, and the steps run through it."""
    name: str  # BatchNorm1d/2d/3d or BatchNorm (axis)
    axis: int
    C: int
    dtype: torch.dtype
    param_dtype: torch.dtype
    weight: bool  # affine for BatchNorm*d: weight == bias
    bias: bool
    track_running_stats: bool
    momentum: Optional[float]
    eps: float
    steps: tuple
    seed: int


@st.composite
def module_cases(draw):
    name = draw(st.sampled_from(("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNorm", "BatchNorm")))
    rank = draw(st.sampled_from(RANKS_BY_NAME[name]))
    feature = draw(st.integers(1, rank - 1)) if name == "BatchNorm" else 1
    axis = feature - rank if name == "BatchNorm" and draw(st.booleans()) else feature
    C = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    weight = draw(st.booleans())
    bias = draw(st.booleans()) if name == "BatchNorm" else weight
    steps = []
    for _ in range(draw(st.integers(2, 3))):
        canonical = draw(shapes(rank, max_elements=1024, C=C))
        if draw(st.integers(0, 9)) == 0:  # one value per channel: torch raises in training
            canonical = (1, C) + (1,) * (rank - 2)
        shape = with_feature_axis(canonical, feature)
        steps.append(Step(draw(st.sampled_from((True, True, False))), shape, draw(layouts(rank, feature)),
                          draw(flavours(dtype, C)), draw(nonfinite_values(1)), draw(grad_specs(rank, feature)),
                          draw(st.integers(0, 2 ** 31 - 1))))
    return ModuleCase(name, axis, C, dtype, draw(param_dtypes(dtype)), weight, bias, draw(st.booleans()),
                      draw(st.one_of(st.none(), MOMENTA)), draw(EPSILONS), tuple(steps),
                      draw(st.integers(0, 2 ** 31 - 1)))


def _modules(case: ModuleCase):
    """(ours, torch at the case's dtype, torch in float64 fed shifted data, torch in float64 fed
    raw data (for running_mean only)), with the same random state."""
    rank = len(case.steps[0].shape)
    kwargs = dict(eps=case.eps, momentum=case.momentum, track_running_stats=case.track_running_stats,
                  dtype=case.param_dtype)
    if case.name == "BatchNorm":
        ours = triton_bn.BatchNorm(case.C, axis=case.axis, center=case.bias, scale=case.weight, **kwargs)
    else:
        ours = OURS_BY_NAME[case.name](case.C, affine=case.weight, **kwargs)
    theirs = TORCH_MODULE_BY_RANK[rank](case.C, affine=case.weight or case.bias, **kwargs)
    if theirs.affine:  # BatchNorm's center/scale: the missing one is None in torch's forward too
        if not case.weight:
            theirs.weight = None
        if not case.bias:
            theirs.bias = None
    w, b, rm, rv = make_params(case.C, case.param_dtype, case.seed)
    with torch.no_grad():
        for module in (ours, theirs):
            for t, value in ((module.weight, w), (module.bias, b), (module.running_mean, rm), (module.running_var, rv)):
                if t is not None:
                    t.copy_(value)
    return ours, theirs, copy.deepcopy(theirs).double(), copy.deepcopy(theirs).double()


def _module_step(module, x, dy, training, axis, dtype=None, dense=False):
    if dense:
        x, dy = x.contiguous(), dy.contiguous()
    module.train(training)
    for p in module.parameters():
        p.grad = None
    x = _leaf(x, dtype=dtype)
    y = module(x) if axis is None else module(x.movedim(axis, 1)).movedim(1, axis)
    y.backward(dy.to(y.dtype))
    return y, x.grad


def check_module_case(case: ModuleCase):
    ours, theirs, ref, ref_raw = _modules(case)
    for i, step in enumerate(case.steps):
        where = f"step {i}"
        feature = case.axis % len(step.shape)
        values = channel_data(base_shape(step.shape, step.layout), feature, step.flavours, step.seed, step.nonfinite)
        x = materialize(values, step.shape, step.layout, case.dtype)
        dy = make_grad(step.grad, step.shape, feature, case.dtype, step.seed + 1)
        buffers_before = [_clone(t) for t in (ours.running_mean, ours.running_var)]
        torch_out, torch_error = _call(lambda: _module_step(theirs, x, dy, step.training, feature, dense=TORCH_DENSE))
        ours_out, our_error = _call(lambda: _module_step(ours, x, dy, step.training,
                                                         None if case.name == "BatchNorm" else feature))
        if torch_error is not None:
            assert_same_error(our_error, torch_error, where)
            for name, before in zip(("running_mean", "running_var"), buffers_before):
                assert unchanged(getattr(ours, name), before), f"{where}: {name} changed by a failed call"
            # torch counted the failed call; triton_bn deliberately does not. Align the torch
            # modules' counters so later steps (momentum=None) compare like with like.
            for module in (theirs, ref, ref_raw):
                if module.num_batches_tracked is not None:
                    module.num_batches_tracked.copy_(ours.num_batches_tracked)
            continue
        if our_error is not None:
            raise AssertionError(f"{where}: torch computes a result, triton_bn raises "
                                 f"{type(our_error).__name__}: {our_error}") from our_error
        batch_stats = step.training or not case.track_running_stats
        budgets = rounding_budgets(x, dy, theirs.weight, theirs.bias, ref_raw.running_mean, ref_raw.running_var,
                                   batch_stats, case.momentum, case.eps, feature)
        # Batch statistics are shift-invariant, the running ones are not: eval normalizes raw data.
        # ``ref``'s running_mean holds shifted means; running_mean comes from ``ref_raw``.
        ref_y, ref_dx = _module_step(ref, shifted(x, feature), dy, step.training, feature, dense=TORCH_DENSE)
        raw_y, raw_dx = _module_step(ref_raw, x, dy, step.training, feature, dtype=torch.float64, dense=TORCH_DENSE)
        params_ref = ref if batch_stats else ref_raw
        if not batch_stats:
            ref_y, ref_dx = raw_y, raw_dx
        (y, dx), (y_t, dx_t) = ours_out, torch_out
        assert_matches(f"{where} y", y, ref_y, y_t, feature, budgets["y"])
        assert_matches(f"{where} dx", dx, ref_dx, dx_t, feature, budgets["dx"])
        for name in ("weight", "bias"):
            if getattr(theirs, name) is not None:
                assert_matches(f"{where} d{name}", getattr(ours, name).grad, getattr(params_ref, name).grad,
                               getattr(theirs, name).grad, budget=budgets[f"d{name}"])
        for name, reference in (("running_mean", ref_raw), ("running_var", ref)):
            if getattr(theirs, name) is not None:
                assert_matches(f"{where} {name}", getattr(ours, name), getattr(reference, name), getattr(theirs, name),
                               budget=budgets.get(name))
        if theirs.num_batches_tracked is not None:
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked), \
                f"{where}: num_batches_tracked {int(ours.num_batches_tracked)} != {int(theirs.num_batches_tracked)}"


@_budget(0.5)
@given(module_cases())
def test_modules_match_torch(case):
    check_module_case(case)
