"""Layer 1: the elementwise kernels' flat walk (FLAT) against float64 references.

Dense tensors whose rows the 2-D tile cannot vectorize (K % 16 != 0: NCHW with S = 49, 196,
3, 1; channels-last with C = 3, 5) are walked as one flat array (tuning.flat_walk). Every
launcher-allocated output starts as NaN, so an element the flat blocks miss fails.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.reference import TOLERANCE, assert_close, random_input, reference_batch_norm
from triton_bn.kernels import bn_backward, bn_forward_eval, bn_forward_train, bn_normalize, input_view
from triton_bn.kernels import backward as backward_kernels
from triton_bn.kernels import normalize as normalize_kernels
from triton_bn.kernels.activation import activation_code
from triton_bn.kernels.view import nqk_view
from triton_bn.kernels.launch import clear_plans
from triton_bn.kernels.tuning import TILE_CONFIGS, flat_elementwise, flat_walk, prune_tile_configs, use_onchip


@pytest.fixture(autouse=True)
def split_path():
    """The flat walk is the split path's elementwise kernels: keep these small shapes off the
    on-chip path (tests/test_onchip.py covers that one)."""
    with use_onchip(False):
        yield

# (shape, layout): NCHW 7x7 and 14x14 (the latter over two 4096-element blocks, with a tail),
# (N, C, L) with S = 3, S = 1 (seen channels-last: K = C = 6), channels-last C = 3 and 5,
# channels_last_3d C = 3, and a C = 3 input over three blocks.
SHAPES = [
    ((2, 3, 7, 7), "contiguous"),
    ((5, 5, 14, 14), "contiguous"),
    ((4, 6, 3), "contiguous"),
    ((5, 6, 1, 1), "contiguous"),
    ((2, 3, 9, 10), "channels_last"),
    ((3, 5, 6, 7), "channels_last"),
    ((2, 3, 4, 5, 3), "channels_last"),
    ((2, 3, 40, 40), "channels_last"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = 1e-5
SLOPE = 0.2


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs the launchers allocate (empty_like) start as NaN."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


def _params(C, device, seed):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.25).float().to(device)
    bias = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).float().to(device)
    rm = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    return weight, bias, rm, rv


def _assert_flat(*tensors):
    assert flat_elementwise(*(input_view(t)[1:] for t in tensors)), "the case must take the flat walk"


@pytest.mark.parametrize("shape,layout", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_forward_and_backward_match_float64(shape, layout, dtype, device, poisoned):
    x = random_input(shape, dtype, device, layout, seed=1, mean=0.5, std=2.0)
    dy = random_input(shape, dtype, device, layout, seed=2)
    _assert_flat(x, dy)
    weight, bias, rm, rv = _params(shape[1], device, 3)
    tol = TOLERANCE[dtype]
    for training in (True, False):
        ref_y, _, _, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, rm, rv, weight, bias, training, 0.1, EPS, dy)
        if training:
            y, mean, invstd = bn_forward_train(x, weight, bias, rm.clone(), rv.clone(), 0.1, EPS)
            dx, dw, db = bn_backward(dy, x, weight, mean, invstd, EPS, training=True)
        else:
            y = bn_forward_eval(x, weight, bias, rm, rv, EPS)
            dx, dw, db = bn_backward(dy, x, weight, rm, rv, EPS, training=False)
        assert y.stride() == x.stride() and dx.stride() == x.stride()
        mode = "train" if training else "eval"
        assert_close(y, ref_y, dtype, f"y ({mode})")
        assert_close(dx, ref_dx, dtype, f"dx ({mode})")
        # Parameter gradients come from the (unchanged) reduction kernel: fp32 sums of half data.
        assert_close(dw, ref_dw, dtype, f"dweight ({mode})", tol=max(tol, 1e-5))
        assert_close(db, ref_db, dtype, f"dbias ({mode})", tol=max(tol, 1e-5))


def _fused_reference(x, r, weight, bias, rm, rv, training, activation, dy):
    up = lambda t: None if t is None else t.detach().double().clone().requires_grad_()  # noqa: E731
    x64, r64, w64, b64 = up(x), up(r), up(weight), up(bias)
    z = F.batch_norm(x64, rm.double(), rv.double(), w64, b64, training, 0.0, EPS)
    if r64 is not None:
        z = z + r64
    y = F.relu(z) if activation == "relu" else F.leaky_relu(z, SLOPE)
    y.backward(dy.double())
    return y.detach(), x64.grad, None if r64 is None else r64.grad


# (activation, residual, from_output): relu; leaky_relu with a residual in x's layout (so
# the launch stays flat); leaky_relu with a residual from the output (In-Place ABN).
EPILOGUES = [("relu", False, False), ("leaky_relu", True, False), ("leaky_relu", True, True)]


@pytest.mark.parametrize("activation,residual,from_output", EPILOGUES)
@pytest.mark.parametrize("shape,layout,dtype", [((2, 3, 7, 7), "contiguous", torch.float32),
                                                ((2, 3, 9, 10), "channels_last", torch.float16),
                                                ((5, 5, 14, 14), "contiguous", torch.bfloat16)])
@pytest.mark.parametrize("training", [True, False])
def test_flat_fused_epilogue_matches_float64(activation, residual, from_output, shape, layout, dtype, training,
                                             device, poisoned):
    x = random_input(shape, dtype, device, layout, seed=4, mean=0.3, std=1.5)
    r = random_input(shape, dtype, device, layout, seed=5) if residual else None
    dy = random_input(shape, dtype, device, layout, seed=6)
    _assert_flat(*(t for t in (x, r, dy) if t is not None))
    weight, bias, rm, rv = _params(shape[1], device, 7)  # weight > 0: from_output divides by it
    code = activation_code(activation)
    ref_y, ref_dx, ref_dr = _fused_reference(x, r, weight, bias, rm, rv, training, activation, dy)
    fused = dict(activation=code, negative_slope=SLOPE, residual=r)
    if training:
        y, mean, stat = bn_forward_train(x, weight, bias, None, None, 0.1, EPS, **fused)
    else:
        y = bn_forward_eval(x, weight, bias, rm, rv, EPS, **fused)
        mean, stat = rm, rv
    saved = y if from_output else x
    dx, _, _, dr = bn_backward(dy, saved, weight, mean, stat, EPS, training, (True, True, True, residual),
                               bias=bias, from_output=from_output, **fused)
    tol = TOLERANCE[dtype] * (2 if from_output and dtype != torch.float32 else 1)  # x rebuilt from rounded y
    assert_close(y, ref_y, dtype, "y")
    assert_close(dx, ref_dx, dtype, "dx", tol=tol)
    if residual:
        assert_close(dr, ref_dr, dtype, "dresidual", tol=tol)


@pytest.mark.parametrize("shape,layout", [((2, 3, 7, 7), "contiguous"), ((2, 3, 9, 10), "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flat_unaligned_base_pointers(shape, layout, dtype, device, poisoned):
    """Dense views starting one element into their storage: the flat walk still applies (the
    pointer specialization, not the rule, drops the vector width); results are exact."""
    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        dense = t.contiguous() if layout == "contiguous" else t.permute(0, *range(2, t.dim()), 1).contiguous()
        flat[1:] = dense.reshape(-1)
        view = flat[1:].view(dense.shape)
        return view if layout == "contiguous" else view.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    x = shifted(random_input(shape, dtype, device, layout, seed=8, mean=1.0))
    dy = shifted(random_input(shape, dtype, device, layout, seed=9))
    assert x.data_ptr() % 16 != 0
    _assert_flat(x, dy)
    weight, bias, rm, rv = _params(shape[1], device, 10)
    out = shifted(torch.full(shape, float("nan"), dtype=dtype, device=device))
    bn_normalize(input_view(x), rm, rv, weight, bias, EPS, stat_is_var=True, out=out)
    ref_y, _, _, (ref_dx, _, _) = reference_batch_norm(x, rm, rv, weight, bias, False, 0.1, EPS, dy)
    assert_close(out, ref_y, dtype, "y (unaligned out)")
    y, mean, invstd = bn_forward_train(x, weight, bias, None, None, eps=EPS)
    dx, _, _ = bn_backward(dy, x, weight, mean, invstd, EPS)
    ref_y, _, _, (ref_dx, _, _) = reference_batch_norm(x, None, None, weight, bias, True, 0.1, EPS, dy)
    assert_close(y, ref_y, dtype, "y")
    assert_close(dx, ref_dx, dtype, "dx")


def _geometry(shape, layout, sliced=False):
    x = torch.empty(shape, device="meta")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if sliced:  # every other channel of a twice-as-wide tensor: rows no longer evenly spaced
        x = torch.empty((shape[0], 2 * shape[1], *shape[2:]), device="meta")[:, ::2]
    return input_view(x)[1:]


def test_dispatch_rule():
    s49, s196, s3136 = _geometry((32, 2048, 7, 7), "NCHW"), _geometry((32, 1024, 14, 14), "NCHW"), \
        _geometry((32, 64, 56, 56), "NCHW")
    c3, c64 = _geometry((32, 3, 224, 224), "channels_last"), _geometry((32, 64, 56, 56), "channels_last")
    assert flat_walk((s49,)) == {"FLAT": True, "FLAT_INNER": 49, "FLAT_C": 2048}
    assert flat_walk((s196, s196, None)) == {"FLAT": True, "FLAT_INNER": 196, "FLAT_C": 1024}
    assert flat_walk((c3, c3)) == {"FLAT": True, "FLAT_INNER": 1, "FLAT_C": 3}
    assert flat_walk((_geometry((256, 37), "NCHW"),))["FLAT_C"] == 37  # BatchNorm1d (N, C): K = C
    # Rows the 2-D tile vectorizes (K % 16 == 0) keep it.
    assert not flat_elementwise(s3136) and not flat_elementwise(c64)
    assert not flat_elementwise(_geometry((32, 16, 7, 7), "channels_last"))  # K = C = 16
    # Not dense, or not all in the same layout: the 2-D tile (it takes any strides).
    assert not flat_elementwise(_geometry((4, 3, 7, 7), "NCHW", sliced=True))
    x_cf = _geometry((4, 3, 7, 7), "NCHW")
    r_cl = torch.empty((4, 3, 7, 7), device="meta").to(memory_format=torch.channels_last)
    assert not flat_elementwise(x_cf, nqk_view(r_cl, channels_last=False)[1:])  # r seen in x's orientation
    assert flat_elementwise(x_cf, x_cf, None)


def test_flat_and_tiled_launches_tune_separately(device):
    """Same (N, Q, K) and flags, one dense (flat) and one channel-sliced (2-D): two autotune
    entries, each with its own config; pruning offers one config per tile size when flat."""
    flat_configs = prune_tile_configs(TILE_CONFIGS, {"K": 49}, FLAT=True)
    assert len({c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_K"] for c in flat_configs}) == len(flat_configs)
    dense = random_input((3, 4, 5, 9), torch.float32, device, seed=11)  # K = 45, a shape no other test uses
    sliced = random_input((3, 8, 5, 9), torch.float32, device, seed=11)[:, ::2]
    C = 4
    mean, invstd = torch.zeros(C, device=device), torch.ones(C, device=device)
    for kernel in (normalize_kernels._bn_normalize_kernel, backward_kernels._bn_backward_dx_kernel):
        kernel.cache.clear()
    clear_plans()  # a recorded plan would skip the autotuner
    for x in (dense, sliced):
        y = bn_normalize(input_view(x), mean, invstd, None, None)
        assert_close(y, x.double(), torch.float32, "y")
        dx, _, _ = bn_backward(x, x, None, mean, invstd, training=False)
        assert_close(dx, x.double(), torch.float32, "dx")
    for kernel in (normalize_kernels._bn_normalize_kernel, backward_kernels._bn_backward_dx_kernel):
        assert len(kernel.cache) == 2, list(kernel.cache)
        flags = {key[kernel.keys.index("FLAT")] for key in kernel.cache}
        assert flags == {True, False}, list(kernel.cache)
