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

Kernel path: calls whose slabs fit on chip would all take the on-chip kernels
(kernels/onchip.py); the parity of each call's seed picks the path instead (even: on chip
where it fits, odd: the split path), so both are fuzzed at no extra cost.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import triton_bn
from triton_bn.kernels.tuning import use_onchip


from tests.property_calls import (
    Call,
    DTYPES,
    EPSILONS,
    Flavour,
    GradSpec,
    Layout,
    MOMENTA,
    OFFSETS,
    _budget,
    bad_calls,
    base_shape,
    calls,
    channel_data,
    contiguous,
    degenerate_calls,
    flavours,
    grad_specs,
    issue_call,
    layouts,
    make_grad,
    make_params,
    materialize,
    nonfinite_values,
    param_dtypes,
    shapes,
    with_feature_axis,
)
from tests.property_oracle import (
    TORCH_DENSE,
    _call,
    _clone,
    _leaf,
    assert_matches,
    assert_same_error,
    check_call,
    rounding_budgets,
    shifted,
    unchanged,
)

def _path_of(seed: int):
    """The kernel path of a drawn call (module docstring): on chip for even seeds."""
    return use_onchip(seed % 2 == 0)


# NaN/inf data makes the interpreter's numpy ops warn; the results are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


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
    with _path_of(call.seed):
        check_call(call)


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


_CONSTANT_X = (Flavour("constant", 1.37, 0.0), Flavour("normal", 0.0, 1.0), Flavour("constant", -3.0, 0.0))


@_budget(0.3)
@given(degenerate_calls())
# dx = a*dy - a*mean(dy) cancelled on constant channels: 1-2 ulps of a*dy left (issue 18, item 5).
@example(issue_call((16, 3, 40), torch.float16, weight=True, flavours=_CONSTANT_X,
                    grad=GradSpec("constant", 200.0, contiguous(3))))
@example(issue_call((16, 3, 40), torch.float32, flavours=_CONSTANT_X, seed=1,
                    grad=GradSpec("near_constant", 1000.0, contiguous(3))))
@example(issue_call((9, 3, 5, 7), torch.float16, weight=True, flavours=_CONSTANT_X, seed=1,
                    layout=Layout("expanded", (0, 2, 3, 1), (1,) * 4, (0,) * 4, (True, False, False, False), 0),
                    grad=GradSpec("per_channel", 200.0, contiguous(4))))
def test_dx_on_near_constant_channels(call):
    """Constant channels (invstd ~ 1/sqrt(eps)) with dy constant or nearly so: dy's sums are exact,
    so the rounding budget of dx is that of dy - mean(dy), not of |dy| (rounding_budgets)."""
    with _path_of(call.seed):
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
    with _path_of(call.seed):
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
    with _path_of(case.steps[0].seed):
        check_module_case(case)
