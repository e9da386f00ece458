"""Layer 2: triton_bn.batch_norm against torch's float64 batch_norm, and its argument checks."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import triton_bn
import triton_bn.functional as functional
from tests.reference import assert_close, assert_no_host_sync, random_input, reference_batch_norm
from triton_bn.compat import TORCH
from triton_bn.kernels.tuning import use_onchip

SHAPES_LAYOUTS = [
    ((4, 5, 6, 7), "contiguous"),
    ((4, 5, 6, 7), "channels_last"),
    ((30, 17), "contiguous"),  # BatchNorm1d (N, C)
    ((5, 3, 41), "contiguous"),  # BatchNorm1d (N, C, L)
    ((2, 3, 3, 4, 5), "channels_last"),  # BatchNorm3d channels_last_3d
    ((3, 4, 5, 6), "strided"),
    ((1, 3, 9, 11), "contiguous"),  # N = 1, spatial > 1
]
# (input dtype, parameter dtype): plain, AMP (half input, fp32 params) and all-half.
DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.float64, torch.float64),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
]


def _params(C, dtype, device, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda scale, shift: (torch.rand(C, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)
    weight = make(1.5, 0.25).requires_grad_() if affine else None
    bias = make(2.0, -1.0).requires_grad_() if affine else None
    return weight, bias, make(2.0, -1.0), make(1.0, 0.5)


def _run(x, rm, rv, w, b, training, momentum, eps, dy):
    x = x.detach().requires_grad_()
    y = triton_bn.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    y.backward(dy)
    return y, (x.grad, None if w is None else w.grad, None if b is None else b.grad)


@pytest.mark.parametrize("shape,layout", SHAPES_LAYOUTS)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_float64(shape, layout, dtype, param_dtype, training, device, either_path):
    x = random_input(shape, dtype, device, layout, seed=1, mean=0.5, std=2.0)
    dy = random_input(shape, dtype, device, layout, seed=2)
    w, b, rm, rv = _params(shape[1], param_dtype, device)
    ref_y, ref_rm, ref_rv, ref_grads = reference_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, dy)
    y, grads = _run(x, rm, rv, w, b, training, 0.1, 1e-5, dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref_y, dtype, "y")
    assert_close(rm, ref_rm, param_dtype, "running_mean")
    assert_close(rv, ref_rv, param_dtype, "running_var")
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert got.dtype == (dtype if name == "dx" else param_dtype)
        # Parameter grads are sums over M elements: their scale grows with M, so does the error.
        assert_close(got, want, dtype, name)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("tracked", [True, False])
def test_affine_and_running_stats_optional(affine, tracked, device):
    x = random_input((6, 4, 5, 3), torch.float32, device, seed=3)
    dy = random_input((6, 4, 5, 3), torch.float32, device, seed=4)
    w, b, rm, rv = _params(4, torch.float32, device, affine)
    rm, rv = (rm, rv) if tracked else (None, None)
    ref_y, ref_rm, ref_rv, ref_grads = reference_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, dy)
    y, grads = _run(x, rm, rv, w, b, True, 0.1, 1e-5, dy)
    assert_close(y, ref_y, torch.float32, "y")
    assert_close(grads[0], ref_grads[0], torch.float32, "dx")
    if tracked:
        assert_close(rm, ref_rm, torch.float32, "running_mean")
        assert_close(rv, ref_rv, torch.float32, "running_var")


def test_weight_without_bias_and_bias_without_weight(device):
    x = random_input((5, 3, 8), torch.float32, device, seed=5)
    dy = random_input((5, 3, 8), torch.float32, device, seed=6)
    w, b, _, _ = _params(3, torch.float32, device)
    for weight, bias in ((w, None), (None, b)):
        ref_y, _, _, ref_grads = reference_batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5, dy)
        y, grads = _run(x, None, None, weight, bias, True, 0.1, 1e-5, dy)
        assert_close(y, ref_y, torch.float32, "y")
        for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
            if want is not None:
                assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.37, 2.5, -0.5])
def test_any_momentum_torch_accepts(momentum, device):
    x = random_input((4, 3, 5), torch.float32, device, seed=7, mean=2.0)
    _, _, rm, rv = _params(3, torch.float32, device)
    _, ref_rm, ref_rv, _ = reference_batch_norm(x, rm, rv, None, None, True, momentum, 1e-5)
    triton_bn.batch_norm(x, rm, rv, training=True, momentum=momentum)
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")


def test_large_mean_small_std_stays_accurate(device):
    """x = 1e4 + randn: normalized output and grads keep fp32 accuracy."""
    x = random_input((8, 3, 16, 16), torch.float32, device, seed=8, mean=1e4, std=1.0)
    dy = random_input((8, 3, 16, 16), torch.float32, device, seed=9)
    _, _, rm, rv = _params(3, torch.float32, device)
    ref_y, ref_rm, ref_rv, ref_grads = reference_batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, dy)
    y, grads = _run(x, rm, rv, None, None, True, 0.1, 1e-5, dy)
    # save_mean is float32 (as in torch): at 1e4 its half-ulp, 5e-4, bounds the accuracy of x - mean.
    assert_close(y, ref_y, name="y", tol=3e-4)
    assert_close(rm, ref_rm, name="running_mean", tol=1e-7)
    assert_close(rv, ref_rv, name="running_var", tol=1e-5)
    assert_close(grads[0], ref_grads[0], name="dx", tol=3e-4)


def test_eval_with_eps_zero(device):
    """eps = 0 is allowed in eval on every torch (torch 2.11 refuses it: the reference is computed
    here, not by torch's batch_norm)."""
    x = random_input((4, 3, 5), torch.float32, device, seed=10)
    _, _, rm, rv = _params(3, torch.float32, device)
    x64, rm64, rv64 = (t.double() for t in (x, rm, rv))
    ref_y = (x64 - rm64[None, :, None]) / rv64[None, :, None].sqrt()
    assert_close(triton_bn.batch_norm(x, rm, rv, eps=0.0), ref_y, torch.float32, "y")


# triton_bn's eps rule on every torch: torch 2.12 - 2.15's (torch 2.9 checks no eps; 2.11
# refuses eps <= 0 in eval too, with another message).
EPS_CASES = [(True, 0.0, "batch_norm eps must be positive during training, but got 0.0"),
             (True, -1.0, "batch_norm eps must be positive during training, but got -1.0"),
             (False, -1.0, "batch_norm eps must be non-negative, but got -1.0"),
             (False, 0.0, None), (True, 1e-5, None)]


def _torch_has_the_eps_rule() -> bool:
    """Whether the installed torch's batch_norm refuses eps as triton_bn does."""
    x, rm, rv = torch.randn(2, 1), torch.zeros(1), torch.ones(1)
    for training, eps, message in EPS_CASES:
        try:
            F.batch_norm(x, rm.clone(), rv.clone(), training=training, eps=eps)
        except ValueError as error:
            if str(error) != message:
                return False
        else:
            if message is not None:
                return False
    return True


@pytest.mark.parametrize("training, eps, message", EPS_CASES)
def test_eps_rule_is_the_same_on_every_torch(training, eps, message, device):
    x = random_input((4, 3, 5), torch.float32, device, seed=10)
    _, _, rm, rv = _params(3, torch.float32, device)
    if message is None:
        assert torch.isfinite(triton_bn.batch_norm(x, rm, rv, training=training, eps=eps)).all()
        return
    with pytest.raises(ValueError) as ours:
        triton_bn.batch_norm(x, rm, rv, training=training, eps=eps)
    assert str(ours.value) == message
    module = triton_bn.BatchNorm1d(3, eps=eps).to(device).train(training)
    with pytest.raises(ValueError, match="batch_norm eps must be"):
        module(x)


def test_eps_rule_is_the_newest_torchs():
    """The rule is torch's where torch has it (2.12 and later); checked against torch there."""
    if TORCH[:2] < (2, 12):
        pytest.skip(f"torch {torch.__version__} has another eps rule (triton_bn keeps 2.12's)")
    assert _torch_has_the_eps_rule()


@pytest.mark.parametrize("shape", [(0,), (0, 3, 4), (0, 3), (2, 3, 0)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_input_matches_torch(shape, training, device):
    C = shape[1] if len(shape) > 1 else 0
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.rand(C, device=device, requires_grad=True)
    b = torch.rand(C, device=device, requires_grad=True)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    try:
        ref = F.batch_norm(x.detach(), rm0.clone(), rv0.clone(), w.detach(), b.detach(), training)
    except Exception as theirs:  # e.g. torch's eval of (0,) with 0-element weights: same error
        with pytest.raises(type(theirs)):
            triton_bn.batch_norm(x, rm, rv, w, b, training)
        return
    y = triton_bn.batch_norm(x, rm, rv, w, b, training)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    y.sum().backward()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "an empty batch must not move the running stats"
    assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape


def _bad_calls(device):
    x = torch.randn(4, 3, 5, device=device)
    rm, rv, w = torch.zeros(3, device=device), torch.ones(3, device=device), torch.ones(3, device=device)
    return [
        ((torch.randn(1, 3, device=device), rm, rv), {"training": True}, ValueError, "Expected more than 1 value per channel when training"),
        ((torch.randn(1, 3, 1, device=device), rm, rv), {"training": True}, ValueError, "more than 1 value per channel"),
        ((x, torch.zeros(4, device=device), rv), {"training": True}, RuntimeError, "running_mean should contain 3 elements not 4"),
        ((x, rm, torch.ones(2, device=device)), {"training": True}, RuntimeError, "running_var should contain 3 elements not 2"),
        ((x, rm, rv, torch.ones(4, device=device)), {"training": True}, RuntimeError, "weight should contain 3 elements not 4"),
        ((x, rm, rv, None, torch.ones(5, device=device)), {"training": True}, RuntimeError, "bias should contain 3 elements not 5"),
        ((x, None, None), {"training": False}, RuntimeError, "running_mean must be defined in evaluation mode"),
        ((x, rm, None), {"training": False}, RuntimeError, "running_var must be defined in evaluation mode"),
        ((x.long(), rm, rv), {"training": True}, NotImplementedError, "not implemented for"),
        ((x, rm, rv), {"training": True, "eps": 0.0}, ValueError, "eps must be positive during training"),
        ((x, rm, rv), {"training": False, "eps": -1.0}, ValueError, "eps must be non-negative"),
        ((x, rm.half(), rv), {"training": True}, RuntimeError, "mixed dtype"),
        ((x.double(), rm, rv, w.double()), {"training": True}, RuntimeError, "mixed dtype"),
        ((x.half(), rm.double(), rv.double()), {"training": True}, RuntimeError, "mixed dtype"),
        ((x, rm, rv), {"training": True, "momentum": None}, TypeError, "momentum"),
        # Issue 13 C: one running statistic without the other, in training.
        ((x, rm, None), {"training": True}, ValueError, "running_mean and running_var must either both be None"),
        ((x, None, rv), {"training": True}, ValueError, "running_mean and running_var must either both be None"),
        # Issue 13 D: torch checks the count before the dtype, and names the dtype as C++ does.
        ((torch.ones(1, 3, dtype=torch.long, device=device), None, None), {"training": True}, ValueError,
         "more than 1 value per channel"),
        ((x.long(), None, None), {"training": True}, NotImplementedError, "not implemented for 'Long'"),
        ((x.to(torch.int32), rm, rv), {"training": False}, NotImplementedError, "not implemented for 'Int'"),
        ((x.long(), rm, torch.ones(2, device=device)), {"training": True}, RuntimeError,
         "running_var should contain 3 elements not 2"),
        ((x, rm, None, torch.ones(4, device=device)), {"training": False}, RuntimeError,
         "running_var must be defined in evaluation mode"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))))
def test_bad_input_raises_before_any_buffer_changes(case, device, monkeypatch):
    args, kwargs, error, message = _bad_calls(device)[case]
    buffers = [a.clone() for a in args[1:] if a is not None]
    called = []
    monkeypatch.setattr(functional, "bn_forward_train", lambda *a, **k: called.append(1))
    monkeypatch.setattr(functional, "bn_forward_eval", lambda *a, **k: called.append(1))
    with pytest.raises(error, match=message):
        triton_bn.batch_norm(*args, **kwargs)
    assert not called, "a kernel was launched before the argument checks"
    for before, after in zip(buffers, [a for a in args[1:] if a is not None]):
        assert torch.equal(before, after)


def test_errors_match_torch_where_torch_raises(device):
    same_eps_rule = _torch_has_the_eps_rule()
    for args, kwargs, error, message in _bad_calls(device):
        if "eps" in message and not same_eps_rule:  # triton_bn's eps rule is torch 2.12's on every torch
            continue
        with pytest.raises(error, match=message) as ours:
            triton_bn.batch_norm(*args, **kwargs)
        with pytest.raises(Exception) as theirs:
            F.batch_norm(*args, **kwargs)
        assert type(theirs.value) is type(ours.value), (theirs.value, ours.value)
        if "mixed dtype" not in message and "device" not in message:  # torch's wording differs there
            assert str(theirs.value).split(" (position")[0] == str(ours.value).split(" (position")[0]


def test_grads_are_bitwise_deterministic(device):
    x = random_input((5, 6, 7, 8), torch.float32, device, "channels_last", seed=11)
    dy = random_input((5, 6, 7, 8), torch.float32, device, "channels_last", seed=12)
    w, b, _, _ = _params(6, torch.float32, device)
    runs = [_run(x, None, None, w, b, True, 0.1, 1e-5, dy) for _ in range(2)]
    for t in runs:
        w.grad = b.grad = None
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_axis_keyword_is_the_feature_axis(device):
    x = random_input((4, 6, 5), torch.float32, device, seed=14)  # (N, L, C) features last
    ref = F.batch_norm(x.transpose(1, 2).double(), None, None, training=True).transpose(1, 2)
    y = triton_bn.batch_norm(x, None, None, training=True, axis=-1)
    assert_close(y, ref, torch.float32, "y")
    assert y.is_contiguous()
    with pytest.raises(IndexError, match="axis 3 is out of range"):
        triton_bn.batch_norm(x, None, None, training=True, axis=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronization is a CUDA notion")
def test_no_host_sync_in_forward_backward(device):
    x = random_input((8, 16, 14, 14), torch.float16, device, "channels_last", seed=15).requires_grad_()
    m = triton_bn.BatchNorm2d(16, momentum=None).to(device)
    assert_no_host_sync(lambda: m(x).float().sum().backward())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback without the interpreter")
def test_cpu_tensors_fall_back_to_torch_without_interpreter():
    code = ("import torch, triton_bn, triton_bn.functional as f\n"
            "x = torch.randn(4, 3, 5)\n"
            "assert not f.uses_kernels(x)\n"
            "y = triton_bn.batch_norm(x, None, None, training=True)\n"
            "assert torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [False, True])
def test_parameter_grads_take_the_parameter_dtype(dtype, with_weight, device):
    """Issue 13 B: half input with fp32 parameters (AMP) -> fp32 dgamma/dbeta, also with no weight.
    Σ dy = 200 * 640 = 128000 overflows fp16 (max 65504) and rounds in bf16."""
    x = random_input((16, 3, 40), dtype, device, seed=40)
    b = torch.zeros(3, device=device, requires_grad=True)
    w = torch.ones(3, device=device, requires_grad=True) if with_weight else None
    y = triton_bn.batch_norm(x, None, None, w, b, True)
    y.backward(torch.full_like(y, 200.0))
    assert b.grad.dtype == torch.float32
    assert torch.equal(b.grad, torch.full((3,), 128000.0, device=device)), b.grad
    if with_weight:
        assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_non_dense_input_whose_empty_like_does_not_merge(device):
    """Issue 13 F: strides (1, 0, 12, 4): x's spatial dims merge, empty_like(x)'s did not."""
    base = random_input((5, 1, 3, 4), torch.float32, device, seed=41)
    x = base.permute(3, 1, 0, 2).expand(4, 2, 5, 3).requires_grad_()
    assert x.stride() == (1, 0, 12, 4)
    dy = random_input((4, 2, 5, 3), torch.float32, device, seed=42)
    y = triton_bn.batch_norm(x, None, None, training=True)
    y.backward(dy)
    y_ref, _, _, (dx_ref, _, _) = reference_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, dx_ref, torch.float32, "dx")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("position", [0, 150, 299])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("layout", ["nc", "channels_last", "contiguous"])
@pytest.mark.parametrize("onchip", [True, False], ids=["onchip", "split"])
def test_non_finite_values_propagate_like_torch_wherever_they_sit(position, value, layout, onchip, device):
    """Issue 13 E: mean = +-inf/NaN and var = NaN as torch's, whatever the position (an inf in
    the first element used to give a NaN mean)."""
    if layout == "nc":
        x = random_input((300, 3), torch.float32, "cpu", seed=43)
        x[position, 0] = value
    else:
        x = random_input((12, 3, 5, 5), torch.float32, "cpu", layout, seed=43)
        x.as_strided((x.numel(),), (1,))[position] = value  # some element, in storage order
    channel = [c for c in range(3) if not torch.isfinite(x[:, c]).all()]
    results = []
    for fn, dev in ((F.batch_norm, "cpu"), (triton_bn.batch_norm, device)):
        rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
        with use_onchip(onchip):
            y = fn(x.to(dev), rm, rv, None, None, True, 1.0, 1e-5)
        results.append((y.cpu(), rm.cpu(), rv.cpu()))
    (y_t, rm_t, rv_t), (y_o, rm_o, rv_o) = results
    for name, ours, theirs in (("running_mean", rm_o, rm_t), ("running_var", rv_o, rv_t), ("y", y_o, y_t)):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), f"{name}: NaN pattern {ours} vs {theirs}"
        finite = torch.isfinite(theirs)
        assert torch.equal(ours[~finite & ~torch.isnan(theirs)], theirs[~finite & ~torch.isnan(theirs)]), name
    assert channel and torch.isnan(rv_o[channel[0]])


@pytest.mark.parametrize("offset,dtype,layout", [(1e3, torch.float32, "contiguous"), (1e4, torch.float32, "contiguous"),
                                                 (1e5, torch.float32, "contiguous"), (1e5, torch.float32, "channels_last"),
                                                 (1e8, torch.float64, "contiguous"), (1e8, torch.float64, "channels_last")])
@pytest.mark.parametrize("splits", [None, 5])
def test_variance_error_does_not_grow_with_the_offset(offset, dtype, layout, splits, device):
    """Issue 13 A: running_var's error against float64 is at most torch's at offsets up to 1e5
    (fp32) and 1e8 (fp64), on the split path; a constant channel gives variance 0 exactly."""
    x = random_input((16, 4, 8, 8), dtype, "cpu", layout, seed=44, mean=offset)
    x[:, 3] = offset  # a constant channel
    # Exact reference: x - x0 is exact (Sterbenz), so the float64 variance of it is too.
    shifted = (x.double() - x.double().flatten()[0]).transpose(0, 1).reshape(4, -1)
    ref_var = shifted.var(1)
    errors = []
    for run in ("torch", "ours"):
        rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
        if run == "torch":
            F.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
        else:
            from triton_bn.kernels import bn_stats_combine, bn_stats_partial, input_view
            rm, rv = rm.to(device), rv.to(device)
            bn_stats_combine(bn_stats_partial(input_view(x.to(device)), splits=splits), 1e-5, rm, rv, momentum=1.0)
        errors.append(((rv.cpu().double()[:3] - ref_var[:3]).abs() / ref_var[:3]).max().item())
        if run == "ours":
            assert rv[3].item() == 0.0, f"constant channel: variance {rv[3].item()}, not 0"
    unit = torch.finfo(dtype).eps
    assert errors[1] <= max(errors[0], 2 * unit), f"running_var relative error {errors[1]:.2e} > torch's {errors[0]:.2e}"
