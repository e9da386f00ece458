"""Layer 1: the launchers against float64 references, stage by stage."""
import pytest
import torch

from tests.reference import assert_close, random_input
from triton_bn.kernels import (bn_backward, bn_forward_eval, bn_forward_train, bn_normalize, bn_stats_combine,
                               bn_stats_combine_groups, bn_stats_partial, input_view)
from triton_bn.kernels import backward as backward_kernels
from triton_bn.kernels import normalize as normalize_kernels
from triton_bn.kernels import stats as stats_kernels
from triton_bn.kernels.launch import clear_plans
from triton_bn.kernels.tuning import TILE_CONFIGS, prune_tile_configs, stats_splits, use_onchip

# (shape, layout): NCHW, channels_last, BatchNorm1d (N, C) and (N, C, L), 5-D, strided views;
# channel counts not powers of two and sizes not divisible by any block.
CASES = [
    ((4, 5, 7, 9), "contiguous"),
    ((4, 5, 7, 9), "channels_last"),
    ((3, 6, 4, 5, 3), "channels_last"),
    ((2, 3, 4, 5, 6), "contiguous"),
    ((50, 37), "contiguous"),
    ((6, 3, 301), "contiguous"),
    ((3, 7, 6, 10), "strided"),
    ((1, 3, 1000), "contiguous"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _stats64(x):
    x64 = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    return x64.mean(1), x64.var(1, unbiased=False)


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_stats_match_float64(shape, layout, splits, device):
    x = random_input(shape, torch.float32, device, layout, seed=1, mean=3.0, std=2.0)
    partial = bn_stats_partial(input_view(x), splits=splits)
    mean, invstd = bn_stats_combine(partial, eps=1e-5)
    ref_mean, ref_var = _stats64(x)
    assert_close(mean, ref_mean, torch.float32, "mean")
    assert_close(invstd, 1 / torch.sqrt(ref_var + 1e-5), torch.float32, "invstd")
    counts = partial[2].sum(0)
    assert torch.all(counts == x.numel() // shape[1]), "partials must cover every element exactly once"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stats_dtypes_accumulate_wide(dtype, layout, device):
    x = random_input((3, 6, 10, 11), dtype, device, layout, seed=2, mean=-1.0, std=0.5)
    mean, invstd = bn_stats_combine(bn_stats_partial(input_view(x)), eps=1e-5)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_mean, ref_var = _stats64(x)  # statistics of the values as stored: exact up to fp32 accumulation
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    assert_close(mean, ref_mean, name="mean", tol=tol)
    assert_close(invstd, 1 / torch.sqrt(ref_var + 1e-5), name="invstd", tol=tol)


def test_stats_stay_accurate_when_mean_dwarfs_std(device):
    """x = 1e4 + randn in float32: a sum/sum-of-squares variance would lose every digit."""
    x = random_input((8, 4, 32, 32), torch.float32, device, seed=3, mean=1e4, std=1.0)
    mean, invstd = bn_stats_combine(bn_stats_partial(input_view(x), splits=5), eps=1e-5)
    ref_mean, ref_var = _stats64(x)
    assert_close(mean, ref_mean, name="mean", tol=1e-7)  # relative to |mean| = 1e4
    assert_close(1 / invstd**2 - 1e-5, ref_var, name="var", tol=2e-4)


def test_combine_updates_running_stats_with_momentum_and_counter(device):
    x = random_input((5, 4, 6, 7), torch.float32, device, seed=4, mean=1.0, std=3.0)
    ref_mean, ref_var = _stats64(x)
    M = x.numel() // 4
    rm = torch.randn(4, device=device)
    rv = torch.rand(4, device=device) + 0.5
    expected_m, expected_v = rm.double() * 0.7 + 0.3 * ref_mean, rv.double() * 0.7 + 0.3 * ref_var * M / (M - 1)
    bn_stats_combine(bn_stats_partial(input_view(x)), 1e-5, rm, rv, momentum=0.3)
    assert_close(rm, expected_m, torch.float32, "running_mean")
    assert_close(rv, expected_v, torch.float32, "running_var")
    counter = torch.tensor(4, dtype=torch.long, device=device)  # cumulative average: factor 1/4
    expected_m = rm.double() * 0.75 + 0.25 * ref_mean
    bn_stats_combine(bn_stats_partial(input_view(x)), 1e-5, rm, rv, momentum=0.9, num_batches_tracked=counter)
    assert_close(rm, expected_m, torch.float32, "running_mean (cumulative)")


def test_combine_groups_merges_uneven_and_empty_groups(device):
    """Groups of very different sizes (and an empty one) merge to the statistics of the union."""
    parts = [random_input((n, 3, 5), torch.float32, device, seed=10 + n, mean=n, std=1 + n) for n in (1, 7, 20)]
    moments = [bn_stats_combine(bn_stats_partial(input_view(p)), 1e-5, return_moments=True)[2] for p in parts]
    moments.append(torch.zeros(4, 3, device=device))
    mean, invstd = bn_stats_combine_groups(torch.stack(moments), 1e-5)
    ref_mean, ref_var = _stats64(torch.cat(parts))
    assert_close(mean, ref_mean, name="mean", tol=2e-6)
    assert_close(invstd, 1 / torch.sqrt(ref_var + 1e-5), name="invstd", tol=2e-6)


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_writes_every_element(shape, layout, dtype, device):
    x = random_input(shape, dtype, device, layout, seed=5)
    C = shape[1]
    mean, invstd = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    out = torch.full_like(x, float("nan"))
    bn_normalize(input_view(x), mean, invstd, weight, bias, out=out)
    view = [1, C] + [1] * (x.dim() - 2)
    expected = (x.double() - mean.double().view(view)) * (invstd * weight).double().view(view) + bias.double().view(view)
    assert_close(out, expected, dtype, "y")


@pytest.mark.parametrize("shape,layout", CASES[:5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("onchip", [True, False], ids=["onchip", "split"])
def test_backward_matches_float64(shape, layout, training, onchip, device):
    x = random_input(shape, torch.float32, device, layout, seed=6, mean=0.5, std=2.0)
    dy = random_input(shape, torch.float32, device, layout, seed=7)
    C = shape[1]
    weight = torch.rand(C, device=device) + 0.5
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = torch.zeros(C, dtype=torch.float64, device=device, requires_grad=True)
    y64 = torch.nn.functional.batch_norm(x64, rm.double(), rv.double(), w64, b64, training, 0.0, 1e-5)
    y64.backward(dy.double())
    with use_onchip(onchip):
        if training:
            _, mean, invstd = bn_forward_train(x, weight, None, None, None, eps=1e-5)
            dx, dw, db = bn_backward(dy, x, weight, mean, invstd, 1e-5, training=True)
        else:
            dx, dw, db = bn_backward(dy, x, weight, rm, rv, 1e-5, training=False)
    assert_close(dx, x64.grad, torch.float32, "dx")
    assert_close(dw, w64.grad, torch.float32, "dweight", tol=1e-5)
    assert_close(db, b64.grad, torch.float32, "dbias", tol=1e-5)


def test_backward_skips_what_is_not_needed(device):
    x = random_input((4, 3, 5), torch.float32, device, seed=8)
    _, mean, invstd = bn_forward_train(x, None, None, None, None)
    dx, dw, db = bn_backward(torch.ones_like(x), x, None, mean, invstd, needs_input_grad=(True, True, False))
    assert dw is None and db is None  # no weight -> no dweight; dbias not requested
    assert_close(dx, torch.zeros_like(x, dtype=torch.float64), torch.float32, "dx of a constant dy")


def test_results_are_bitwise_deterministic(device):
    x = random_input((6, 5, 9, 13), torch.float32, device, "channels_last", seed=9, mean=2.0)
    dy = random_input((6, 5, 9, 13), torch.float32, device, "channels_last", seed=10)
    runs = []
    for _ in range(2):
        y, mean, invstd = bn_forward_train(x, None, None, None, None, splits=4)
        runs.append((y, mean, invstd) + bn_backward(dy, x, None, mean, invstd, splits=4))
    for a, b in zip(*runs):
        if a is not None:
            assert torch.equal(a, b)


def test_eval_forward_uses_running_stats_and_eps(device):
    x = random_input((3, 4, 5, 5), torch.float16, device, "channels_last", seed=11)
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device)
    y = bn_forward_eval(x, None, None, rm, rv, eps=0.0)
    expected = (x.double() - rm.double().view(1, 4, 1, 1)) / rv.double().sqrt().view(1, 4, 1, 1)
    assert_close(y, expected, torch.float16, "y")
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_splits_cover_the_domain():
    for N, Q, K, cl in [(1, 3, 10**6, False), (256, 64, 3136, False), (64, 12544, 64, True), (7, 1, 33, True)]:
        split = stats_splits(N, Q, K, cl, torch.device("cpu"), splits=9)
        rows = N * Q if cl else N
        assert split.num <= 65535
        assert (split.num // split.splits_k - 1) * split.rows_per_split < rows <= (split.num // split.splits_k) * split.rows_per_split
        if not cl:
            assert split.cols_per_split % 128 == 0
            assert (split.splits_k - 1) * split.cols_per_split < K <= split.splits_k * split.cols_per_split


RESNET50_BN_SHAPES = [(64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28), (256, 28, 28),
                      (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7), (3, 224, 224)]


@pytest.mark.parametrize("N", [64, 256])
def test_channels_last_partial_grids_fill_an_h200(N, monkeypatch):
    """The channels-last partial kernels launch cdiv(C, BLOCK_K) x splits programs, the splits
    sized for PARTIAL_BLOCK_K-wide blocks: pruning keeps no wider tile, so every ResNet-50
    shape gets two waves on 132 SMs (or one program per 16K elements when it is smaller)."""
    from triton_bn.kernels import tuning
    monkeypatch.setattr(tuning, "_target_programs", lambda device: tuning.gpu_target_programs(132))
    stats_splits.cache_clear()
    try:
        for C, H, W in RESNET50_BN_SHAPES:
            kept = prune_tile_configs(TILE_CONFIGS, {"K": C, "rows_per_split": 1}, CHANNELS_LAST=True)
            widest = max(c.kwargs["BLOCK_K"] for c in kept)
            assert widest <= tuning.PARTIAL_BLOCK_K
            programs = tuning.cdiv(C, widest) * stats_splits(N, H * W, C, True, torch.device("cpu")).num
            assert programs >= 0.9 * min(2 * 132, N * H * W * C // 16384), (N, C, H, W, programs)
    finally:
        stats_splits.cache_clear()


def test_pruning_keeps_lanes_busy():
    for K in (3, 49, 64, 3136):
        kept = prune_tile_configs(TILE_CONFIGS, {"K": K})
        assert kept and all(c.kwargs["BLOCK_K"] <= max(16, 2 * K) for c in kept)


def test_pinned_config_runs_alone(monkeypatch, device):
    """TRITON_BN_PIN_CONFIG=1: every autotuned kernel runs exactly its first pruned config
    (split path: the on-chip kernels are not autotuned)."""
    monkeypatch.setenv("TRITON_BN_PIN_CONFIG", "1")
    kernels = [stats_kernels._bn_stats_partial_kernel, normalize_kernels._bn_normalize_kernel,
               backward_kernels._bn_backward_partial_kernel, backward_kernels._bn_backward_dx_kernel]
    saved = [dict(k.cache) for k in kernels]
    for k in kernels:
        k.cache.clear()
    clear_plans()  # a recorded plan would skip the autotuner
    try:
        x = random_input((3, 5, 7, 6), torch.float32, device, seed=12)
        dy = random_input((3, 5, 7, 6), torch.float32, device, seed=13)
        with use_onchip(False):
            y, mean, invstd = bn_forward_train(x, None, None, None, None)
            dx, _, _ = bn_backward(dy, x, None, mean, invstd)
        for k in kernels:
            (config,) = set(k.cache.values())
            assert config == prune_tile_configs(TILE_CONFIGS, {"K": 42})[0]
        ref_mean, ref_var = _stats64(x)
        expected = (x.double() - ref_mean.view(1, 5, 1, 1)) / torch.sqrt(ref_var + 1e-5).view(1, 5, 1, 1)
        assert_close(y, expected, torch.float32, "y")
    finally:
        for k, cache in zip(kernels, saved):
            k.cache.clear()
            k.cache.update(cache)


@pytest.mark.parametrize("shape,layout", [((4, 5, 7, 9), "contiguous"), ((6, 3, 4, 5), "channels_last"), ((50, 37), "contiguous")])
@pytest.mark.parametrize("splits", [1, 4])
def test_fused_statistics_are_bitwise_the_two_pass_ones(shape, layout, splits, device):
    """bn_stats (the last program per channel combines) gives the very bits of a separate
    partial + combine, running statistics included."""
    from triton_bn.kernels import bn_stats
    x = random_input(shape, torch.float32, device, layout, seed=20, mean=5.0, std=3.0)
    C = shape[1]
    stats = []
    for fused in (True, False):
        rm, rv = torch.linspace(-1, 1, C, device=device), torch.linspace(0.5, 2, C, device=device)
        if fused:
            mean, invstd = bn_stats(input_view(x), 1e-5, rm, rv, 0.3, splits=splits)
        else:
            mean, invstd = bn_stats_combine(bn_stats_partial(input_view(x), splits=splits), 1e-5, rm, rv, 0.3)
        stats.append((mean, invstd, rm, rv))
    for a, b, name in zip(*stats, ("mean", "invstd", "running_mean", "running_var")):
        assert torch.equal(a, b), name


def count_launches(monkeypatch) -> list:
    """A list that gets the Launch of every kernel launch: a plan's, or Triton's own (a first call)."""
    from triton_bn.kernels import launch
    calls = []
    for cls, name in ((launch._Plan, "launch"), (launch._Plan, "launch_tensors"), (launch.Launch, "_first")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _original=original, **k:
                            calls.append(getattr(self, "owner", self)) or _original(self, *a, **k))
    return calls


@use_onchip(False)  # the split path; tests/test_onchip.py counts the on-chip path's launches
def test_forward_train_and_backward_are_two_launches_each(device, monkeypatch):
    x = random_input((4, 3, 5, 6), torch.float32, device, seed=21)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y, mean, invstd = bn_forward_train(x, None, None, rm, rv)  # first call: tunes on scratch
    calls = count_launches(monkeypatch)
    bn_forward_train(x, None, None, rm, rv)
    assert len(calls) == 2, "forward-train: statistics (with the combine) + normalize"
    calls.clear()
    bn_backward(torch.ones_like(x), x, None, mean, invstd)
    assert len(calls) == 2, "backward: the reduction (with the combine) + dx"


@use_onchip(False)
def test_autotuning_moves_the_running_statistics_exactly_once(device, monkeypatch):
    """Several candidates survive pruning (the GPU's rules): the autotuner runs each; the
    running statistics still take exactly one momentum step (tuned on scratch copies)."""
    monkeypatch.setenv("TRITON_BN_INTERPRET_GPU_PRUNING", "1")
    monkeypatch.delenv("TRITON_BN_PIN_CONFIG", raising=False)  # CI's second, pinned pass
    assert len(prune_tile_configs(TILE_CONFIGS, {"K": 61})) > 1
    x = random_input((3, 2, 61), torch.float32, device, seed=22, mean=4.0)  # a shape no other test uses
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    stats_kernels._PARTIAL.fn.cache.clear()
    clear_plans()
    bn_forward_train(x, None, None, rm, rv, momentum=0.5)
    ref_mean, ref_var = _stats64(x)
    M = x.numel() // 2
    assert_close(rm, 0.5 * ref_mean, torch.float32, "running_mean after one call")
    assert_close(rv, 0.5 + 0.5 * ref_var * M / (M - 1), torch.float32, "running_var after one call")


@use_onchip(False)
def test_training_and_eval_normalize_tune_separately(device):
    """The eval normalize computes invstd from the running variance: its own autotune key."""
    x = random_input((3, 4, 5, 7), torch.float32, device, seed=23)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    kernel = normalize_kernels._bn_normalize_kernel
    kernel.cache.clear()
    clear_plans()
    bn_forward_train(x, None, None, rm, rv)
    bn_forward_eval(x, None, None, rm, rv)
    assert len(kernel.cache) == 2, list(kernel.cache)


def test_addressing_flags_follow_the_geometry():
    from triton_bn.kernels.view import _addressing
    contiguous = (8, 64, 3136, 64 * 3136, 3136, 1, False)
    sliced = (8, 64, 3136, 2 * 64 * 3136, 3136, 1, False)  # every other sample: rows not evenly spaced
    huge = (4096, 512, 1024, 512 * 1024, 1024, 1, False)  # 2^31 elements
    assert _addressing((contiguous,)) == {"DENSE_ROWS": True, "INDEX_64": False}
    assert _addressing((contiguous, sliced)) == {"DENSE_ROWS": False, "INDEX_64": False}
    assert _addressing((huge,))["INDEX_64"]


@pytest.mark.parametrize("shape,layout", [((4, 5, 7, 9), "channels_last"), ((3, 7, 6, 10), "strided"), ((50, 37), "contiguous")])
@use_onchip(False)  # the on-chip path requires int32 addressing
def test_int64_addressing_gives_the_same_results(shape, layout, device, monkeypatch):
    """Tensors of 2^31 elements take 64-bit offsets; force that path on small ones."""
    from triton_bn.kernels import view as view_module
    monkeypatch.setattr(view_module, "_INT32_SPAN", 0)
    view_module._addressing.cache_clear()
    stats_kernels._partial_spec.cache_clear()
    clear_plans()  # recorded plans and replays fix the addressing they were recorded with
    try:
        x = random_input(shape, torch.float32, device, layout, seed=24, mean=1.0)
        dy = random_input(shape, torch.float32, device, layout, seed=25)
        assert view_module.addressing(input_view(x))["INDEX_64"]
        y, mean, invstd = bn_forward_train(x, None, None, None, None)
        dx, _, _ = bn_backward(dy, x, None, mean, invstd)
        monkeypatch.undo()
        view_module._addressing.cache_clear()
        stats_kernels._partial_spec.cache_clear()
        clear_plans()
        y32, mean32, invstd32 = bn_forward_train(x, None, None, None, None)
        dx32, _, _ = bn_backward(dy, x, None, mean32, invstd32)
        for a, b, name in ((y, y32, "y"), (mean, mean32, "mean"), (dx, dx32, "dx")):
            assert torch.equal(a, b), name
    finally:
        view_module._addressing.cache_clear()
        stats_kernels._partial_spec.cache_clear()


def test_in_place_normalize_autotunes_on_a_scratch_output(device, monkeypatch):
    """Several candidates survive pruning; benchmarking them in place would normalize the same
    data again and again: the first call of the key runs on a scratch output."""
    monkeypatch.setenv("TRITON_BN_INTERPRET_GPU_PRUNING", "1")
    monkeypatch.delenv("TRITON_BN_PIN_CONFIG", raising=False)
    x = random_input((3, 2, 59), torch.float32, device, seed=26, mean=2.0)  # a shape no other test uses
    assert len(prune_tile_configs(TILE_CONFIGS, {"K": 59})) > 1
    rm, rv = torch.full((2,), 1.5, device=device), torch.full((2,), 4.0, device=device)
    expected = (x.double() - 1.5) / torch.sqrt(torch.tensor(4.0, dtype=torch.float64) + 1e-5)
    normalize_kernels._bn_normalize_kernel.cache.clear()
    clear_plans()
    y = x.clone()
    bn_forward_eval(y, None, None, rm, rv, 1e-5, out=y)
    assert_close(y, expected, torch.float32, "in-place y after tuning")


@pytest.mark.parametrize("activation,bias,dtype,onchip", [
    ("relu", 3.0, torch.float16, True), ("relu", 3.0, torch.float32, False),
    ("leaky_relu", -3.0, torch.float32, True), ("leaky_relu", -3.0, torch.float16, False)])
def test_fused_dx_on_constant_channels(activation, bias, dtype, onchip):
    """Issue 18 item 5 through the fused epilogue, where dz = dy * act'(z) takes dy's place: on
    constant channels with constant dy, z = beta + r stays on one side of the kink, so dz is
    constant per channel as well and dx must be as exact as torch's (tests/property_oracle.py)."""
    import torch.nn.functional as F
    import triton_bn
    from tests.property_calls import Flavour, GradSpec, channel_data, contiguous, make_grad
    from tests.property_oracle import assert_matches, rounding_budgets
    from triton_bn.composite import torch_activation
    from triton_bn.kernels.activation import activation_code
    shape, slope = (12, 3, 25), 0.25  # a slope of few bits: dz's sums stay exact
    flavours = (Flavour("constant", 1.37, 0.0), Flavour("normal", 0.0, 1.0), Flavour("constant", -3.0, 0.0))
    x = channel_data(shape, 1, flavours, seed=5).to(dtype)
    dy = make_grad(GradSpec("constant", 1000.0, contiguous(3)), shape, 1, dtype, seed=6)
    r = (torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(7)) / 4).to(dtype)
    w, b = torch.tensor([1.5, 0.8, -1.9]), torch.full((3,), bias)

    def dx(ours, wide=False):
        t = (lambda v: v.double()) if wide else (lambda v: v)
        leaf = t(x).detach().clone().requires_grad_()
        if ours:
            with use_onchip(onchip):
                y = triton_bn.batch_norm(leaf, None, None, w, b, True, 0.1, 1e-5, activation=activation,
                                         negative_slope=slope, residual=r)
        else:
            z = F.batch_norm(leaf, None, None, t(w), t(b), True, 0.1, 1e-5) + t(r)
            y = torch_activation(z, activation_code(activation), slope)
        y.backward(t(dy))
        return leaf.grad, y

    ours, theirs, (ref, y_ref) = dx(True)[0], dx(False)[0], dx(False, wide=True)
    dz = dy.double() * torch.where(y_ref > 0, 1.0, 0.0 if activation == "relu" else slope)
    budget = rounding_budgets(x, dz, w, b, None, None, True, 0.1, 1e-5, 1)["dx"]
    assert_matches("dx", ours, ref, theirs, 1, budget)
