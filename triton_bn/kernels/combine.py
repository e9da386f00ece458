"""The statistics combine: merge per-group moments into per-channel statistics.

Groups are the splits of one input (stats.py writes them) or, for SyncBatchNorm, the ranks'
moments. Each group is (shifted mean, M2, count, pivot). All groups are re-shifted to one
common pivot (for splits of one input the pivots agree; ranks' pivots differ by an exact
amount), then

    mean = pivot + sum(n_g mean_g) / n          a plain sum: NaN and +-Inf as torch's
    M2   = sum(M2_g + n_g (mean_g - mean)^2)    exact for any grouping
    var  = M2 / n  (NaN when mean is not finite, as torch's)

and the running statistics move by momentum (or 1 / num_batches_tracked, read on the
device), once: this runs either as its own kernel or in the last program of the statistics
kernel, never under an autotuner's repeated calls.

Groups are read from memory BLOCK_P at a time, in group order; within a block the sums are a
Triton reduction whose tree depends on BLOCK_P and the warps. This kernel (BLOCK_P = 32) and
the statistics kernel's folded combine (BLOCK_P from its tile, helpers._combine_block) thus
round differently on a GPU. Each gives the same bits run to run for the same groups and
config, whichever program runs it (stats.py: reproducibility).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .helpers import _invstd, _is_finite, _wide, _wide_scalar, split_float
from .masking import _store_inv_counts
from .launch import Launch, tensor_key
from .tuning import cdiv
from .view import fits_int32


@triton.jit
def _combine_channels(
    partial_ptr, P, C, partial_group_stride, partial_field_stride, channels, channel_mask,
    mean_ptr, invstd_ptr, inv_counts_ptr, moments_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    momentum_hi, momentum_lo, eps,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr, WRITE_MOMENTS: tl.constexpr,
    BLOCK_P: tl.constexpr, COUNT_PENDING: tl.constexpr, INDEX_64: tl.constexpr, WRITE_INV_COUNTS: tl.constexpr,
):
    """Merge the P groups of ``channels`` (a vector) and write their statistics: the body of
    the combine kernel, and of the statistics kernel's last program per channel (stats.py).
    COUNT_PENDING: this launch increments the step counter after every combine has read it,
    so the cumulative factor is 1 / (counter + 1). INDEX_64: the fields' offsets, up to 3 *
    partial_field_stride, reach 2^31 (group offsets are int64 always: P * group_stride is the
    buffer's size)."""
    acc_dtype = partial_ptr.dtype.element_ty
    field = _wide(partial_field_stride, INDEX_64)
    # The groups' pivots agree for the splits of one input; groups from different ranks differ,
    # so all are re-shifted to one common pivot (a sample value of a non-empty group: the
    # difference of two nearby samples is exact).
    pivot = tl.full(channels.shape, float("-inf"), acc_dtype)
    for p0 in range(0, P, BLOCK_P):
        groups = p0 + tl.arange(0, BLOCK_P)
        mask = (groups < P)[:, None] & channel_mask[None, :]
        offsets = groups[:, None].to(tl.int64) * partial_group_stride + channels[None, :]
        g_count = tl.load(partial_ptr + 2 * field + offsets, mask=mask, other=0.0)
        g_pivot = tl.load(partial_ptr + 3 * field + offsets, mask=mask, other=0.0)
        pivot = tl.maximum(pivot, tl.max(tl.where(g_count > 0, g_pivot, float("-inf")), 0))
    pivot = tl.where(pivot == float("-inf"), 0.0, pivot)
    # Pass 1: the mean as a plain sum, so NaN and +-Inf propagate as torch's sum does, wherever
    # they sit (a running Chan merge would turn inf followed by finite values into NaN).
    total = tl.zeros(channels.shape, acc_dtype)
    count = tl.zeros(channels.shape, acc_dtype)
    for p0 in range(0, P, BLOCK_P):
        g_mean, g_count = _load_group_mean(partial_ptr, p0, P, C, partial_group_stride, field,
                                           channels, channel_mask, pivot, BLOCK_P)
        total += tl.sum(g_count * g_mean, 0)
        count += tl.sum(g_count, 0)
    shifted_mean = total / tl.maximum(count, 1.0)
    # Pass 2: M2 = sum over groups of M2_g + n_g (mean_g - mean)^2, exact for any split.
    m2 = tl.zeros(channels.shape, acc_dtype)
    for p0 in range(0, P, BLOCK_P):
        g_mean, g_count = _load_group_mean(partial_ptr, p0, P, C, partial_group_stride, field,
                                           channels, channel_mask, pivot, BLOCK_P)
        groups = p0 + tl.arange(0, BLOCK_P)
        mask = (groups < P)[:, None] & channel_mask[None, :]
        offsets = groups[:, None].to(tl.int64) * partial_group_stride + channels[None, :]
        g_m2 = tl.load(partial_ptr + field + offsets, mask=mask, other=0.0)
        delta = g_mean - shifted_mean[None, :]
        m2 += tl.sum(g_m2 + tl.where(g_count > 0, g_count * delta * delta, 0.0), 0)
    _, _, m2 = _finish_channels(pivot, shifted_mean, m2, count, channels, channel_mask, mean_ptr, invstd_ptr,
                                inv_counts_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, momentum_hi,
                                momentum_lo, eps, UPDATE_RUNNING, CUMULATIVE_AVERAGE, COUNT_PENDING, WRITE_INV_COUNTS)
    if WRITE_MOMENTS:
        tl.store(moments_ptr + channels, shifted_mean, mask=channel_mask)
        tl.store(moments_ptr + C + channels, m2, mask=channel_mask)
        tl.store(moments_ptr + 2 * C + channels, count, mask=channel_mask)
        tl.store(moments_ptr + 3 * C + channels, pivot, mask=channel_mask)


@triton.jit
def _finish_channels(pivot, shifted_mean, m2, count, channels, channel_mask, mean_ptr, invstd_ptr, inv_counts_ptr,
                     running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, momentum_hi, momentum_lo, eps,
                     UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr, COUNT_PENDING: tl.constexpr,
                     WRITE_INV_COUNTS: tl.constexpr):
    """From a channel's merged shifted moments: store save_mean and save_invstd (and, for a
    masked call, WRITE_INV_COUNTS, 1 / M_c for its backward: _store_inv_counts), move the running statistics
    once (UPDATE_RUNNING), return (mean, invstd, m2). Shared by the combine and the on-chip
    forward (onchip.py), which own their channels exclusively.
    COUNT_PENDING: the launch increments the step counter after every program has read it
    (_count_step), so the cumulative factor is 1 / (counter + 1).
    A channel with no counted element (a mask's, or an empty rank's: M_c = 0) gets mean 0 and
    variance 0, and M_c <= 1 an unbiased variance of 0: Keras 3's no-NaN division, no host sync
    to find out. Unmasked calls always have M_c >= 2 (checks.py), which these rules leave alone."""
    acc_dtype = shifted_mean.dtype
    mean = tl.where(count > 0, pivot + shifted_mean, 0.0)
    # torch's variance of a channel holding NaN or +-Inf is NaN (x - mean is NaN somewhere).
    m2 = tl.where(_is_finite(mean), m2, float("nan"))
    var = m2 / tl.maximum(count, 1.0)
    invstd = _invstd(var, eps)
    tl.store(mean_ptr + channels, mean, mask=channel_mask)
    tl.store(invstd_ptr + channels, invstd, mask=channel_mask)
    if WRITE_INV_COUNTS:
        _store_inv_counts(inv_counts_ptr, count, channels, channel_mask)
    if UPDATE_RUNNING:
        if CUMULATIVE_AVERAGE:
            factor = 1.0 / (tl.load(num_batches_tracked_ptr) + COUNT_PENDING).to(acc_dtype)
        else:
            factor = _wide_scalar(momentum_hi, momentum_lo, acc_dtype)
        unbiased_var = tl.where(count > 1, m2 / tl.maximum(count - 1.0, 1.0), 0.0)
        old_mean = tl.load(running_mean_ptr + channels, mask=channel_mask)
        old_var = tl.load(running_var_ptr + channels, mask=channel_mask)
        new_mean = (1.0 - factor) * old_mean.to(acc_dtype) + factor * mean
        new_var = (1.0 - factor) * old_var.to(acc_dtype) + factor * unbiased_var
        tl.store(running_mean_ptr + channels, new_mean.to(old_mean.dtype), mask=channel_mask)
        tl.store(running_var_ptr + channels, new_var.to(old_var.dtype), mask=channel_mask)
    return mean, invstd, m2


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


@triton.jit
def _bn_stats_combine_kernel(
    partial_ptr,  # moments of P groups per channel: shifted mean at p*group_stride + c,
    P, C,  #        M2 at + field_stride, count at + 2*field_stride, pivot at + 3*field_stride
    partial_group_stride, partial_field_stride,
    mean_ptr,  # [C] out: batch mean
    invstd_ptr,  # [C] out: 1 / sqrt(biased var + eps)
    inv_counts_ptr,  # [C, 2] out (WRITE_INV_COUNTS): 1 / M_c as float32 (hi, lo) (a masked call's backward)
    moments_ptr,  # [4, C] out (WRITE_MOMENTS): merged shifted mean, M2, count, pivot
    running_mean_ptr, running_var_ptr,  # [C] updated in place (UPDATE_RUNNING)
    num_batches_tracked_ptr,  # int64 counter; momentum = 1 / counter (CUMULATIVE_AVERAGE)
    momentum_hi, momentum_lo, eps,  # momentum = hi + lo (see split_float)
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr, WRITE_MOMENTS: tl.constexpr,
    WRITE_INV_COUNTS: tl.constexpr, INDEX_64: tl.constexpr,  # field offsets in int64 (_combine_spec)
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    _combine_channels(partial_ptr, P, C, partial_group_stride, partial_field_stride, channels, channel_mask,
                      mean_ptr, invstd_ptr, inv_counts_ptr, moments_ptr, running_mean_ptr, running_var_ptr,
                      num_batches_tracked_ptr, momentum_hi, momentum_lo, eps, UPDATE_RUNNING, CUMULATIVE_AVERAGE,
                      WRITE_MOMENTS, BLOCK_P, False, INDEX_64, WRITE_INV_COUNTS)


_COMBINE = Launch(_bn_stats_combine_kernel)


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
             momentum=0.1, num_batches_tracked=None, return_moments=False, return_inv_counts=False):
    """(mean, invstd[, moments][, inv_counts]): ``return_inv_counts`` adds 1 / M_c of the merged
    groups' counts as [C, 2] float32 (hi, lo) pairs (a masked call's backward divides by them)."""
    assert partial.stride(-1) == 1, "moments must have unit channel stride"
    C = partial.shape[-1]
    mean = torch.empty(C, dtype=partial.dtype, device=partial.device)
    invstd = torch.empty_like(mean)
    moments = torch.empty((4, C), dtype=partial.dtype, device=partial.device) if return_moments else None
    inv_counts = torch.empty((C, 2), dtype=torch.float32, device=partial.device) if return_inv_counts else None
    update = running_mean is not None
    # Unused pointers are None, never another argument: a compiler that cannot see which
    # arguments a kernel writes must not find an output aliased with an input.
    running_mean, running_var = (running_mean, running_var) if update else (None, None)
    cumulative = num_batches_tracked is not None
    key = (P, C, group_stride, field_stride, return_moments, return_inv_counts, update, cumulative,
           tensor_key(partial, running_mean, running_var, num_batches_tracked))
    grid, constexprs = _combine_spec(C, update, cumulative, return_moments, return_inv_counts, field_stride)
    _COMBINE(key, grid, (
        partial, P, C, group_stride, field_stride, mean, invstd, inv_counts, moments,
        running_mean, running_var, num_batches_tracked, *split_float(momentum), float(eps),
    ), constexprs)
    return (mean, invstd) + ((moments,) if return_moments else ()) + ((inv_counts,) if return_inv_counts else ())


@functools.lru_cache(maxsize=1024)
def _combine_spec(C: int, update: bool, cumulative: bool, return_moments: bool, return_inv_counts: bool,
                  field_stride: int):
    """Grid and constexprs; INDEX_64 when the last field's offsets, 3 * field_stride + C, reach 2^31."""
    BLOCK_C = min(128, _next_power_of_2(C))
    return (cdiv(C, BLOCK_C),), dict(UPDATE_RUNNING=update, CUMULATIVE_AVERAGE=cumulative,
                                     WRITE_MOMENTS=return_moments, WRITE_INV_COUNTS=return_inv_counts,
                                     INDEX_64=not fits_int32(3 * field_stride + C),
                                     BLOCK_P=32, BLOCK_C=BLOCK_C)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
