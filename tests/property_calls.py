"""Property-based tests, part 1: drawing batch-norm calls (shapes, layouts, data, faults).

See tests/test_properties.py for the rules these calls are checked against."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from hypothesis import settings
from hypothesis import strategies as st

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
    """dy: ``kind`` random (N(0, scale^2)), constant (every element ``scale``: its sums are
    exact, and large ones overflow fp16 unless accumulated wider), per_channel (channel c all
    ``scale * CHANNEL_GRADS[c % 4]``) or near_constant (that times 1 + k/8, k in {-1, 0, 1} per
    element: few bits, so the sums stay exact while dy - mean(dy) is small against dy)."""
    kind: str
    scale: float
    layout: Layout


@st.composite
def grad_specs(draw, rank: int, feature_axis: int):
    kind = draw(st.sampled_from(("random", "random", "constant")))
    scale = draw(st.sampled_from((1.0, 30.0) if kind == "random" else (1.0, -7.0, 200.0, 1000.0)))
    return GradSpec(kind, scale, draw(layouts(rank, feature_axis, ("contiguous", "channels_last", "mixed"))))


CHANNEL_GRADS = (1.0, -0.75, 0.375, -1.25)


def make_grad(spec: GradSpec, shape, feature_axis: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    base = base_shape(shape, spec.layout)
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "constant":
        values = torch.full(base, spec.scale, dtype=torch.float64)
    elif spec.kind in ("per_channel", "near_constant"):
        view = [1] * len(base)
        view[feature_axis] = base[feature_axis]
        per_channel = torch.tensor([CHANNEL_GRADS[c % 4] for c in range(base[feature_axis])], dtype=torch.float64)
        values = (spec.scale * per_channel.view(view)).expand(base).clone()
        if spec.kind == "near_constant":
            values *= 1.0 + torch.randint(-1, 2, base, generator=g).double() / 8
    else:
        values = torch.randn(base, generator=g, dtype=torch.float64) * spec.scale
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


@st.composite
def degenerate_calls(draw):
    """Training calls with near-constant channels (issue 18): constant x, so invstd ~ 1/sqrt(eps),
    beside normal ones, and dy constant or nearly so per channel, in any layout, stride 0 too."""
    call = draw(calls(dtypes=(torch.float32, torch.float16, torch.bfloat16), nonfinite=False,
                      stats=draw(st.sampled_from(("none", "both"))),
                      layout_names=("contiguous", "channels_last", "expanded", "mixed")))
    rank, feature = len(call.shape), call.axis % len(call.shape)
    constant = st.sampled_from((0.0, 1.0, -3.0, 1.37, 100.0)).map(lambda v: Flavour("constant", v, 0.0))
    kinds = st.one_of(constant, constant, st.just(Flavour("normal", 0.5, 1.0)))
    grad = GradSpec(draw(st.sampled_from(("constant", "per_channel", "near_constant"))),
                    draw(st.sampled_from((1.0, -7.0, 200.0, 1000.0))),
                    draw(layouts(rank, feature, ("contiguous", "channels_last", "expanded", "mixed"))))
    return dataclasses.replace(call, flavours=tuple(draw(st.lists(kinds, min_size=call.shape[feature],
                                                                    max_size=call.shape[feature]))),
                               grad=grad, training=True, eps=draw(st.sampled_from((1e-5, 1e-3))))


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


def issue_call(shape, dtype=torch.float32, **kwargs) -> Call:
    """A plain call (contiguous N(0, 1) data, random dy, no parameters, training), changed by
    ``kwargs``: the explicit examples below, each a bug once found by differential fuzzing
    (issue 13), run first in every profile."""
    fields = dict(shape=shape, axis=1, dtype=dtype, param_dtype=torch.float32 if dtype in HALF else dtype,
                  layout=contiguous(len(shape)), flavours=(Flavour("normal", 0.0, 1.0),) * shape[1],
                  nonfinite=(), grad=GradSpec("random", 1.0, contiguous(len(shape))), training=True,
                  weight=False, bias=False, stats="none", momentum=0.1, eps=1e-5, seed=0)
    return Call(**{**fields, **kwargs})


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
