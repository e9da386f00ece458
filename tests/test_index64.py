"""64-bit row arithmetic (issue 18, item 3): what switches INDEX_64 on, and what it changes.

int32 is the fast path: the host turns INDEX_64 on when any index a kernel forms could reach
2^31 (view.addressing, view.split_addressing, combine._combine_spec), and then the kernels do
their row arithmetic in int64, not only the final offsets. Tensors that big do not fit the
interpreter's time (or the CPU's memory), so the kernel side is checked on views that *describe*
2^31 rows, e.g. channels-last (512, 3, 2048, 2048) with N*Q = 2^31, over a small buffer: the
kernels run on a small grid, which touches only its first rows, and the helpers run in probe
kernels with a program id near the end of such a grid.
"""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from triton_bn.kernels import backward as backward_kernels
from triton_bn.kernels import normalize as normalize_kernels
from triton_bn.kernels import stats as stats_kernels
from triton_bn.kernels.combine import _combine_spec
from triton_bn.kernels.helpers import _elementwise_tile, _split_bounds
from triton_bn.kernels.tuning import Splits, stats_splits
from triton_bn.kernels.view import _INDEX_SLACK, _INT32_SPAN, _addressing, nqk_view, split_addressing

LIMIT = _INT32_SPAN - _INDEX_SLACK  # the largest extent that keeps int32
CPU = torch.device("cpu")


