"""Property-based tests, part 2: the oracle. Runs a drawn call through triton_bn, torch at the
same dtypes, and float64 torch, and applies the rules of tests/test_properties.py."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

import triton_bn
from tests.reference import TOLERANCE
from tests.property_calls import (
    Call,
    HALF,
    _build,
)

# Ours may be this many times further from float64 than torch at the same dtype...
K_TORCH = 4
# ... or within a budget of roundings in the accumulation dtype (``rounding_budgets``): torch on
# the CPU accumulates in float64, and is exact where cancellation makes any float32 order
# inexact, or lucky where its saved mean happens to round well.
ROUNDINGS = 16  # of each result's operands
MEAN_ROUNDINGS = 2  # of x - mean: the saved mean's rounding and the subtraction's

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
        # Where dy's sums are exact (constant or few-bit dy) mean(dy) rounds once and dy - mean(dy)
        # is exact where they are close: dx = w*invstd*(dy - mean(dy) - ...) owes nothing to |dy|
        # itself. This is what catches a*dy - a*mean(dy) cancelling on a near-constant channel
        # (invstd ~ 1/sqrt(eps)) and leaving the roundings of its two large terms.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean_dy = dys.sum(1) / count
        mean_rounding = (mean_dy.to(acc).double() - mean_dy).abs() / torch.finfo(acc).eps
        centred = torch.where(finite, dys - mean_dy[:, None], zero).abs().amax(1)
        conditioned = (ROUNDINGS * w * invstd * (centred + max_dy * max_xhat)
                       + MEAN_ROUNDINGS * (w * invstd * mean_rounding + dx_shift))
        dx = torch.where(exact_sums(dys, acc), conditioned, dx)
    else:
        dx = ROUNDINGS * w * invstd * max_dy
    out = {"y": ROUNDINGS * (w * max_xhat + b) + MEAN_ROUNDINGS * w * invstd * shift, "dx": dx,
           "dweight": ROUNDINGS * (dys * xhat).abs().sum(1) + MEAN_ROUNDINGS * invstd * shift * sum_dy,
           "dbias": ROUNDINGS * sum_dy}
    if running_mean is not None:
        m, keep = (1.0, 1.0) if momentum is None else (abs(momentum), abs(1.0 - momentum))
        out["running_mean"] = ROUNDINGS * (keep * running_mean.detach().double().abs() + m * xs.abs().amax(1))
    return {k: v.nan_to_num(0.0, 0.0, 0.0) for k, v in out.items()}


def exact_sums(values: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Per row of float64 ``values``: whether every sum of them is exact in ``acc``, in any order:
    all are multiples of q, the smallest lowest set bit among them, and the sum of their
    magnitudes stays below 2^digits(acc) q."""
    mantissa, exponent = torch.frexp(values)
    bits = (mantissa * 2.0 ** 53).to(torch.int64)
    lowest = torch.ldexp((bits & -bits).abs().double(), exponent - 53)
    q = torch.where(values != 0, lowest, torch.full((), math.inf, dtype=torch.float64)).amin(1)
    return (values.abs().sum(1) < q / torch.finfo(acc).eps * 2.0) | q.isinf()


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
