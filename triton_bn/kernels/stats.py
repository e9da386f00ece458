"""Batch statistics in two passes: per-split partial moments, then a per-channel combine.

    mean_c   = (1/M) sum x            (M = N * S elements of channel c)
    var_c    = (1/M) sum (x - mean_c)^2           (biased, used to normalize)
    invstd_c = 1 / sqrt(var_c + eps)
    running_mean <- (1 - m) running_mean + m mean_c
    running_var  <- (1 - m) running_var  + m var_c * M / (M - 1)

Pass 1 splits every channel's M elements over many programs (enough to fill the GPU even
with 3 channels); each writes float (shifted mean, M2, count, pivot) partials. Pass 2 merges a
channel's partials in split order and updates the running statistics in place; ``bn_stats``
folds it into pass 1 (the program that draws its channel's last ticket runs it, tickets.py),
SyncBatchNorm runs it as combine.py's kernel. The combine is not autotuned: an autotuner
would re-run it and apply the in-place momentum update several times.

Reproducibility. The only atomics are on integers (the tickets, the step counter's
increment): no float is accumulated atomically, and the combine reads every partial from
memory in split order, so which program combines changes no bit (tests/test_program_order.py
runs the grid in other orders). The same input, split (a function of the shape and the GPU's
SM count), config and Triton version give the same bits run to run; the config is the
autotuner's choice, fixed by a tuning file or TRITON_BN_PIN_CONFIG=1 (else only within a
process, after tuning). Another config or split changes the partials, hence the bits; on a
GPU the folded combine and combine.py's kernel merge the same partials with different
reduction trees (their blocks differ), so they agree to rounding, not to the bit (the
interpreter's reductions agree bitwise at the split counts tests/test_kernels.py checks: an
interpreter fact, not a GPU one).

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

from .helpers import (_channel_pivot, _combine_block, _count_step, _l2_policy, _lane_counts, _last_of_channel,
                      _merge_groups, _release_ticket, _split_bounds, _tile_offsets, _wide, split_float)
from .masking import _counted, _first_counted
from .combine import _combine_channels
from .launch import Launch, fresh, tensor_key
from .tickets import tickets as _tickets
from .tuning import autotune_tiles, cdiv, stats_splits
from .view import NQKView, _addressing, split_addressing


@autotune_tiles()
@triton.jit
def _bn_stats_partial_kernel(
    x_ptr,  # [N, Q, K] view of the input, strides x_{n,q,k}_stride
    partial_ptr,  # [4, P, C] moments per split: shifted mean, M2, count, pivot (ACC_DTYPE)
    N, Q, K, C,
    x_n_stride, x_q_stride, x_k_stride,
    rows_per_split, cols_per_split, splits_k,
    partial_field_stride,  # P * C
    mask_ptr,  # (MASKED) bool [N, Q, K] view, strides mask_{n,q,k}_stride, 0 along the channel axis
    mask_n_stride, mask_q_stride, mask_k_stride,
    tickets_ptr,  # [programs along axis 0 + 1] int32, zero between calls (COMBINE)
    mean_ptr, invstd_ptr,  # [C] out (COMBINE): batch mean, 1 / sqrt(biased var + eps)
    inv_counts_ptr,  # [C, 2] out (COMBINE and MASKED): 1 / M_c of the counted elements, float32 (hi, lo)
    running_mean_ptr, running_var_ptr,  # [C] updated in place (COMBINE and UPDATE_RUNNING)
    num_batches_tracked_ptr,  # [] int64 step counter, incremented once (COUNT_STEP)
    momentum_hi, momentum_lo, eps,  # momentum = hi + lo (see split_float)
    COMBINE: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    COUNT_STEP: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr,  # momentum = 1 / (counter + 1)
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr,  # addressing (helpers._row_offsets)
    EVICT_LAST: tl.constexpr,  # x loads evict_last: normalize reads x again from L2 (tuning.l2_passes)
    MASKED: tl.constexpr,  # statistics over the positions the mask counts (masked batch norm)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)  # channels-first: the channel; channels-last: a channel block
    pid_split = tl.program_id(1)
    row_lo, row_hi, col_lo, col_hi = _split_bounds(pid_c, pid_split, N, Q, K, rows_per_split,
                                                   cols_per_split, splits_k, CHANNELS_LAST, BLOCK_K, INDEX_64)
    # Every program of a channel shifts by the same pivot, the channel's first element, so the
    # sums below are of values O(std) however large |mean| is (shifted data, Chan et al. 1983).
    base = 0
    if MASKED:
        base = _first_counted(mask_ptr, N, Q, K, mask_n_stride, mask_q_stride, mask_k_stride, x_n_stride,
                              x_q_stride, x_k_stride, CHANNELS_LAST, INDEX_64)
    pivot = _channel_pivot(x_ptr, pid_c, col_lo, K, x_q_stride, x_k_stride, CHANNELS_LAST, ACC_DTYPE, BLOCK_K, base)
    if CHANNELS_LAST:
        channels = col_lo + tl.arange(0, BLOCK_K)
        pivot_tile = pivot[None, :]
    else:
        pivot_tile = pivot
    # Per-lane sums live in registers across tiles; lanes merge once, after the loop.
    shifted_sum = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)
    shifted_sq = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)
    counted = tl.zeros([BLOCK_R, BLOCK_K], ACC_DTYPE)  # MASKED: the lanes' counts, else known (_lane_counts)
    for col0 in range(col_lo, col_hi, BLOCK_K):
        cols = col0 + tl.arange(0, BLOCK_K)
        for row0 in range(row_lo, row_hi, BLOCK_R):
            rows = row0 + tl.arange(0, BLOCK_R)
            offsets = _tile_offsets(rows, cols, pid_c, Q, x_n_stride, x_q_stride, x_k_stride, CHANNELS_LAST,
                                    DENSE_ROWS, INDEX_64)
            valid = (rows < row_hi)[:, None] & (cols < col_hi)[None, :]
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0, eviction_policy=_l2_policy(EVICT_LAST, "evict_last"))
            if MASKED:
                valid = _counted(mask_ptr, rows, cols, pid_c, Q, mask_n_stride, mask_q_stride, mask_k_stride, valid,
                                 rows < row_hi, False, CHANNELS_LAST, False, DENSE_ROWS, INDEX_64, MASKED)
                counted += valid.to(ACC_DTYPE)
            d = tl.where(valid, x.to(ACC_DTYPE) - pivot_tile, 0.0)
            shifted_sum += d
            shifted_sq += d * d
    if MASKED:
        count = counted
    else:
        count = _lane_counts(row_hi - row_lo, col_hi - col_lo, CHANNELS_LAST, BLOCK_R, BLOCK_K).to(ACC_DTYPE)
    lane_mean = shifted_sum / tl.maximum(count, 1.0)
    # q - s^2/n is benign here: the values are shifted to O(std); the clamp absorbs rounding.
    lane_m2 = tl.maximum(shifted_sq - shifted_sum * lane_mean, 0.0)
    mean, m2, count = _merge_groups(lane_mean, lane_m2, count, 0)
    out = partial_ptr + _wide(pid_split, INDEX_64) * C
    field = _wide(partial_field_stride, INDEX_64)  # P*C: 3 fields past it may pass 2^31
    if CHANNELS_LAST:
        mask = channels < K
        tl.store(out + channels, mean, mask=mask)
        tl.store(out + field + channels, m2, mask=mask)
        tl.store(out + 2 * field + channels, count, mask=mask)
        tl.store(out + 3 * field + channels, pivot, mask=mask)
    else:
        mean_c, m2_c, count_c = _merge_groups(mean, m2, count, 0)
        tl.store(out + pid_c, mean_c)
        tl.store(out + field + pid_c, m2_c)
        tl.store(out + 2 * field + pid_c, count_c)
        tl.store(out + 3 * field + pid_c, pivot)
    if COMBINE:
        # The last program of a channel (block) to finish merges every split's partials, in
        # split order: one launch fewer (reproducibility: the module docstring).
        last, channels = _last_of_channel(tickets_ptr, pid_c, col_lo, CHANNELS_LAST, BLOCK_K)
        if last:
            _combine_channels(partial_ptr, tl.num_programs(1), C, C, partial_field_stride, channels, channels < C,
                              mean_ptr, invstd_ptr, inv_counts_ptr, None, running_mean_ptr, running_var_ptr,
                              num_batches_tracked_ptr, momentum_hi, momentum_lo, eps,
                              UPDATE_RUNNING, CUMULATIVE_AVERAGE, False,
                              _combine_block(BLOCK_R, BLOCK_K, CHANNELS_LAST), COUNT_STEP, INDEX_64, MASKED)
            _release_ticket(tickets_ptr, pid_c)
            if COUNT_STEP:
                _count_step(tickets_ptr + tl.num_programs(0), num_batches_tracked_ptr)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for double input (torch's double path), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_PARTIAL = Launch(_bn_stats_partial_kernel)


@functools.lru_cache(maxsize=4096)
def _partial_spec(geometry: tuple, dtype: torch.dtype, device: torch.device, splits: Optional[int],
                  mask_geometry: Optional[tuple] = None):
    """Everything about a statistics-partial launch that the input's geometry (and a mask's)
    fixes: the partial buffer's shape, the grid, the int arguments up to the mask pointer, the
    mask's strides, the constexprs (cached per shape)."""
    N, Q, K, n_stride, q_stride, k_stride, channels_last = geometry
    C = K if channels_last else Q
    split = stats_splits(N, Q, K, channels_last, device, splits)
    if channels_last:
        grid = lambda meta: (cdiv(C, meta["BLOCK_K"]), split.num)  # noqa: E731
    else:
        grid = (C, split.num)
    ints = (N, Q, K, C, n_stride, q_stride, k_stride, split.rows_per_split, split.cols_per_split, split.splits_k,
            split.num * C)
    masked = mask_geometry is not None
    constexprs = dict(CHANNELS_LAST=channels_last, ACC_DTYPE=tl_dtype(dtype), MASKED=masked,
                      **split_addressing(_addressing((geometry, mask_geometry) if masked else (geometry,)),
                                         split, C, 4))
    return (4, split.num, C), grid, ints, mask_geometry[3:6] if masked else (0, 0, 0), constexprs


