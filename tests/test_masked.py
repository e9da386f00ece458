"""Masked batch norm (issue 20): ``batch_norm(..., mask=)`` and the layers' ``forward(x, mask)``.

The oracle is a float64 torch composition on upcast inputs (``masked_reference``, written here,
not the library's): mean and biased variance over the counted positions (Keras 3's no-NaN
division when none count), y at every position, autograd's gradients of that function (the
uncounted positions' outputs depend on the statistics too), the running update unbiased by
M / (M - 1) (0 where M <= 1). Inputs are offset (|mean| >> std) with the first position
uncounted and padded far from the data, so a pivot taken from padding would show; both kernel
paths (either_path), every dtype, the layouts and several kinds of mask.
"""
import pytest
import torch

import triton_bn
from tests.program_order import program_order
from tests.reference import TOLERANCE, assert_close, random_input
from triton_bn.kernels import bn_backward, bn_forward_train
from triton_bn.kernels.tuning import use_onchip

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CASES = [((6, 3, 10), "contiguous"), ((4, 5, 3, 4), "channels_last"), ((16, 6), "contiguous"),
         ((3, 4, 5, 4), "strided")]


def masked_reference(x, mask, weight, bias, running_mean, running_var, momentum, eps, dy=None, activation=None,
                     residual=None):
    """(y, running_mean, running_var, (dx, dweight, dbias, dresidual)) in float64."""
    def up(t):
        return None if t is None else t.detach().double().clone().requires_grad_(dy is not None)
    x64, w64, b64, r64 = up(x), up(weight), up(bias), up(residual)
    counted = mask.unsqueeze(1).expand_as(x64)
    dims = [0] + list(range(2, x.dim()))
    count = counted.sum(dims, keepdim=True).double()
    mean = torch.where(counted, x64, 0.0).sum(dims, keepdim=True) / count.clamp(min=1)
    var = torch.where(counted, (x64 - mean) ** 2, 0.0).sum(dims, keepdim=True) / count.clamp(min=1)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x64 - mean) / torch.sqrt(var + eps)
    if w64 is not None:
        y = y * w64.view(shape)
    if b64 is not None:
        y = y + b64.view(shape)
    if r64 is not None:
        y = y + r64
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "leaky_relu":
        y = torch.nn.functional.leaky_relu(y, 0.1)
    rm = rv = None
    if running_mean is not None:
        unbiased = torch.where(count > 1, var * count / (count - 1).clamp(min=1), 0.0).flatten()
        rm = (1 - momentum) * running_mean.double() + momentum * mean.detach().flatten()
        rv = (1 - momentum) * running_var.double() + momentum * unbiased.detach()
    grads = None
    if dy is not None:
        y.backward(dy.double())
        grads = tuple(None if t is None else t.grad for t in (x64, w64, b64, r64))
    return y.detach(), rm, rv, grads


def _mask(kind, shape, seed=0):
    """A (N, *spatial) bool mask of this kind (broadcast ones have a size-1 dim; strided: a view)."""
    g = torch.Generator().manual_seed(seed)
    spatial = (shape[0], *shape[2:])
    if kind == "random":
        mask = torch.rand(spatial, generator=g) > 0.35
        mask.view(-1)[0] = False  # the pivot must not come from padding
        mask.view(-1)[1] = True
        return mask
    if kind == "none":
        return torch.zeros(spatial, dtype=torch.bool)
    if kind == "one":
        mask = torch.zeros(spatial, dtype=torch.bool)
        mask.view(-1)[-1] = True
        return mask
    if kind == "broadcast":  # one value per sample, broadcast over the positions
        mask = torch.rand((shape[0],) + (1,) * (len(shape) - 2), generator=g) > 0.4
        mask[0] = False
        mask[-1] = True
        return mask
    if kind == "strided":  # a sliced view: non-unit strides
        big = torch.rand((spatial[0] * 2, *(s * 2 for s in spatial[1:])), generator=g) > 0.3
        return big[(slice(None, None, 2),) * len(spatial)]
    raise ValueError(kind)


def _padded(x, mask, pad=0.0):
    """x with its uncounted positions set to ``pad`` (padding, far from the offset data), in
    place: a strided view stays one."""
    counted = mask.expand((x.shape[0], *x.shape[2:])).unsqueeze(1).expand_as(x)
    x[~counted] = pad
    return x


