"""Layer 1: the on-chip path (kernels/onchip.py) against float64 references, its dispatch rule
(tuning.onchip_tile, onchip_tile_for, the switch) and its launch counts."""
import pytest
import torch
import torch.nn.functional as F

import triton_bn
from tests.reference import assert_close, random_input, reference_batch_norm
from triton_bn.kernels import bn_backward, bn_forward_train, input_view, onchip
from triton_bn.kernels.activation import activation_code
from triton_bn.kernels.tuning import ONCHIP_MAX_ELEMENTS, onchip_enabled, onchip_tile, use_onchip

CASES = [
    ((4, 5, 7, 9), "contiguous"),
    ((4, 5, 7, 9), "channels_last"),
    ((50, 37), "contiguous"),  # BatchNorm1d (N, C): channels-last [N, C]
    ((3, 6, 4, 5, 3), "channels_last"),
    ((2, 3, 4, 5, 6), "contiguous"),
    ((3, 7, 6, 10), "strided"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _takes_onchip(x):
    return onchip.onchip_tile_for(input_view(x)) is not None


def _params(C, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    bias = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    rm = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    return weight, bias, rm, rv


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_train_and_backward_match_float64(shape, layout, dtype, device):
    x = random_input(shape, dtype, device, layout, seed=60, mean=2.0, std=3.0)
    dy = random_input(shape, dtype, device, layout, seed=61)
    assert _takes_onchip(x)
    w, b, rm, rv = _params(shape[1], device)
    ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, dy)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    y, mean, invstd = bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5, out=out)
    assert y is out
    assert_close(y, ref_y, dtype, "y")
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")
    assert mean.dtype == invstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    dx, dw, db = bn_backward(dy, x, w, mean, invstd, 1e-5)
    assert dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    assert_close(dx, ref_dx, dtype, "dx")
    param_tol = torch.float32 if dtype == torch.float64 else dtype  # fp32 parameters: fp32 gradients
    assert_close(dw, ref_dw, param_tol, "dweight")
    assert_close(db, ref_db, param_tol, "dbias")


@pytest.mark.parametrize("shape,layout", CASES[:3])
def test_eval_backward_uses_the_running_statistics(shape, layout, device):
    x = random_input(shape, torch.float32, device, layout, seed=62, mean=0.5)
    dy = random_input(shape, torch.float32, device, layout, seed=63)
    w, b, rm, rv = _params(shape[1], device, seed=1)
    _, _, _, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, dy)
    dx, dw, db = bn_backward(dy, x, w, rm, rv, 1e-5, training=False)
    assert_close(dx, ref_dx, torch.float32, "dx")
    assert_close(dw, ref_dw, torch.float32, "dweight")
    assert_close(db, ref_db, torch.float32, "dbias")
    dx_only, dw_none, db_none = bn_backward(dy, x, w, rm, rv, 1e-5, training=False,
                                            needs_input_grad=(True, False, False))
    assert dw_none is None and db_none is None
    assert torch.equal(dx_only, dx)


def _torch_act(z, name, slope):
    return {None: lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, slope)}[name](z)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,residual,from_output", [
    ("relu", False, False), ("leaky_relu", True, False), ("leaky_relu", True, True), (None, True, True)])
def test_fused_epilogue(layout, dtype, activation, residual, from_output, device):
    """act(BN(x) + r) forward; the backward from x or, save="output", from y (weight > 0)."""
    shape, slope = (3, 6, 5, 7), 0.2
    x = random_input(shape, dtype, device, layout, seed=64, mean=0.3, std=1.5)
    r = random_input(shape, dtype, device, "contiguous", seed=65) if residual else None
    dy = random_input(shape, dtype, device, layout, seed=66)
    w, b, _, _ = _params(shape[1], device, seed=2)
    up = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x64, r64, w64, b64 = up(x), up(r), up(w), up(b)
    z = F.batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5)
    ref_y = _torch_act(z if r64 is None else z + r64, activation, slope)
    ref_y.backward(dy.double())
    code = activation_code(activation)
    y, mean, invstd = bn_forward_train(x, w, b, None, None, 0.1, 1e-5, activation=code, negative_slope=slope,
                                       residual=r)
    assert_close(y, ref_y, dtype, "y")
    saved = y if from_output else x
    grads = bn_backward(dy, saved, w, mean, invstd, 1e-5, needs_input_grad=(True, True, True, residual), bias=b,
                        activation=code, negative_slope=slope, residual=r, from_output=from_output)
    tol = 2e-5 if dtype == torch.float32 else (6e-2 if from_output else 3e-2)
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, (x64.grad, w64.grad, b64.grad,
                                                                                 None if r64 is None else r64.grad)):
        if want is None:
            assert got is None, name
        else:
            assert_close(got, want, dtype, name, tol=tol)


