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
def test_matches_torch_float64(shape, layout, dtype, param_dtype, training, device):
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
    x = random_input((4, 3, 5), torch.float32, device, seed=10)
    _, _, rm, rv = _params(3, torch.float32, device)
    ref_y, _, _, _ = reference_batch_norm(x, rm, rv, None, None, False, 0.1, 0.0)
    assert_close(triton_bn.batch_norm(x, rm, rv, eps=0.0), ref_y, torch.float32, "y")


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
    ]


@pytest.mark.parametrize("case", range(15))
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
    for args, kwargs, error, message in _bad_calls(device):
        with pytest.raises(error, match=message) as ours:
            triton_bn.batch_norm(*args, **kwargs)
        try:
            F.batch_norm(*args, **kwargs)
        except Exception as theirs:  # torch raises too: same exception type
            assert isinstance(theirs, type(ours.value)) or isinstance(ours.value, type(theirs)), (theirs, ours.value)


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


def test_double_backward_is_a_clear_error(device):
    x = random_input((4, 3, 5), torch.float32, device, seed=13).requires_grad_()
    y = triton_bn.batch_norm(x, None, None, training=True)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


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