def _run(x, mask, w, b, rm, rv, dy, momentum=0.1, **fused):
    x = x.detach().clone().requires_grad_()
    leaves = [t.detach().clone().requires_grad_() for t in (w, b)]
    residual = fused.pop("residual", None)
    if residual is not None:
        residual = residual.detach().clone().requires_grad_()
    y = triton_bn.batch_norm(x, rm, rv, *leaves, True, momentum, EPS, mask=mask, residual=residual, **fused)
    y.backward(dy)
    return y.detach(), (x.grad, leaves[0].grad, leaves[1].grad, None if residual is None else residual.grad)


def _compare(dtype, x, mask, w, b, dy, rm0, rv0, **fused):
    rm, rv = rm0.clone(), rv0.clone()
    y, grads = _run(x, mask, w, b, rm, rv, dy, **fused)
    m = mask.expand((x.shape[0], *x.shape[2:]))
    ref_y, ref_rm, ref_rv, ref_grads = masked_reference(x, m, w, b, rm0, rv0, 0.1, EPS, dy, **fused)
    assert_close(y, ref_y, dtype, "y")
    assert_close(rm, ref_rm, dtype, "running_mean")
    assert_close(rv, ref_rv, dtype, "running_var")
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, ref_grads):
        if want is not None:
            assert_close(got, want, dtype, name, tol=TOLERANCE[dtype] * 4)


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_masked_matches_float64(shape, layout, dtype, either_path, device):
    C = shape[1]
    mask = _mask("random", shape, seed=1).to(device)
    x = _padded(random_input(shape, dtype, device, layout, seed=2, mean=1000.0, std=1.5), mask)
    dy = random_input(shape, dtype, device, layout, seed=3)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    params = dtype if dtype == torch.float64 else torch.float32
    w, b = w.to(params), b.to(params)
    _compare(dtype, x, mask, w, b, dy, torch.randn(C, device=device, dtype=params),
             torch.rand(C, device=device, dtype=params) + 0.5)


@pytest.mark.parametrize("kind", ["none", "one", "broadcast", "strided"])
@pytest.mark.parametrize("shape,layout", CASES[:2])
def test_mask_kinds(kind, shape, layout, either_path, device):
    """No counted position (mean 0, var 0: Keras' no-NaN division), one (an unbiased variance of 0),
    a mask broadcast over the positions, a non-contiguous one."""
    C = shape[1]
    mask = _mask(kind, shape, seed=4).to(device)
    x = random_input(shape, torch.float32, device, layout, seed=5, mean=3.0)
    dy = random_input(shape, torch.float32, device, layout, seed=6)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    _compare(torch.float32, x, mask, w, b, dy, torch.randn(C, device=device), torch.rand(C, device=device) + 0.5)


def test_uncounted_nan_padding_stays_out_of_the_statistics(either_path, device):
    """NaN and Inf at uncounted positions: finite statistics, running stats and y where counted
    (y is computed everywhere, so it is NaN where x is)."""
    shape = (4, 3, 9)
    mask = _mask("random", shape, seed=7).to(device)
    x = random_input(shape, torch.float32, device, seed=8, mean=50.0)
    x = _padded(x, mask, float("nan"))
    n, t = (~mask).nonzero()[-1].tolist()
    x[n, :, t] = float("inf")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = triton_bn.batch_norm(x, rm, rv, None, None, True, 0.1, EPS, mask=mask)
    ref_y, ref_rm, ref_rv, _ = masked_reference(x, mask, None, None, torch.zeros(3), torch.ones(3), 0.1, EPS)
    counted = mask.unsqueeze(1).expand_as(x)
    assert_close(y[counted], ref_y[counted], torch.float32, "y where counted")
    assert not torch.isfinite(y[~counted]).any()
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")


@pytest.mark.parametrize("onchip", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", CASES[:3])
def test_an_all_true_mask_is_the_unmasked_call_bit_for_bit(shape, layout, dtype, onchip, device):
    C = shape[1]
    x = random_input(shape, dtype, device, layout, seed=9, mean=2.0)
    dy = random_input(shape, dtype, device, layout, seed=10)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    everything = torch.ones((shape[0], *shape[2:]), dtype=torch.bool, device=device)
    results = []
    with use_onchip(onchip):
        for mask in (None, everything):
            rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
            y, grads = _run(x, mask, w, b, rm, rv, dy)
            results.append((y, *grads[:3], rm, rv))
    for name, masked, plain in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), *results):
        assert torch.equal(masked, plain), name