def test_in_place_forward_writes_y_over_x(device):
    x = random_input((4, 3, 6, 5), torch.float32, device, seed=67, mean=1.0)
    ref_y, _, _, _ = reference_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    y, _, _ = bn_forward_train(x, None, None, None, None, out=x)
    assert y.data_ptr() == x.data_ptr()
    assert_close(x, ref_y, torch.float32, "y in place")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.float32, 1e5), (torch.float64, 1e8)])
def test_variance_stays_accurate_at_large_offsets(layout, dtype, offset, device):
    """The pivot shift and the register-resident second pass: running_var's error against an
    exact reference is at most torch's; a constant channel has variance 0 exactly."""
    x = random_input((16, 4, 8, 8), dtype, "cpu", layout, seed=68, mean=offset)
    x[:, 3] = offset
    assert _takes_onchip(x)
    shifted = (x.double() - x.double().flatten()[0]).transpose(0, 1).reshape(4, -1)
    ref_var = shifted.var(1)
    errors = []
    for fn in (F.batch_norm, triton_bn.batch_norm):
        rm, rv = torch.zeros(4, dtype=dtype, device=device), torch.ones(4, dtype=dtype, device=device)
        fn(x.to(device), rm, rv, None, None, True, 1.0, 1e-5)
        errors.append(((rv.cpu().double()[:3] - ref_var[:3]).abs() / ref_var[:3]).max().item())
    assert rv[3].item() == 0.0
    assert errors[1] <= max(errors[0], 2 * torch.finfo(dtype).eps), errors


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("layout,position", [("contiguous", 0), ("contiguous", 77), ("channels_last", 5)])
def test_non_finite_values_behave_like_torch(value, layout, position, device):
    x = random_input((6, 3, 5, 5), torch.float32, "cpu", layout, seed=69)
    x.as_strided((x.numel(),), (1,))[position] = value
    assert _takes_onchip(x)
    results = []
    for fn, dev in ((F.batch_norm, "cpu"), (triton_bn.batch_norm, device)):
        rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
        y = fn(x.to(dev), rm, rv, None, None, True, 1.0, 1e-5)
        results.append((y.cpu(), rm.cpu(), rv.cpu()))
    for name, theirs, ours in zip(("y", "running_mean", "running_var"), *results):
        torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("cumulative", [False, True])
def test_running_statistics_move_exactly_once(cumulative, device):
    """Compared with torch over three steps (momentum, or momentum=None's 1/num_batches_tracked)."""
    ours, theirs = triton_bn.BatchNorm2d(5, momentum=None if cumulative else 0.3), \
        torch.nn.BatchNorm2d(5, momentum=None if cumulative else 0.3)
    ours.to(device)
    for step in range(3):
        x = random_input((4, 5, 6, 3), torch.float32, device, seed=70 + step, mean=step, std=2.0)
        assert _takes_onchip(x)
        ours(x), theirs(x.cpu())
    assert_close(ours.running_mean, theirs.running_mean, torch.float32, "running_mean")
    assert_close(ours.running_var, theirs.running_var, torch.float32, "running_var")
    assert int(ours.num_batches_tracked) == 3


# ---------------------------------------------------------------------------------------------
# The dispatch rule

def test_tile_covers_the_slab_within_the_bound():
    assert onchip_tile(4, 5, 63, False, torch.float32) == (4, 64, 1)
    assert onchip_tile(64, 8, 100, False, torch.float32) == (64, 128, 16)  # 8192 elements: 16 per thread
    assert onchip_tile(64, 8, 200, False, torch.float32) is None  # 64 x 256 > ONCHIP_MAX_ELEMENTS
    assert onchip_tile(32, 64, 3136, False, torch.float16) is None
    for N, Q, K, cl in [(4, 5, 63, False), (64, 8, 100, False), (50, 1, 37, True), (2, 49, 512, True)]:
        for dtype in (torch.float32, torch.float16, torch.float64):
            tile = onchip_tile(N, Q, K, cl, dtype)
            if tile is None:
                continue
            block_r, block_k, warps = tile
            assert block_r * block_k <= ONCHIP_MAX_ELEMENTS and block_r * block_k <= 32 * warps * 16
            assert block_r >= (N * Q if cl else N) and (cl or block_k >= K)