def bn_stats_partial(view: NQKView, splits: Optional[int] = None, mask: Optional[NQKView] = None) -> torch.Tensor:
    """Pass 1 alone: per-split moments, a [4, P, C] tensor of the accumulation dtype: the mean
    of x - pivot, M2, count, and the pivot (the same for every split of a channel). For
    callers that combine groups themselves (SyncBatchNorm merges every rank's). ``mask``
    (view.mask_view): only the positions it counts enter the moments."""
    x = view.tensor
    key = (view[1:], x.dtype, x.device, splits, None if mask is None else mask[1:])
    shape, grid, ints, mask_strides, constexprs = _partial_spec(*key)
    partial = torch.empty(shape, dtype=acc_dtype(x.dtype), device=x.device)
    _PARTIAL((key, False, x.data_ptr() & 15), grid,
             (x, partial, *ints, None if mask is None else mask.tensor, *mask_strides,
              None, None, None, None, None, None, None, 0.0, 0.0, 0.0),
             dict(constexprs, COMBINE=False, UPDATE_RUNNING=False, COUNT_STEP=False, CUMULATIVE_AVERAGE=False,
                  EVICT_LAST=False))
    return partial


def bn_stats(view: NQKView, eps: float, running_mean: Optional[torch.Tensor] = None,
             running_var: Optional[torch.Tensor] = None, momentum: Optional[float] = 0.1,
             num_batches_tracked: Optional[torch.Tensor] = None, splits: Optional[int] = None,
             evict_last: bool = False, mask: Optional[NQKView] = None):
    """(save_mean, save_invstd) in one launch: the partial pass, whose last program per
    channel (block) combines; running statistics (contiguous) updated in place, exactly once.
    ``mask`` (view.mask_view): statistics over the positions it counts; then (save_mean,
    save_invstd, inv_counts), inv_counts the backward's 1 / M_c per channel ([C, 2] float32 hi, lo).

    ``num_batches_tracked``: the step counter, incremented by this launch (exactly once);
    ``momentum=None`` replaces momentum by the cumulative-average factor 1 / (its new value),
    read on the device (no host sync). ``evict_last``: x's loads keep it in L2 for the normalize
    that follows (tuning.l2_passes). The first call
    of a shape autotunes on scratch copies of the running statistics, so benchmarking the
    candidates never moves the real ones."""
    x = view.tensor
    geometry_key = (view[1:], x.dtype, x.device, splits, None if mask is None else mask[1:])
    shape, grid, ints, mask_strides, constexprs = _partial_spec(*geometry_key)
    acc = acc_dtype(x.dtype)
    partial = fresh(torch.empty(shape, dtype=acc, device=x.device))
    mean = fresh(torch.empty(shape[2], dtype=acc, device=x.device))
    invstd = fresh(torch.empty(shape[2], dtype=acc, device=x.device))
    m = None if mask is None else mask.tensor
    inv_counts = None if mask is None else fresh(torch.empty((shape[2], 2), dtype=torch.float32, device=x.device))
    update = running_mean is not None
    count = num_batches_tracked is not None
    cumulative = momentum is None
    if cumulative and not (count and update):
        raise ValueError("bn_stats: momentum=None (cumulative average) needs the running statistics and "
                         "num_batches_tracked")
    key = (geometry_key, True, update, count, tensor_key(x, running_mean, running_var, num_batches_tracked, m),
           momentum, eps, evict_last)
    tickets = _tickets(x.device, shape[2] + 1)  # one per channel block, one for the step counter
    tensors = tuple(t for t in (x, partial, m, tickets, mean, invstd, inv_counts, running_mean, running_var,
                                num_batches_tracked) if t is not None)

    def build():
        args = (x, partial, *ints, m, *mask_strides, tickets, mean, invstd, inv_counts, running_mean, running_var,
                num_batches_tracked, *split_float(0.0 if cumulative else momentum), float(eps))
        return grid, args, _fused_constexprs(constexprs["CHANNELS_LAST"], constexprs["ACC_DTYPE"],
                                             constexprs["DENSE_ROWS"], constexprs["INDEX_64"], update, count,
                                             cumulative, evict_last, m is not None), \
            tuple(i for i, t in zip(_MUTATED_ARGS, (running_mean, running_var, num_batches_tracked)) if t is not None)
    _PARTIAL.run(key, tensors, build)
    return (mean, invstd) if m is None else (mean, invstd, inv_counts)


_PARTIAL = Launch(_bn_stats_partial_kernel)
# Updated in place: the first call of a key tunes on clones of them (Launch's scratch).
_MUTATED_ARGS = tuple(_PARTIAL.names.index(name)
                      for name in ("running_mean_ptr", "running_var_ptr", "num_batches_tracked_ptr"))


@functools.lru_cache(maxsize=64)
def _fused_constexprs(channels_last, acc, dense_rows: bool, index_64: bool, update: bool, count: bool,
                      cumulative: bool, evict_last: bool, masked: bool) -> dict:
    return dict(CHANNELS_LAST=channels_last, ACC_DTYPE=acc, DENSE_ROWS=dense_rows, INDEX_64=index_64, COMBINE=True,
                UPDATE_RUNNING=update, COUNT_STEP=count, CUMULATIVE_AVERAGE=cumulative, EVICT_LAST=evict_last,
                MASKED=masked)