@pytest.mark.parametrize("fused", [dict(activation="relu", residual=True), dict(activation="leaky_relu",
                                                                                negative_slope=0.1)])
def test_masked_fused_epilogues(fused, either_path, device):
    shape, C = (4, 3, 4, 5), 3
    mask = _mask("random", shape, seed=11).to(device)
    x = random_input(shape, torch.float32, device, "channels_last", seed=12, mean=4.0)
    dy = random_input(shape, torch.float32, device, seed=13)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    fused = dict(fused)
    if fused.pop("residual", False):
        fused["residual"] = random_input(shape, torch.float32, device, seed=14)
    oracle = {k: v for k, v in fused.items() if k != "negative_slope"}
    rm0, rv0 = torch.zeros(C, device=device), torch.ones(C, device=device)
    rm, rv = rm0.clone(), rv0.clone()
    y, grads = _run(x, mask, w, b, rm, rv, dy, **fused)
    ref_y, ref_rm, _, ref_grads = masked_reference(x, mask, w, b, rm0, rv0, 0.1, EPS, dy, **oracle)
    assert_close(y, ref_y, torch.float32, "y")
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, ref_grads):
        if want is not None:
            assert_close(got, want, torch.float32, name, tol=1e-4)


def test_memory_mode_with_a_mask(either_path, device):
    """save="output": the backward rebuilds x - mean from y; the scale is |gamma| + eps."""
    shape, C = (5, 3, 8), 3
    mask = _mask("random", shape, seed=15).to(device)
    x = random_input(shape, torch.float32, device, seed=16, mean=-2.0)
    dy = random_input(shape, torch.float32, device, seed=17)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    y, grads = _run(x, mask, w, b, None, None, dy, activation="leaky_relu", negative_slope=0.1, save="output")
    ref_y, _, _, ref_grads = masked_reference(x, mask, w.abs() + EPS, b, None, None, 0.1, EPS, dy,
                                              activation="leaky_relu")
    assert_close(y, ref_y, torch.float32, "y")
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert_close(got, want, torch.float32, name, tol=1e-4)


def test_masked_statistics_do_not_depend_on_program_order(device):
    """The split path with several splits per channel, grid reversed and shuffled: the same bits."""
    shape = (8, 3, 64)
    x = random_input(shape, torch.float32, device, seed=18, mean=10.0)
    dy = random_input(shape, torch.float32, device, seed=19)
    mask = _mask("random", shape, seed=20).to(device)
    outs = []
    with use_onchip(False):
        for order in ("natural", "reversed", "shuffled"):
            rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
            with program_order(order):
                y, mean, invstd, inv_counts = bn_forward_train(x, None, None, rm, rv, 0.1, EPS, splits=4, mask=mask)
                dx = bn_backward(dy, x, None, mean, invstd, EPS, True, (True, False, False), splits=4, mask=mask,
                                 inv_counts=inv_counts)[0]
            outs.append((y, mean, invstd, inv_counts, rm, rv, dx))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    # 1 / M as float32 (hi, lo): the host's split of an unmasked call's 1 / M
    from triton_bn.kernels.helpers import split_float
    assert outs[0][3].tolist() == [list(split_float(1.0 / int(mask.sum())))] * 3


def test_eval_ignores_the_mask(device):
    x = random_input((4, 3, 6), torch.float32, device, seed=21)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    mask = _mask("random", (4, 3, 6), seed=22).to(device)
    assert torch.equal(triton_bn.batch_norm(x, rm, rv, training=False, mask=mask),
                       triton_bn.batch_norm(x, rm, rv, training=False))