def _meta(shape, channels_last=False, expand_from=None):
    """A tensor of this shape on the meta device (geometry only), channels-last or expanded."""
    if expand_from is not None:
        return torch.empty(expand_from, device="meta").expand(shape)
    x = torch.empty(shape, dtype=torch.float16, device="meta")
    return x.to(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------------------------
# The host's decision, product by product.

def test_row_counts_switch_where_stride_0_dims_leave_the_span_small():
    """N*Q rows (and N*Q*K flat offsets) of an expanded view: a span of 2 elements. (The span
    rule, for element offsets, already covered the issue's dense input.)"""
    assert _addressing((nqk_view(_meta((512, 3, 2048, 2048), True))[1:],))["INDEX_64"]
    huge = nqk_view(_meta((512, 3, 2048, 2048), expand_from=(1, 3, 1, 1)), channels_last=True)
    assert huge.N * huge.Q == 2**31 and huge.strides == (0, 0, 1)
    assert _addressing((huge[1:],))["INDEX_64"]
    at_limit = (LIMIT, 1, 1, 0, 0, 0, True)
    assert not _addressing((at_limit,))["INDEX_64"]
    assert _addressing(((LIMIT + 1, 1, 1, 0, 0, 0, True),))["INDEX_64"]
    assert _addressing(((1, 1, LIMIT + 1, 0, 0, 0, False),))["INDEX_64"]  # K alone (the columns)


def test_split_reductions_switch_on_their_ranges_and_partials():
    cases = [  # (split, C, fields of the partial buffer, INDEX_64)
        (Splits(2**20, 4, 2047, 1), 4, 4, False),  # rows up to 2^31 - 2^20
        (Splits(2**20, 4, 2048, 1), 4, 4, True),  # the last split ends at 2^31: split_r * rows_per_split
        (Splits(1, 2**30, 1, 2), 1, 4, True),  # the last column range ends at 2^31
        (Splits(16, 8, 2**15, 1), 2**14, 4, True),  # [4, P, C] partials: pid_split * C + 3 * P * C
        (Splits(16, 8, 2**15, 1), 2**15, 2, True),  # the backward's [2, P, C] sums
        (Splits(16, 8, 2**14, 1), 2**14, 2, False),
    ]
    for split, C, fields, wide in cases:
        assert split_addressing({"DENSE_ROWS": True, "INDEX_64": False}, split, C, fields)["INDEX_64"] == wide
        assert split_addressing({"DENSE_ROWS": True, "INDEX_64": True}, split, C, fields)["INDEX_64"]


def test_the_launchers_take_the_split_into_account():
    """A view just within the element limit whose forced splits overrun it (rows_per_split is
    rounded up to 16): the statistics' and the backward reduction's constexprs say INDEX_64."""
    x = nqk_view(_meta((LIMIT - 2**12, 1), expand_from=(1, 1)))
    assert not _addressing((x[1:],))["INDEX_64"]
    split = stats_splits(x.N, x.Q, x.K, x.channels_last, CPU, 65535)
    assert split.extents(1, 4)[0] > LIMIT
    stats_kernels._partial_spec.cache_clear()
    assert stats_kernels._partial_spec(x[1:], torch.float16, CPU, 65535)[4]["INDEX_64"]
    assert backward_kernels.reduce_addressing(x, x, None, split)["INDEX_64"]
    assert not backward_kernels.reduce_addressing(x, x, None, stats_splits(x.N, x.Q, x.K, True, CPU, 4))["INDEX_64"]


def test_the_combine_switches_on_its_field_offsets():
    assert not _combine_spec(64, False, False, False, False, 2**20)[1]["INDEX_64"]
    fits = (LIMIT - 64) // 3  # [G, 4, C] groups read up to 3 * field_stride + C
    assert not _combine_spec(64, False, False, False, False, fits)[1]["INDEX_64"]
    assert _combine_spec(64, False, False, False, False, fits + 1)[1]["INDEX_64"]


# ---------------------------------------------------------------------------------------------
# The kernels' helpers, at the end of a 2^31-row grid.

@triton.jit
def _split_probe(out_ptr, pid_c, pid_split, N, Q, K, rows_per_split, cols_per_split, splits_k,
                 CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr):
    bounds = _split_bounds(pid_c, pid_split, N, Q, K, rows_per_split, cols_per_split, splits_k, CHANNELS_LAST,
                           BLOCK_K, True)
    for i in tl.static_range(4):
        tl.store(out_ptr + i, tl.cast(bounds[i], tl.int64))


@pytest.mark.parametrize("channels_last,N,Q,K,rows_per_split,cols_per_split,splits_k,pid_split,expected", [
    # rows: the last split of (2^19 + 1) x 2^12 rows, 2^20 per split, starts at 2^31
    (True, 2**19 + 1, 2**12, 3, 2**20, 3, 1, 2048, (2**31, 2**31 + 2**12, 0, 3)),
    (True, 512, 2**22, 3, 2**20, 3, 1, 2047, (2**31 - 2**20, 2**31, 0, 3)),  # the input
    # columns: channels-first, 2^31 + 300 positions per channel in 2^30-column ranges
    (False, 2, 5, 2**31 + 300, 1, 2**30, 3, 5, (1, 2, 2**31, 2**31 + 300)),
])
def test_split_bounds_are_exact_past_2_31(channels_last, N, Q, K, rows_per_split, cols_per_split, splits_k,
                                          pid_split, expected):
    out = torch.zeros(4, dtype=torch.int64)
    _split_probe[(1,)](out, 0, pid_split, N, Q, K, rows_per_split, cols_per_split, splits_k, channels_last, 4)
    assert tuple(out.tolist()) == expected


@triton.jit
def _tile_probe(rows_ptr, mask_ptr, channels_ptr, pid, N, Q, K, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr):
    rows, cols, mask, channels, _ = _elementwise_tile(pid, N, Q, K, CHANNELS_LAST, False, 1, 1, True, BLOCK_R, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    tl.store(rows_ptr + r, tl.cast(rows, tl.int64))
    tl.store(mask_ptr + r, tl.max(mask.to(tl.int32), 1))
    if not CHANNELS_LAST:
        tl.store(channels_ptr + r, channels)


@pytest.mark.parametrize("channels_last", [True, False])
def test_elementwise_tiles_are_exact_past_2_31(channels_last):
    """Program 2^23 of a [2^31 + 5 rows, 2 cols] grid with 256-row tiles: rows from 2^31, the
    first 5 of them in the tensor; channels-first, row r is channel r % Q."""
    N, Q, block_r = 2**31 // 7 + 1, 7, 256
    pid = 2**31 // block_r
    rows, mask, channels = (torch.zeros(block_r, dtype=dtype) for dtype in (torch.int64, torch.int32, torch.int32))
    _tile_probe[(1,)](rows, mask, channels, pid, N, Q, 2, channels_last, block_r, 2)
    expected = 2**31 + np.arange(block_r)
    assert rows.tolist() == expected.tolist()
    assert mask.tolist() == (expected < N * Q).tolist()
    if not channels_last:
        assert channels.tolist() == (expected % Q).tolist()


# ---------------------------------------------------------------------------------------------
# The kernels on the input, channels-last (512, 3, 2048, 2048) fp16: N*Q = 2^31 rows of
# K = 3 channels, of which a small grid reads the first ROWS (the rest of the view is never
# touched, so a ROWS x 3 buffer backs it). Before the fix N*Q wrapped to -2^31 in int32: every
# split was empty and every tile masked off.

N, Q, K = 512, 2**22, 3
STRIDES = dict(n=Q * K, q=K, k=1)
ROWS, BLOCK_R, BLOCK_K = 64, 16, 4


def _strides(prefix):
    return {f"{prefix}_{axis}_stride": stride for axis, stride in STRIDES.items()}


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(ROWS, K, generator=g) * 2 + 1).half()


def _common(**extra):
    return dict(N=N, Q=Q, K=K, CHANNELS_LAST=True, ACC_DTYPE=tl.float32, DENSE_ROWS=True, INDEX_64=True,
                BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, **extra)


def _mask(seed, masked):
    """(mask buffer, its [N, Q, K] strides, constexpr): the first ROWS (n, q) positions of a mask
    over the 2^31 rows, stride 0 along the channels (view.mask_view), first position uncounted;
    backed by one step of the pivot's scan (masking._first_counted reads 128 positions)."""
    if not masked:
        return None, dict(mask_n_stride=0, mask_q_stride=0, mask_k_stride=0), {}
    counted = torch.rand(128, generator=torch.Generator().manual_seed(seed)) > 0.3  # a step of the pivot's scan
    counted[0] = False
    return counted[:ROWS], dict(mask_n_stride=Q, mask_q_stride=1, mask_k_stride=0), dict(MASKED=True)


@pytest.mark.parametrize("masked", [False, True])
def test_statistics_partials_of_2_31_rows(masked):
    x = _data(1)
    counted, mask_strides, flag = _mask(9, masked)
    splits = ROWS // BLOCK_R
    partial = torch.full((4, splits, K), float("nan"))
    stats_kernels._bn_stats_partial_kernel.fn[(1, splits)](
        x, partial, C=K, rows_per_split=BLOCK_R, cols_per_split=K, splits_k=1, partial_field_stride=splits * K,
        mask_ptr=counted, **mask_strides, tickets_ptr=None, mean_ptr=None, invstd_ptr=None, inv_counts_ptr=None,
        running_mean_ptr=None, running_var_ptr=None, num_batches_tracked_ptr=None, momentum_hi=0.0, momentum_lo=0.0,
        eps=0.0, COMBINE=False, UPDATE_RUNNING=False, COUNT_STEP=False, CUMULATIVE_AVERAGE=False, EVICT_LAST=True,
        **_strides("x"), **_common(**{"MASKED": False, **flag}))
    weights = torch.ones(ROWS, 1, dtype=torch.float64) if counted is None else counted.double()[:, None]
    pivot = x[0] if counted is None else x[int(counted.nonzero()[0])]  # the first counted position's
    assert torch.equal(partial[3], pivot.float().expand(splits, K))
    shifted = (x.double() - pivot.double()).view(splits, BLOCK_R, K)
    weights = weights.expand(ROWS, K).reshape(splits, BLOCK_R, K)
    count = weights.sum(1)
    assert torch.equal(partial[2].double(), count), "every split counts its rows"
    mean = (shifted * weights).sum(1) / count
    torch.testing.assert_close(partial[0].double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(partial[1].double(), ((shifted - mean[:, None]) ** 2 * weights).sum(1),
                               rtol=1e-5, atol=1e-5)


def _per_channel(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, generator=g), torch.rand(K, generator=g) + 0.5


def test_normalize_of_2_31_rows():
    x, (mean, invstd), (weight, bias) = _data(2), _per_channel(3), _per_channel(4)
    y = torch.full((ROWS, K), float("nan"), dtype=torch.float16)
    normalize_kernels._bn_normalize_kernel.fn[(ROWS // BLOCK_R,)](
        x, None, y, mean, invstd, weight, bias, **_strides("x"), **_strides("r"), **_strides("y"), eps=0.0,
        slope_hi=0.0, slope_lo=0.0, STAT_IS_VAR=False, HAS_WEIGHT=True, HAS_BIAS=True, ACTIVATION=0,
        HAS_RESIDUAL=False, FLAT=False, FLAT_INNER=1, FLAT_C=1, L2_REVERSED=True, **_common())
    expected = (x.double() - mean.double()) * invstd.double() * weight.double() + bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_backward_of_2_31_rows(masked):
    """The reduction's sums over the grid's rows (its last program combines them), then dx (a
    masked forward's: 1 / M_c from its counts, the projection only where the mask counts)."""
    x, dy, (mean, invstd), (weight, _) = _data(5), _data(6), _per_channel(7), _per_channel(8)
    counted, mask_strides, flag = _mask(10, masked)
    splits = ROWS // BLOCK_R
    partial = torch.full((2, splits, K), float("nan"))
    sums = torch.full((2, K), float("nan"))
    backward_kernels._bn_backward_partial_kernel.fn[(1, splits)](
        x, dy, None, mean, invstd, None, None, partial, C=K, **_strides("x"), **_strides("dy"), **_strides("r"),
        rows_per_split=BLOCK_R, cols_per_split=K, splits_k=1, partial_field_stride=splits * K, eps=0.0,
        slope_hi=0.0, slope_lo=0.0, tickets_ptr=torch.zeros(1, dtype=torch.int32), sums_ptr=sums,
        grad_weight_ptr=None, grad_bias_ptr=None, STAT_IS_VAR=False, HAS_WEIGHT=False, HAS_BIAS=False,
        ACTIVATION=0, HAS_RESIDUAL=False, FROM_OUTPUT=False, FUSED=False, HAS_GRAD_WEIGHT=False,
        HAS_GRAD_BIAS=False, EVICT_LAST=True, **_common())
    xmu, dy64 = x.double() - mean.double(), dy.double()
    torch.testing.assert_close(sums.double(), torch.stack([dy64.sum(0), (dy64 * xmu).sum(0)]), rtol=1e-5, atol=1e-4)
    dx = torch.full((ROWS, K), float("nan"), dtype=torch.float16)
    inv_count = 1.0 / ROWS if counted is None else 1.0 / int(counted.sum())
    backward_kernels._bn_backward_dx_kernel.fn[(ROWS // BLOCK_R,)](
        x, dy, dx, None, None, mean, invstd, weight, None, sums, C=K, **_strides("x"), **_strides("dy"),
        **_strides("dx"), **_strides("r"),
        inv_counts_ptr=None if counted is None else torch.tensor([[inv_count, 0.0]] * K, dtype=torch.float32),
        mask_ptr=counted, **mask_strides, inv_count_hi=inv_count if counted is None else float("nan"),
        inv_count_lo=0.0, eps=0.0, slope_hi=0.0, slope_lo=0.0, TRAINING=True, STAT_IS_VAR=False, HAS_WEIGHT=True,
        HAS_BIAS=False, ACTIVATION=0, HAS_RESIDUAL=False, FROM_OUTPUT=False, WRITE_DRESIDUAL=False, FUSED=False,
        FLAT=False, FLAT_INNER=1, FLAT_C=1, L2_REVERSED=True, **_common(**{"MASKED": False, **flag}))
    a, s = invstd.double() * weight.double(), sums.double()
    expected = (dy64 - s[0] * inv_count - xmu * invstd.double() ** 2 * s[1] * inv_count) * a
    if counted is not None:
        expected = torch.where(counted[:, None], expected, dy64 * a)
    torch.testing.assert_close(dx.double(), expected, rtol=2e-3, atol=2e-3)
