"""@triton.jit building blocks shared by the kernels: addressing and the moment algebra.

Moments of a group of values are (mean, M2, count), M2 = sum((x - mean)^2). Groups merge
exactly (Chan et al.): mean = sum(n_g mean_g) / n, M2 = sum(M2_g + n_g (mean_g - mean)^2).
Sums of x and x^2 are only ever taken of values shifted by a per-channel pivot near the data
(stats.py), never of raw x, whose sum of squares loses every digit when |mean| >> std.
"""
import functools

import triton
import triton.language as tl


@triton.jit
def _row_offsets(rows, channel, Q, n_stride, q_stride, ROWS_ARE_NQ: tl.constexpr, DENSE_ROWS: tl.constexpr,
                 INDEX_64: tl.constexpr):
    """Offsets of rows. ROWS_ARE_NQ: row r is (n, q) = (r // Q, r % Q), which DENSE_ROWS
    (n_stride == Q * q_stride: contiguous and channels-last tensors) turns into r * q_stride,
    with no division; otherwise row r is sample n = r of the fixed q = ``channel``
    (channels-first statistics of one channel). int32 arithmetic unless INDEX_64 (a tensor
    spans 2^31 elements or more): 64-bit multiplies and divisions cost several instructions
    each, per row."""
    if INDEX_64:
        rows = rows.to(tl.int64)
    if ROWS_ARE_NQ:
        if DENSE_ROWS:
            return rows * q_stride
        return (rows // Q) * n_stride + (rows % Q) * q_stride
    else:
        if INDEX_64:
            channel = channel.to(tl.int64)
        return rows * n_stride + channel * q_stride


@triton.jit
def _tile_offsets(rows, cols, channel, Q, n_stride, q_stride, k_stride, ROWS_ARE_NQ: tl.constexpr,
                  DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr):
    """Offsets of a [rows, cols] tile (see _row_offsets); cols run along the K axis."""
    row_offsets = _row_offsets(rows, channel, Q, n_stride, q_stride, ROWS_ARE_NQ, DENSE_ROWS, INDEX_64)
    if INDEX_64:
        cols = cols.to(tl.int64)
    return row_offsets[:, None] + (cols * k_stride)[None, :]


@triton.jit
def _wide(v, INDEX_64: tl.constexpr):
    """v as int64 under INDEX_64, else as it is. v may be a constexpr: Triton specializes an int
    argument equal to 1 (and passes one of 2^31 or more as u32/i64, whatever INDEX_64 says)."""
    if INDEX_64:
        v = tl.cast(v, tl.int64)
    return v


@triton.jit
def _elementwise_tile(pid, N, Q, K, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr, FLAT_INNER: tl.constexpr,
                      FLAT_C: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program ``pid``'s tile of an elementwise kernel: a 1-D grid over [N*Q rows, K cols]
    (1-D because a grid's y/z extents stop at 65535). Returns rows, cols, the tile mask and
    each row's (channels-first) or column's (channels-last) channel with its mask.
    FLAT: a block of BLOCK_R*BLOCK_K flat elements instead (_flat_tile); rows and cols are
    then both the flat offsets, and the channels are per element. Rows and N*Q are int64
    under INDEX_64 (view.addressing: N*Q*K reaches 2^31); the channel is int32 either way."""
    if FLAT:
        offsets, mask, channels = _flat_tile(pid, N, Q, K, FLAT_INNER, FLAT_C, INDEX_64, BLOCK_R * BLOCK_K)
        return offsets, offsets, mask, channels, mask
    else:
        col_blocks = tl.cdiv(K, BLOCK_K)
        rows = _wide(pid // col_blocks, INDEX_64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (pid % col_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_mask = rows < _wide(N, INDEX_64) * Q
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        if CHANNELS_LAST:
            return rows, cols, mask, cols, col_mask
        else:
            return rows, cols, mask, (rows % Q).to(tl.int32), row_mask


@triton.jit
def _walk_pid(L2_REVERSED: tl.constexpr):
    """The tile index of this program of an elementwise second pass. L2_REVERSED: the last tile
    first. The statistics and backward partial grids (C or channel blocks, P splits) dispatch
    block-linearly, x fastest: split-major, so the last programs to run read the last split's rows
    (the last samples channels-first, the last (n, q) rows channels-last) of every channel, the
    tensor's end in memory for the dense layouts; the elementwise tile (or flat block) index grows
    with the address. Reversing the index thus mirrors the split order at split granularity (within
    a split the programs ran as one wave), and what L2 still holds is read first (tuning.l2_passes)."""
    if L2_REVERSED:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        return tl.program_id(0)


@triton.constexpr_function
def _l2_policy(enabled, policy):
    """``policy`` ("evict_last" / "evict_first") where ``enabled``, else the default: with the
    flag off the load, hence the PTX, is the unflagged one."""
    return policy if enabled else ""


@triton.jit
def _flat_tile(pid, N, Q, K, FLAT_INNER: tl.constexpr, FLAT_C: tl.constexpr, INDEX_64: tl.constexpr,
               BLOCK: tl.constexpr):
    """Program ``pid``'s block of an elementwise kernel over a dense tensor walked as one flat
    array of N*Q*K elements (FLAT): offsets [pid*BLOCK, (pid+1)*BLOCK), their mask and each
    element's channel (i // FLAT_INNER) % FLAT_C. The offsets are contiguous from a multiple of
    BLOCK, so accesses are 16-byte vectors whenever the base pointer is 16-byte aligned,
    whatever the row length K, provided Triton sees the mask's bound N*Q*K as a multiple of
    16 (one of N, Q, K is: every ResNet-50 layer; else the masked accesses stay 32-bit).
    FLAT_INNER and FLAT_C are constexprs so that the division and the remainder compile to
    multiply-high sequences, not a division subroutine per element."""
    if INDEX_64:
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        total = tl.cast(N, tl.int64) * Q * K  # N, Q or K may be the constant 1 (specialized)
    else:
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        total = N * Q * K
    mask = offsets < total
    if FLAT_INNER == 1:
        channels = offsets % FLAT_C
    else:
        channels = (offsets // FLAT_INNER) % FLAT_C
    return offsets, mask, channels.to(tl.int32)


@triton.jit
def _elementwise_offsets(rows, cols, Q, n_stride, q_stride, k_stride, FLAT: tl.constexpr,
                         DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr):
    """Offsets of an elementwise kernel's tile in one tensor: FLAT, ``rows`` already holds the
    flat offsets (every tensor of a flat launch is dense with the same strides); else the
    [rows, cols] tile of the [N*Q, K] matrix (_tile_offsets)."""
    if FLAT:
        return rows
    else:
        return _tile_offsets(rows, cols, 0, Q, n_stride, q_stride, k_stride, True, DENSE_ROWS, INDEX_64)


@triton.jit
def _lane_counts(rows, cols, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_R, BLOCK_K] int32 count of the elements each tile lane visits in a reduction loop
    over ``rows`` x ``cols`` (both loops step by the block; channels-last visits one column
    block only). Known from the geometry, so the loop need not count."""
    r = tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    lane_rows = tl.maximum(rows - r + BLOCK_R - 1, 0) // BLOCK_R
    if CHANNELS_LAST:
        lane_cols = (k < cols).to(tl.int32)
    else:
        lane_cols = tl.maximum(cols - k + BLOCK_K - 1, 0) // BLOCK_K
    return lane_rows[:, None] * lane_cols[None, :]


@triton.jit
def _is_finite(v):
    return tl.abs(v) < float("inf")  # False for NaN and +-Inf


@triton.jit
def _finite_or_zero(v):
    return tl.where(_is_finite(v), v, 0.0)


@triton.jit
def _channel_pivot(x_ptr, pid_c, col_lo, K, q_stride, k_stride, CHANNELS_LAST: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, base=0):
    """Each channel's first element (sample 0, position 0; with a mask the first counted position,
    ``base`` its offset: masking._first_counted), 0 where it is not finite: the shift of the statistics
    (stats.py). A per-channel vector, like the mean or weight loads: one row per program, not a
    tile. Channels-last: the BLOCK_K channels of block pid_c; else channel pid_c."""
    if CHANNELS_LAST:
        channels = col_lo + tl.arange(0, BLOCK_K)
        pivot = tl.load(x_ptr + base + channels.to(tl.int64) * k_stride, mask=channels < K, other=0.0)
    else:
        pivot = tl.load(x_ptr + base + pid_c.to(tl.int64) * q_stride)
    return _finite_or_zero(pivot.to(ACC_DTYPE))


@triton.jit
def _last_of_channel(tickets_ptr, pid_c, col_lo, CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """(is this program the last of its channel (block) to finish, that block's channels).

    Every program of a channel takes a ticket from an int32 counter that is zero between calls;
    the atomic is acq_rel at GPU scope, so what the earlier programs stored is visible to the
    one that draws the last ticket. That program combines and calls _release_ticket.
    One thread issues the atomic: the barrier orders every thread's partial stores before its
    release. Triton 3.9's lowering inserts one too; older versions did only when a preceding
    reduction happened to go through shared memory (tests/test_ticket_barriers.py checks)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets_ptr + pid_c, 1)
    if CHANNELS_LAST:
        channels = col_lo + tl.arange(0, BLOCK_K)
    else:
        channels = pid_c + tl.arange(0, 1)
    return ticket == tl.num_programs(1) - 1, channels


@triton.constexpr_function
def _combine_block(BLOCK_R, BLOCK_K, CHANNELS_LAST):
    """Splits merged per step by a folded combine (the last program of a channel): about one
    value per thread, [BLOCK_R * BLOCK_K / 16] channels-first, [BLOCK_R / 16, BLOCK_K]
    channels-last (tiles hold at most 16 per thread). A block as large as the tile made ptxas
    allocate for four tile-sized vectors at once: 128-234 registers in the statistics kernel
    (sm_90), against 48-100 for its main loop alone, i.e. 1 program per SM."""
    if CHANNELS_LAST:
        return (BLOCK_R + 15) // 16
    return BLOCK_R * BLOCK_K // 16


@triton.jit
def _count_step(ticket_ptr, num_batches_tracked_ptr):
    """The step counter moves once per call, inside the statistics launch (no add_ kernel of its
    own): each program that owns channels calls this after it has read the counter; the last
    of the axis-0 programs to arrive increments it (each read precedes its program's acq_rel
    ticket) and resets the int32 ticket, which is zero between calls. The barrier orders every
    thread's read before the ticket's release, as in _last_of_channel."""
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr, 1) == tl.num_programs(0) - 1:
        tl.atomic_add(num_batches_tracked_ptr, 1)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _release_ticket(tickets_ptr, pid_c):
    """Zero the channel's counter again, for the next launch on this buffer (no memset launch
    needed; who shares a buffer: tickets.py)."""
    tl.atomic_xchg(tickets_ptr + pid_c, 0)


@triton.jit
def _merge_groups(mean, m2, count, axis: tl.constexpr):
    """Merge many groups along ``axis``; groups with count 0 must carry m2 = 0."""
    total = tl.sum(count, axis)
    merged_mean = tl.sum(count * mean, axis) / tl.maximum(total, 1.0)
    delta = mean - tl.expand_dims(merged_mean, axis)
    return merged_mean, tl.sum(m2 + count * delta * delta, axis), total


@functools.lru_cache(maxsize=256)
def split_float(value: float):
    """(hi, lo) float32 parts of a Python float: Triton passes float scalars as fp32, which
    would round momentum or 1/M to 7 digits in the float64 path; hi + lo carries ~14."""
    import numpy as np
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


@triton.jit
def _wide_scalar(hi, lo, ACC_DTYPE: tl.constexpr):
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _invstd(var, eps):
    """1 / sqrt(var + eps) with a correctly rounded square root (sqrt_rn is fp32-only;
    the fp64 sqrt is always IEEE)."""
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def _load_channel_stats(mean_ptr, stat_ptr, channels, mask, eps, STAT_IS_VAR: tl.constexpr,
                        ACC_DTYPE: tl.constexpr):
    """(mean, invstd) per channel. stat_ptr holds invstd (batch statistics) or, when
    STAT_IS_VAR, a variance (running statistics) turned into invstd = 1 / sqrt(var + eps)."""
    mean = tl.load(mean_ptr + channels, mask=mask, other=0.0).to(ACC_DTYPE)
    stat = tl.load(stat_ptr + channels, mask=mask, other=1.0).to(ACC_DTYPE)
    if STAT_IS_VAR:
        stat = _invstd(stat, eps)
    return mean, stat


@triton.jit
def _load_channel_param(ptr, channels, mask, default, HAS_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    if HAS_PARAM:
        return tl.load(ptr + channels, mask=mask, other=default).to(ACC_DTYPE)
    else:
        return tl.full(channels.shape, default, ACC_DTYPE)


@triton.jit
def _dx_coefficients(invstd, sum_dz, sum_dz_xmu, inv_count_hi, inv_count_lo, ACC_DTYPE: tl.constexpr):
    """(mean_dz, proj) of the training dx = (dz - mean_dz - (x - mean) * proj) * a, per channel,
    from the channel's sums of dz and dz * (x - mean); a = gamma * invstd (_training_dx); 1 / M
    = hi + lo (split_float). mean_dz = sum * hi + sum * lo with one rounding: sum / M to well
    within an ulp, so a channel of constant dz (an exact sum) gets mean_dz = dz exactly and dx = 0,
    as torch's division gives; sum * fl(1 / M) alone is off by an ulp for many M, times a."""
    hi = tl.cast(inv_count_hi, ACC_DTYPE)
    lo = tl.cast(inv_count_lo, ACC_DTYPE)
    return tl.fma(sum_dz, hi, sum_dz * lo), invstd * invstd * sum_dz_xmu * (hi + lo)


@triton.jit
def _training_dx(dz, xmu, a, mean_dz, proj):
    """dx = (dz - mean_dz - xmu * proj) * a, torch's order: the difference first, then the
    scale. Folding a in (a * dz + xmu * k + k_0, one FMA fewer) rounds a * dz and k_0, each of
    size a * |dz|, and then cancels them: on a near-constant channel (invstd ~ 1/sqrt(eps)) with
    dz near its mean that rounding, ~an ulp of a * |dz|, is most of dx (10-100x torch's error in
    fp32; dx = 0 came out as a * dz * 2^-24 for constant dz). Here dz - mean_dz is exact where
    they are close, and only the small difference is scaled."""
    return (dz - mean_dz - xmu * proj) * a


@triton.jit
def _along_channel_axis(v, CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr):
    """A per-channel vector broadcast onto a [BLOCK_R, BLOCK_K] tile: channels run along K
    (columns) channels-last, along the rows channels-first. FLAT: v was gathered per element
    (_flat_tile's channels) and already has the block's shape."""
    if FLAT:
        return v
    elif CHANNELS_LAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _split_bounds(pid_c, pid_split, N, Q, K, rows_per_split, cols_per_split, splits_k,
                  CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, INDEX_64: tl.constexpr):
    """The [row_lo, row_hi) x [col_lo, col_hi) part of the reduction domain of one program.

    Channels-last: rows are the N*Q (sample, position) pairs, columns the BLOCK_K channels of
    block pid_c. Channels-first: rows are the N samples, columns the spatial positions of
    channel pid_c, both split into chunks. int64 bounds under INDEX_64 (view.split_addressing:
    N*Q*K, the splits' row or column ranges, or the partial buffer reach 2^31), so the loops
    over them and the rows they form are int64 too."""
    split_r = _wide(pid_split // splits_k, INDEX_64)
    row_lo = split_r * rows_per_split
    if CHANNELS_LAST:
        row_hi = tl.minimum(row_lo + rows_per_split, _wide(N, INDEX_64) * Q)
        col_lo = pid_c * BLOCK_K
        col_hi = tl.minimum(col_lo + BLOCK_K, K)
    else:
        row_hi = tl.minimum(row_lo + rows_per_split, N)
        col_lo = _wide(pid_split % splits_k, INDEX_64) * cols_per_split
        col_hi = tl.minimum(col_lo + cols_per_split, K)
    return row_lo, row_hi, col_lo, col_hi
