"""Batch statistics in two passes: per-split partial moments, then a per-channel combine.

    mean_c   = (1/M) sum x            (M = N * S elements of channel c)
    var_c    = (1/M) sum (x - mean_c)^2           (biased, used to normalize)
    invstd_c = 1 / sqrt(var_c + eps)
    running_mean <- (1 - m) running_mean + m mean_c
    running_var  <- (1 - m) running_var  + m var_c * M / (M - 1)

Pass 1 splits every channel's M elements over many programs (enough to fill the GPU even
with 3 channels); each writes float (shifted mean, M2, count, pivot) partials. Pass 2 merges a
channel's partials in a fixed order — no atomics, so results are bitwise identical run to
run — and updates the running statistics in place. The combine is not autotuned: an
autotuner would re-run it and apply the in-place momentum update several times.

Accuracy when |mean| >> std: every program subtracts the same per-channel pivot (the
channel's first element) before summing, so sums and group means are of values O(std) and
their rounding does not grow with the offset; the pivot is added back once, at the end.
NaN and +-Inf: the mean is a plain sum of the (shifted) values, as torch's is, so a
non-finite value gives torch's mean wherever it sits, and the variance is NaN (as torch's).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .helpers import (_channel_pivot, _invstd, _is_finite, _lane_counts, _merge_groups,
                      _split_bounds, _tile_offsets, _wide_scalar, split_float)
from .launch import Launch, tensor_key
from .tuning import autotune_tiles, cdiv, stats_splits
from .view import NQKView


@autotune_tiles()
@triton.jit
def _bn_stats_partial_kernel(
    x_ptr,  # [N, Q, K] view of the input, strides x_{n,q,k}_stride
    partial_ptr,  # [4, P, C] moments per split: shifted mean, M2, count, pivot (ACC_DTYPE)
    N, Q, K, C,
    x_n_stride, x_q_stride, x_k_stride,
    rows_per_split, cols_per_split, splits_k,
    partial_field_stride,  # P * C
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)  # channels-first: the channel; channels-last: a channel block
    pid_split = tl.program_id(1)
    row_lo, row_hi, col_lo, col_hi = _split_bounds(pid_c, pid_split, N, Q, K, rows_per_split,
                                                   cols_per_split, splits_k, CHANNELS_LAST, BLOCK_K)
    # Every program of a channel shifts by the same pivot, the channel's first element, so the
    # sums below are of values O(std) however large |mean| is (shifted data, Chan et al. 1983).
    pivot = _channel_pivot(x_ptr, pid_c, col_lo, K, x_q_stride, x_k_stride, CHANNELS_LAST, ACC_DTYPE, BLOCK_K)
    if CHANNELS_LAST:
        channels = col_lo + tl.arange(0, BLOCK_K)
        pivot_tile = pivot[None, :]
    else:
        pivot_tile = pivot
    # Per-lane sums live in registers across tiles; lanes merge once, after the loop.
    shifted_sum = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)
    shifted_sq = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)
    for col0 in range(col_lo, col_hi, BLOCK_K):
        cols = col0 + tl.arange(0, BLOCK_K)
        for row0 in range(row_lo, row_hi, BLOCK_R):
            rows = row0 + tl.arange(0, BLOCK_R)
            offsets = _tile_offsets(rows, cols, pid_c, Q, x_n_stride, x_q_stride, x_k_stride, CHANNELS_LAST)
            valid = (rows < row_hi)[:, None] & (cols < col_hi)[None, :]
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
            d = tl.where(valid, x.to(ACC_DTYPE) - pivot_tile, 0.0)
            shifted_sum += d
            shifted_sq += d * d
    count = _lane_counts(row_hi - row_lo, col_hi - col_lo, CHANNELS_LAST, BLOCK_R, BLOCK_K).to(ACC_DTYPE)
    lane_mean = shifted_sum / tl.maximum(count, 1.0)
    # q - s^2/n is benign here: the values are shifted to O(std); the clamp absorbs rounding.
    lane_m2 = tl.maximum(shifted_sq - shifted_sum * lane_mean, 0.0)
    mean, m2, count = _merge_groups(lane_mean, lane_m2, count, 0)
    out = partial_ptr + pid_split * C
    if CHANNELS_LAST:
        mask = channels < K
        tl.store(out + channels, mean, mask=mask)
        tl.store(out + partial_field_stride + channels, m2, mask=mask)
        tl.store(out + 2 * partial_field_stride + channels, count, mask=mask)
        tl.store(out + 3 * partial_field_stride + channels, pivot, mask=mask)
    else:
        mean_c, m2_c, count_c = _merge_groups(mean, m2, count, 0)
        tl.store(out + pid_c, mean_c)
        tl.store(out + partial_field_stride + pid_c, m2_c)
        tl.store(out + 2 * partial_field_stride + pid_c, count_c)
        tl.store(out + 3 * partial_field_stride + pid_c, pivot)


@triton.jit
def _bn_stats_combine_kernel(
    partial_ptr,  # moments of P groups per channel: shifted mean at p*group_stride + c,
    P, C,  #        M2 at + field_stride, count at + 2*field_stride, pivot at + 3*field_stride
    partial_group_stride, partial_field_stride,
    mean_ptr,  # [C] out: batch mean
    invstd_ptr,  # [C] out: 1 / sqrt(biased var + eps)
    moments_ptr,  # [4, C] out (WRITE_MOMENTS): merged shifted mean, M2, count, pivot
    running_mean_ptr, running_var_ptr,  # [C] updated in place (UPDATE_RUNNING)
    num_batches_tracked_ptr,  # int64 counter; momentum = 1 / counter (CUMULATIVE_AVERAGE)
    momentum_hi, momentum_lo, eps,  # momentum = hi + lo (see split_float)
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr, WRITE_MOMENTS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    acc_dtype = partial_ptr.dtype.element_ty
    # The groups' pivots agree for the splits of one input; groups from different ranks differ,
    # so all are re-shifted to one common pivot (a sample value of a non-empty group: the
    # difference of two nearby samples is exact).
    pivot = tl.full([BLOCK_C], float("-inf"), acc_dtype)
    for p0 in range(0, P, BLOCK_P):
        groups = p0 + tl.arange(0, BLOCK_P)
        mask = (groups < P)[:, None] & channel_mask[None, :]
        offsets = groups[:, None].to(tl.int64) * partial_group_stride + channels[None, :]
        g_count = tl.load(partial_ptr + 2 * partial_field_stride + offsets, mask=mask, other=0.0)
        g_pivot = tl.load(partial_ptr + 3 * partial_field_stride + offsets, mask=mask, other=0.0)
        pivot = tl.maximum(pivot, tl.max(tl.where(g_count > 0, g_pivot, float("-inf")), 0))
    pivot = tl.where(pivot == float("-inf"), 0.0, pivot)
    # Pass 1: the mean as a plain sum, so NaN and +-Inf propagate as torch's sum does, wherever
    # they sit (a running Chan merge would turn inf followed by finite values into NaN).
    total = tl.zeros([BLOCK_C], acc_dtype)
    count = tl.zeros([BLOCK_C], acc_dtype)
    for p0 in range(0, P, BLOCK_P):
        g_mean, g_count = _load_group_mean(partial_ptr, p0, P, C, partial_group_stride, partial_field_stride,
                                           channels, channel_mask, pivot, BLOCK_P)
        total += tl.sum(g_count * g_mean, 0)
        count += tl.sum(g_count, 0)
    shifted_mean = total / tl.maximum(count, 1.0)
    # Pass 2: M2 = sum over groups of M2_g + n_g (mean_g - mean)^2, exact for any split.
    m2 = tl.zeros([BLOCK_C], acc_dtype)
    for p0 in range(0, P, BLOCK_P):
        g_mean, g_count = _load_group_mean(partial_ptr, p0, P, C, partial_group_stride, partial_field_stride,
                                           channels, channel_mask, pivot, BLOCK_P)
        groups = p0 + tl.arange(0, BLOCK_P)
        mask = (groups < P)[:, None] & channel_mask[None, :]
        offsets = groups[:, None].to(tl.int64) * partial_group_stride + channels[None, :]
        g_m2 = tl.load(partial_ptr + partial_field_stride + offsets, mask=mask, other=0.0)
        delta = g_mean - shifted_mean[None, :]
        m2 += tl.sum(g_m2 + tl.where(g_count > 0, g_count * delta * delta, 0.0), 0)
    mean = pivot + shifted_mean
    # torch's variance of a channel holding NaN or +-Inf is NaN (x - mean is NaN somewhere).
    m2 = tl.where(_is_finite(mean), m2, float("nan"))
    var = m2 / tl.maximum(count, 1.0)
    tl.store(mean_ptr + channels, mean, mask=channel_mask)
    tl.store(invstd_ptr + channels, _invstd(var, eps), mask=channel_mask)
    if WRITE_MOMENTS:
        tl.store(moments_ptr + channels, shifted_mean, mask=channel_mask)
        tl.store(moments_ptr + C + channels, m2, mask=channel_mask)
        tl.store(moments_ptr + 2 * C + channels, count, mask=channel_mask)
        tl.store(moments_ptr + 3 * C + channels, pivot, mask=channel_mask)
    if UPDATE_RUNNING:
        if CUMULATIVE_AVERAGE:
            factor = 1.0 / tl.load(num_batches_tracked_ptr).to(acc_dtype)
        else:
            factor = _wide_scalar(momentum_hi, momentum_lo, acc_dtype)
        unbiased_var = m2 / (count - 1.0)
        old_mean = tl.load(running_mean_ptr + channels, mask=channel_mask)
        old_var = tl.load(running_var_ptr + channels, mask=channel_mask)
        new_mean = (1.0 - factor) * old_mean.to(acc_dtype) + factor * mean
        new_var = (1.0 - factor) * old_var.to(acc_dtype) + factor * unbiased_var
        tl.store(running_mean_ptr + channels, new_mean.to(old_mean.dtype), mask=channel_mask)
        tl.store(running_var_ptr + channels, new_var.to(old_var.dtype), mask=channel_mask)


@triton.jit
def _load_group_mean(partial_ptr, p0, P, C, group_stride, field_stride, channels, channel_mask, pivot,
                     BLOCK_P: tl.constexpr):
    """[BLOCK_P, BLOCK_C] group means re-shifted to ``pivot``, and the groups' counts."""
    groups = p0 + tl.arange(0, BLOCK_P)
    mask = (groups < P)[:, None] & channel_mask[None, :]
    offsets = groups[:, None].to(tl.int64) * group_stride + channels[None, :]
    g_mean = tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    g_count = tl.load(partial_ptr + 2 * field_stride + offsets, mask=mask, other=0.0)
    g_pivot = tl.load(partial_ptr + 3 * field_stride + offsets, mask=mask, other=0.0)
    g_mean = tl.where(g_count > 0, (g_pivot - pivot[None, :]) + g_mean, 0.0)
    return g_mean, g_count


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for double input (torch's double path), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_PARTIAL = Launch(_bn_stats_partial_kernel)
_COMBINE = Launch(_bn_stats_combine_kernel)


@functools.lru_cache(maxsize=4096)
def _partial_spec(geometry: tuple, dtype: torch.dtype, device: torch.device, splits: Optional[int]):
    """Everything about a statistics-partial launch that the input's geometry fixes: the
    partial buffer's shape, the grid, the int arguments, the constexprs (cached per shape)."""
    N, Q, K, n_stride, q_stride, k_stride, channels_last = geometry
    C = K if channels_last else Q
    split = stats_splits(N, Q, K, channels_last, device, splits)
    if channels_last:
        grid = lambda meta: (cdiv(C, meta["BLOCK_K"]), split.num)  # noqa: E731
    else:
        grid = (C, split.num)
    ints = (N, Q, K, C, n_stride, q_stride, k_stride, split.rows_per_split, split.cols_per_split, split.splits_k,
            split.num * C)
    return (4, split.num, C), grid, ints, dict(CHANNELS_LAST=channels_last, ACC_DTYPE=tl_dtype(dtype))


def bn_stats_partial(view: NQKView, splits: Optional[int] = None) -> torch.Tensor:
    """Pass 1: per-split moments, a [4, P, C] tensor of the accumulation dtype: the mean of
    x - pivot, M2, count, and the pivot (the same for every split of a channel)."""
    x = view.tensor
    key = (view[1:], x.dtype, x.device, splits)
    shape, grid, ints, constexprs = _partial_spec(*key)
    partial = torch.empty(shape, dtype=acc_dtype(x.dtype), device=x.device)
    _PARTIAL((key, x.data_ptr() & 15), grid, (x, partial, *ints), constexprs)
    return partial


def bn_stats_combine(partial: torch.Tensor, eps: float,
                     running_mean: Optional[torch.Tensor] = None,
                     running_var: Optional[torch.Tensor] = None,
                     momentum: float = 0.1,
                     num_batches_tracked: Optional[torch.Tensor] = None,
                     return_moments: bool = False):
    """Pass 2: merge ``partial`` [4, P, C] into (save_mean, save_invstd[, moments [4, C]]);
    updates the running statistics in place when given.

    ``num_batches_tracked`` (a device counter, already incremented) replaces ``momentum`` by
    the cumulative-average factor 1 / num_batches_tracked without a host sync.
    """
    return _combine(partial, partial.shape[1], partial.stride(1), partial.stride(0), eps,
                    running_mean, running_var, momentum, num_batches_tracked, return_moments)


def bn_stats_combine_groups(moments: torch.Tensor, eps: float, **kwargs):
    """Combine per-group moments stacked as [G, 4, C] (e.g. all-gathered from ranks), each group
    as ``bn_stats_combine(..., return_moments=True)`` returns it; pivots may differ by group."""
    return _combine(moments, moments.shape[0], moments.stride(0), moments.stride(1), eps, **kwargs)


def _combine(partial, P, group_stride, field_stride, eps, running_mean=None, running_var=None,
             momentum=0.1, num_batches_tracked=None, return_moments=False):
    assert partial.stride(-1) == 1, "moments must have unit channel stride"
    C = partial.shape[-1]
    mean = torch.empty(C, dtype=partial.dtype, device=partial.device)
    invstd = torch.empty_like(mean)
    moments = torch.empty((4, C), dtype=partial.dtype, device=partial.device) if return_moments else None
    update = running_mean is not None
    # Unused pointers are None, never another argument: a compiler that cannot see which
    # arguments a kernel writes must not find an output aliased with an input.
    running_mean, running_var = (running_mean, running_var) if update else (None, None)
    cumulative = num_batches_tracked is not None
    key = (P, C, group_stride, field_stride, return_moments, update, cumulative,
           tensor_key(partial, running_mean, running_var, num_batches_tracked))
    grid, constexprs = _combine_spec(C, update, cumulative, return_moments)
    _COMBINE(key, grid, (
        partial, P, C, group_stride, field_stride, mean, invstd, moments,
        running_mean, running_var, num_batches_tracked, *split_float(momentum), float(eps),
    ), constexprs)
    return (mean, invstd, moments) if return_moments else (mean, invstd)


@functools.lru_cache(maxsize=1024)
def _combine_spec(C: int, update: bool, cumulative: bool, return_moments: bool):
    BLOCK_C = min(128, _next_power_of_2(C))
    return (cdiv(C, BLOCK_C),), dict(UPDATE_RUNNING=update, CUMULATIVE_AVERAGE=cumulative,
                                     WRITE_MOMENTS=return_moments, BLOCK_P=32, BLOCK_C=BLOCK_C)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