def test_channels_last_needs_16_byte_channel_blocks():
    # At least 16 bytes of channels: 4 fp32, 8 fp16, 2 fp64 (2048 rows leave no room for more).
    assert onchip_tile(32, 64, 64, True, torch.float32) == (2048, 4, 16)
    assert onchip_tile(16, 64, 64, True, torch.float16) == (1024, 8, 16)
    assert onchip_tile(64, 64, 64, True, torch.float64) == (4096, 2, 16)
    assert onchip_tile(64, 64, 64, True, torch.float16) is None  # 4096 rows x 8 channels
    assert onchip_tile(50, 1, 3, True, torch.float32) is not None  # 4 <= next_power_of_2(3)
    assert onchip_tile(50, 1, 3, True, torch.float16) is None  # 8 channels of which 5 do not exist
    assert onchip_tile(64, 200, 64, True, torch.float32) is None  # 12800 rows
    # Otherwise the widest block within the bound and next_power_of_2(C): fewer programs.
    assert onchip_tile(50, 1, 37, True, torch.float32) == (64, 64, 8)
    assert onchip_tile(2, 1, 2048, True, torch.float16) == (2, 2048, 8)
    assert onchip_tile(4, 49, 512, True, torch.float32) == (256, 32, 16)
    # ...except a tile that spills on sm_90 (tuning.ONCHIP_SPILLING_TILES): one step narrower.
    assert onchip_tile(64, 1, 512, True, torch.float16) == (64, 64, 8)
    assert onchip_tile(64, 1, 512, True, torch.bfloat16) == (64, 64, 8)  # the rule is by element size
    assert onchip_tile(64, 1, 512, True, torch.float32) == (64, 128, 16)


def test_int64_addressing_takes_the_split_path(monkeypatch, device):
    from triton_bn.kernels import view as view_module
    x = random_input((4, 3, 5, 5), torch.float32, device, seed=71)
    assert _takes_onchip(x)
    monkeypatch.setattr(view_module, "_INT32_SPAN", 0)
    view_module._addressing.cache_clear()
    try:
        assert not _takes_onchip(x)
    finally:
        monkeypatch.undo()
        view_module._addressing.cache_clear()


def test_the_switch():
    assert onchip_enabled()  # TRITON_BN_ONCHIP defaults to 1
    with use_onchip(False):
        assert not onchip_enabled()
        with use_onchip(True):
            assert onchip_enabled()
        assert not onchip_enabled()
    assert onchip_enabled()


def _count_launches(monkeypatch):
    from tests.test_kernels import count_launches
    return count_launches(monkeypatch)


@pytest.mark.parametrize("path", ["onchip", "split", "splits="])
def test_launch_counts(path, device, monkeypatch):
    x = random_input((4, 3, 5, 6), torch.float32, device, seed=72)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    splits = 2 if path == "splits=" else None
    expected = 1 if path == "onchip" else 2
    with use_onchip(path != "split"):
        y, mean, invstd = bn_forward_train(x, None, None, rm, rv, splits=splits)  # first call tunes (split path)
        calls = _count_launches(monkeypatch)
        bn_forward_train(x, None, None, rm, rv, splits=splits)
        assert len(calls) == expected, [c.jit.__name__ for c in calls]
        assert (calls[0] is onchip._FORWARD) == (path == "onchip")
        calls.clear()
        bn_backward(torch.ones_like(x), x, None, mean, invstd, splits=splits)
        assert len(calls) == expected, [c.jit.__name__ for c in calls]
        assert (calls[0] is onchip._BACKWARD) == (path == "onchip")


def test_autograd_step_is_two_launches(device, monkeypatch):
    x = random_input((4, 3, 5, 6), torch.float32, device, seed=73).requires_grad_()
    w = torch.ones(3, device=device, requires_grad=True)
    b = torch.zeros(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    calls = _count_launches(monkeypatch)
    triton_bn.batch_norm(x, rm, rv, w, b, True).sum().backward()
    assert [c for c in calls] == [onchip._FORWARD, onchip._BACKWARD]
    assert x.grad is not None and w.grad is not None and b.grad is not None