def test_axis_minus_one_channels_last_sequences(either_path, device):
    """(N, L, C) with axis=-1 and an (N, L) mask: the kernels' channels-last case, no copy."""
    x = random_input((5, 7, 4), torch.float32, device, seed=23, mean=5.0)
    mask = _mask("random", (5, 4, 7), seed=24).to(device)  # (N, L)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    y = triton_bn.batch_norm(x, rm, rv, None, None, True, 0.1, EPS, axis=-1, mask=mask)
    ref_y, ref_rm, ref_rv, _ = masked_reference(x.transpose(1, 2), mask, None, None, torch.zeros(4), torch.ones(4),
                                                0.1, EPS)
    assert_close(y.transpose(1, 2), ref_y, torch.float32, "y")
    assert_close(rv, ref_rv, torch.float32, "running_var")


def test_double_backward_through_the_mask(device):
    x = random_input((4, 3, 6), torch.float64, device, seed=25).requires_grad_()
    mask = _mask("random", (4, 3, 6), seed=26).to(device)
    assert torch.autograd.gradcheck(lambda t: triton_bn.batch_norm(t, None, None, None, None, True, mask=mask), (x,))
    assert torch.autograd.gradgradcheck(lambda t: triton_bn.batch_norm(t, None, None, None, None, True, mask=mask),
                                        (x,))


# ---------------------------------------------------------------------------------------------
# Bad input: torch's error classes, before any kernel or buffer change.

@pytest.mark.parametrize("bad,error", [
    (lambda m: m.float(), RuntimeError),  # not bool
    (lambda m: m[:, :-1], RuntimeError),  # wrong shape
    (lambda m: m.unsqueeze(1), RuntimeError),  # has a channel axis: broadcasts to more dims
    (lambda m: m.to("meta"), RuntimeError),  # another device
    (lambda m: [[True]], TypeError),  # not a tensor
])
def test_bad_masks_fail_before_any_kernel(bad, error, device, monkeypatch):
    bn = triton_bn.BatchNorm1d(3).to(device)
    x = random_input((4, 3, 6), torch.float32, device, seed=27)
    mask = _mask("random", (4, 3, 6), seed=28).to(device)
    before = [t.clone() for t in bn.buffers()]
    import triton_bn.functional as functional
    monkeypatch.setattr(functional, "bn_forward_train", lambda *a, **k: pytest.fail("a kernel ran"))
    with pytest.raises(error):
        bn(x, bad(mask))
    for old, new in zip(before, bn.buffers()):
        assert torch.equal(old, new)


def test_torch_path_checks_before_the_step_counter_moves(device):
    """Where torch's ops compute (an empty batch here; also torch.jit tracing, devices without
    kernels), a bad masked call raises before num_batches_tracked moves."""
    bn = triton_bn.BatchNorm1d(3).to(device)
    bn.weight = torch.nn.Parameter(torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match="weight should contain 3 elements"):
        bn(torch.empty(0, 3, 5, device=device), torch.ones(0, 5, dtype=torch.bool, device=device))
    assert int(bn.num_batches_tracked) == 0


def test_a_mask_needs_positions(device):
    with pytest.raises(ValueError, match="at least 2-D"):
        triton_bn.batch_norm(torch.randn(5, device=device), None, None, training=True,
                             mask=torch.ones(5, dtype=torch.bool, device=device))


def test_lengths_to_mask():
    lengths = torch.tensor([3, 0, 5])
    assert torch.equal(triton_bn.lengths_to_mask(lengths, 5), torch.tensor(
        [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert triton_bn.lengths_to_mask(lengths).shape == (3, 5)
    with pytest.raises(ValueError):
        triton_bn.lengths_to_mask(lengths[None])


def test_the_pivot_is_a_counted_position(device):
    """Data at 1e4 +- 1 whose first position is uncounted zero padding: shifted by the padding
    instead of a counted value, the split path's per-lane sums of squares (~1e8 each) would
    cancel to a variance off by far more than fp32's rounding of x."""
    shape = (4, 2, 512)
    mask = torch.ones((4, 512), dtype=torch.bool, device=device)
    mask[0, :37] = False
    x = _padded(random_input(shape, torch.float32, device, seed=29, mean=1e4), mask)
    with use_onchip(False):
        _, mean, invstd, _ = bn_forward_train(x, None, None, None, None, 0.1, EPS, splits=2, mask=mask)
    _, var, _ = triton_bn.composite.masked_moments(x.double(), mask)
    assert_close(invstd, (var.flatten() + EPS).rsqrt(), torch.float32, "invstd", tol=1e-5)
