"""Layer 1: the cooperative path's kernels and grid barrier (launched by cooperative.py, which
explains the path; docs/cooperative.md argues why the barriers cannot hang).

PHASE 0 runs phase 1 (part moments or sums to a [fields, G, C] buffer), a barrier, phase 2 (each
channel's owner merges its G parts), a barrier and phase 3 (y or dx from the registers) in one
cooperative launch; PHASE 1, 2, 3 run one phase each, as consecutive launches, under the
interpreter (one program at a time: a barrier there would wait forever).
"""
import triton
import triton.language as tl

from .activation import _activation, _recompute
from .backward import _combine_sums
from .combine import _combine_channels
from .helpers import (_along_channel_axis, _channel_pivot, _count_step, _load_channel_param, _load_channel_stats,
                      _tile_offsets, _wide_scalar)
from .masking import _counted, _first_counted
from .onchip import _per_channel, _slab_dx


@triton.jit
def _part(pid, G, N, Q, K, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program pid's part: (channel block, split, rows, cols, mask, channels, their mask, owned).
    Channels-last: the block's BLOCK_K channels, rows [split * BLOCK_R, +BLOCK_R) of the N * Q;
    channels-first: channel ``block``, part ``split`` of its N x K slab in [BLOCK_R, BLOCK_K]
    tiles. ``owned``: the channels whose merge this program runs (channel % G == split)."""
    block = pid // G
    split = pid % G
    if CHANNELS_LAST:
        rows = split * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
        valid = (rows < N * Q)[:, None] & (cols < K)[None, :]
        return block, split, rows, cols, valid, cols, cols < K, (cols < K) & (tl.arange(0, BLOCK_K) % G == split)
    else:
        col_parts = tl.cdiv(K, BLOCK_K)
        rows = (split // col_parts) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (split % col_parts) * BLOCK_K + tl.arange(0, BLOCK_K)
        valid = (rows < N)[:, None] & (cols < K)[None, :]
        channels = block + tl.zeros([1], tl.int32)  # a [1] vector, so per-channel code is shared
        # split == 0 as a [1] vector too: the interpreter makes (vector & scalar) an int mask.
        return block, split, rows, cols, valid, channels, channels < Q, (channels < Q) & (channels * 0 + split == 0)


@triton.jit
def _arrive_and_wait(counter_ptr, target):
    """Count this program in and spin until ``target`` programs have been counted: the counter
    only grows within a launch, so the k-th barrier of G programs waits for k * G. Release on
    the way in (the CTA barrier first orders every thread's stores before it), acquire on the
    way out, both at GPU scope; the loop's read is an atomic (Triton has no acquire load)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _depart(counter_ptr, G, BARRIERS: tl.constexpr):
    """The last program to leave the last barrier zeroes the counter: every other has stopped
    reading it by then (tickets.py: zero between launches)."""
    if tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == (BARRIERS + 1) * G - 1:
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _bn_cooperative_forward_kernel(
    x_ptr,  # [N, Q, K] input, strides x_{n,q,k}_stride
    r_ptr,  # [N, Q, K] residual (HAS_RESIDUAL), strides r_{n,q,k}_stride
    y_ptr,  # [N, Q, K] output, strides y_{n,q,k}_stride (may be x: read in phase 1, written in 3)
    partial_ptr,  # [4, G, C] per part: shifted mean, M2, count, pivot (ACC_DTYPE)
    mean_ptr, invstd_ptr,  # [C] out: batch mean, 1 / sqrt(biased var + eps) (ACC_DTYPE)
    inv_counts_ptr,  # [C, 2] out (MASKED): 1 / M_c of the counted elements, float32 (hi, lo)
    mask_ptr,  # (MASKED) bool [N, Q, K] view, strides mask_{n,q,k}_stride, 0 along the channel axis
    weight_ptr, bias_ptr,  # [C] gamma, beta (HAS_WEIGHT, HAS_BIAS)
    running_mean_ptr, running_var_ptr,  # [C] contiguous, updated in place (UPDATE_RUNNING)
    num_batches_tracked_ptr,  # [] int64 step counter, incremented once (COUNT_STEP)
    tickets_ptr,  # [channel blocks + 1] int32, zero between launches: barriers, then the step's ticket
    N, Q, K, C, G,
    x_n_stride, x_q_stride, x_k_stride,
    r_n_stride, r_q_stride, r_k_stride,
    y_n_stride, y_q_stride, y_k_stride,
    mask_n_stride, mask_q_stride, mask_k_stride,
    momentum_hi, momentum_lo, eps,  # momentum = hi + lo (see split_float)
    slope_hi, slope_lo,  # negative_slope = hi + lo
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    COUNT_STEP: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr,  # momentum = 1 / (counter + 1)
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr,  # addressing (helpers._row_offsets)
    MASKED: tl.constexpr,  # statistics over the positions the mask counts (y is written everywhere)
    PHASE: tl.constexpr,  # 0: all, with barriers (GPU); 1, 2, 3: one phase per launch (interpreter)
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    block, split, rows, cols, valid, channels, channel_mask, owned = _part(pid, G, N, Q, K, CHANNELS_LAST,
                                                                         BLOCK_R, BLOCK_K)
    if PHASE != 2:
        x_offsets = _tile_offsets(rows, cols, block, Q, x_n_stride, x_q_stride, x_k_stride, CHANNELS_LAST,
                                  DENSE_ROWS, INDEX_64)
        x = tl.load(x_ptr + x_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
    if PHASE == 0 or PHASE == 1:
        # The split path's part moments (stats.py): shifted by the channel's first element, so
        # the sums are of values O(std); M2 as a second pass over the registers, as onchip.py.
        # Masked: only the counted positions, shifted by the first counted one (onchip.py).
        counted = _counted(mask_ptr, rows, cols, block, Q, mask_n_stride, mask_q_stride, mask_k_stride, valid,
                           rows < N * Q, CHANNELS_LAST, CHANNELS_LAST, False, DENSE_ROWS, INDEX_64, MASKED)
        base = 0
        if MASKED:
            base = _first_counted(mask_ptr, N, Q, K, mask_n_stride, mask_q_stride, mask_k_stride, x_n_stride,
                                  x_q_stride, x_k_stride, CHANNELS_LAST, INDEX_64)
        pivot = _channel_pivot(x_ptr, block, block * BLOCK_K, K, x_q_stride, x_k_stride, CHANNELS_LAST, ACC_DTYPE,
                               BLOCK_K, base) + tl.zeros(channels.shape, ACC_DTYPE)
        count = _per_channel(counted.to(ACC_DTYPE), CHANNELS_LAST)
        d = tl.where(counted, x - _along_channel_axis(pivot, CHANNELS_LAST, False), 0.0)
        shifted_mean = _per_channel(d, CHANNELS_LAST) / tl.maximum(count, 1.0)
        delta = tl.where(counted, d - _along_channel_axis(shifted_mean, CHANNELS_LAST, False), 0.0)
        out = partial_ptr + split * C + channels
        tl.store(out, shifted_mean, mask=channel_mask)
        tl.store(out + G * C, _per_channel(delta * delta, CHANNELS_LAST), mask=channel_mask)
        tl.store(out + 2 * G * C, count, mask=channel_mask)
        tl.store(out + 3 * G * C, pivot, mask=channel_mask)
    if PHASE == 0:
        _arrive_and_wait(tickets_ptr + block, G)
    if PHASE == 0 or PHASE == 2:
        # Each channel's owner merges its G parts in part order: the running statistics move once.
        _combine_channels(partial_ptr, G, C, C, G * C, channels, owned, mean_ptr, invstd_ptr,
                          inv_counts_ptr=inv_counts_ptr, moments_ptr=None, running_mean_ptr=running_mean_ptr,
                          running_var_ptr=running_var_ptr,
                          num_batches_tracked_ptr=num_batches_tracked_ptr, momentum_hi=momentum_hi,
                          momentum_lo=momentum_lo, eps=eps, UPDATE_RUNNING=UPDATE_RUNNING,
                          CUMULATIVE_AVERAGE=CUMULATIVE_AVERAGE, WRITE_MOMENTS=False, BLOCK_P=BLOCK_P,
                          COUNT_PENDING=COUNT_STEP, INDEX_64=False, WRITE_INV_COUNTS=MASKED)
        if COUNT_STEP:  # after this program's combine read the counter (combine._finish_channels)
            _count_step(tickets_ptr + tl.cdiv(tl.num_programs(0), G), num_batches_tracked_ptr)
    if PHASE == 0:
        _arrive_and_wait(tickets_ptr + block, 2 * G)
    if PHASE == 0 or PHASE == 3:
        mean, invstd = _load_channel_stats(mean_ptr, invstd_ptr, channels, channel_mask, eps, False, ACC_DTYPE)
        scale = invstd * _load_channel_param(weight_ptr, channels, channel_mask, 1.0, HAS_WEIGHT, ACC_DTYPE)
        shift = _load_channel_param(bias_ptr, channels, channel_mask, 0.0, HAS_BIAS, ACC_DTYPE)
        # (x - mean) * a + beta, not x * a + (beta - mean * a): see normalize.py.
        y = (x - _along_channel_axis(mean, CHANNELS_LAST, False)) * _along_channel_axis(scale, CHANNELS_LAST, False) \
            + _along_channel_axis(shift, CHANNELS_LAST, False)
        if HAS_RESIDUAL:
            r_offsets = _tile_offsets(rows, cols, block, Q, r_n_stride, r_q_stride, r_k_stride, CHANNELS_LAST,
                                      DENSE_ROWS, INDEX_64)
            y += tl.load(r_ptr + r_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
        y = _activation(y, _wide_scalar(slope_hi, slope_lo, ACC_DTYPE), ACTIVATION)
        y_offsets = _tile_offsets(rows, cols, block, Q, y_n_stride, y_q_stride, y_k_stride, CHANNELS_LAST,
                                  DENSE_ROWS, INDEX_64)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=valid)
    if PHASE == 0:
        _depart(tickets_ptr + block, G, 2)


@triton.jit
def _dz_xmu(x_ptr, dy_ptr, r_ptr, rows, cols, block, valid, Q, x_n_stride, x_q_stride, x_k_stride, dy_n_stride,
            dy_q_stride, dy_k_stride, r_n_stride, r_q_stride, r_k_stride, mean, invstd, gamma, beta, slope,
            ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FROM_OUTPUT: tl.constexpr, FUSED: tl.constexpr,
            NEED_X: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, DENSE_ROWS: tl.constexpr,
            INDEX_64: tl.constexpr):
    """(dz, x - mean) of this program's part: dz = dy * act'(z) (FUSED), x - mean from x or, FROM_OUTPUT,
    from y (activation._recompute); x is not read unless NEED_X (then x - mean is dz, unused)."""
    dy_offsets = _tile_offsets(rows, cols, block, Q, dy_n_stride, dy_q_stride, dy_k_stride, CHANNELS_LAST,
                               DENSE_ROWS, INDEX_64)
    dz = tl.load(dy_ptr + dy_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
    xmu = dz
    if NEED_X:
        x_offsets = _tile_offsets(rows, cols, block, Q, x_n_stride, x_q_stride, x_k_stride, CHANNELS_LAST,
                                  DENSE_ROWS, INDEX_64)
        v = tl.load(x_ptr + x_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
        if FUSED:
            r = v
            if HAS_RESIDUAL:
                r_offsets = _tile_offsets(rows, cols, block, Q, r_n_stride, r_q_stride, r_k_stride, CHANNELS_LAST,
                                          DENSE_ROWS, INDEX_64)
                r = tl.load(r_ptr + r_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
            xmu, act_grad = _recompute(v, r, _along_channel_axis(mean, CHANNELS_LAST, False),
                                       _along_channel_axis(invstd, CHANNELS_LAST, False),
                                       _along_channel_axis(gamma, CHANNELS_LAST, False),
                                       _along_channel_axis(beta, CHANNELS_LAST, False), slope, ACTIVATION,
                                       HAS_RESIDUAL, FROM_OUTPUT)
            dz = dz * act_grad  # masked lanes: dy = 0 and a finite act_grad
        else:
            xmu = v - _along_channel_axis(mean, CHANNELS_LAST, False)
    return dz, xmu


@triton.jit
def _bn_cooperative_backward_kernel(
    x_ptr, dy_ptr,  # [N, Q, K] views, strides {x,dy}_{n,q,k}_stride (x_ptr holds y when FROM_OUTPUT)
    r_ptr,  # [N, Q, K] residual (HAS_RESIDUAL), strides r_{n,q,k}_stride
    dx_ptr,  # [N, Q, K] out (WRITE_DX), strides dx_{n,q,k}_stride
    dr_ptr,  # [N, Q, K] out: dresidual = dz (WRITE_DRESIDUAL), dx's strides
    partial_ptr,  # [2, G, C] per part: sum dz, sum dz * (x - mean) (ACC_DTYPE; NEED_SUMS)
    sums_ptr,  # [2, C] the channels' sums (ACC_DTYPE; NEED_SUMS)
    mean_ptr, stat_ptr,  # [C] mean and invstd (or running var when STAT_IS_VAR)
    inv_counts_ptr,  # [C, 2] 1 / M_c of the masked forward, float32 (hi, lo) (MASKED)
    mask_ptr,  # (MASKED) bool [N, Q, K] view, strides mask_{n,q,k}_stride, 0 along the channel axis
    weight_ptr, bias_ptr,  # [C] gamma (HAS_WEIGHT), beta (HAS_BIAS; read only when FUSED)
    grad_weight_ptr, grad_bias_ptr,  # [C] out (HAS_GRAD_WEIGHT, HAS_GRAD_BIAS), parameter dtype
    tickets_ptr,  # [channel blocks] int32, zero between launches: the barriers (NEED_SUMS)
    N, Q, K, C, G,
    x_n_stride, x_q_stride, x_k_stride,
    dy_n_stride, dy_q_stride, dy_k_stride,
    r_n_stride, r_q_stride, r_k_stride,
    dx_n_stride, dx_q_stride, dx_k_stride,
    mask_n_stride, mask_q_stride, mask_k_stride,
    inv_count_hi, inv_count_lo, eps,  # 1 / M = hi + lo (unmasked)
    slope_hi, slope_lo,  # negative_slope = hi + lo
    TRAINING: tl.constexpr, STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    FUSED: tl.constexpr,  # ACTIVATION != 0 or FROM_OUTPUT: dz differs from dy, or x - mean needs y
    WRITE_DX: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr,  # addressing (helpers._row_offsets)
    MASKED: tl.constexpr,  # training dx of a masked forward (onchip._slab_dx)
    PHASE: tl.constexpr,  # 0: all, with barriers (GPU); 1, 2, 3: one phase per launch (interpreter)
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Eval-mode dx alone needs neither x nor the sums: then x is never read, and no barrier runs.
    NEED_SUMS: tl.constexpr = TRAINING or HAS_GRAD_WEIGHT or HAS_GRAD_BIAS
    pid = tl.program_id(0)
    block, split, rows, cols, valid, channels, channel_mask, owned = _part(pid, G, N, Q, K, CHANNELS_LAST,
                                                                         BLOCK_R, BLOCK_K)
    mean, invstd = _load_channel_stats(mean_ptr, stat_ptr, channels, channel_mask, eps, STAT_IS_VAR, ACC_DTYPE)
    gamma = _load_channel_param(weight_ptr, channels, channel_mask, 1.0, HAS_WEIGHT, ACC_DTYPE)
    if PHASE != 2:
        beta = _load_channel_param(bias_ptr, channels, channel_mask, 0.0, HAS_BIAS and FUSED, ACC_DTYPE)
        dz, xmu = _dz_xmu(x_ptr, dy_ptr, r_ptr, rows, cols, block, valid, Q, x_n_stride, x_q_stride, x_k_stride,
                          dy_n_stride, dy_q_stride, dy_k_stride, r_n_stride, r_q_stride, r_k_stride, mean, invstd,
                          gamma, beta, _wide_scalar(slope_hi, slope_lo, ACC_DTYPE), ACTIVATION, HAS_RESIDUAL,
                          FROM_OUTPUT, FUSED, FUSED or NEED_SUMS, CHANNELS_LAST, ACC_DTYPE, DENSE_ROWS, INDEX_64)
    if NEED_SUMS:
        if PHASE == 0 or PHASE == 1:  # masked lanes add 0: dz is 0 there
            out = partial_ptr + split * C + channels
            tl.store(out, _per_channel(dz, CHANNELS_LAST), mask=channel_mask)
            tl.store(out + G * C, _per_channel(dz * xmu, CHANNELS_LAST), mask=channel_mask)
        if PHASE == 0:
            _arrive_and_wait(tickets_ptr + block, G)
        if PHASE == 0 or PHASE == 2:  # each channel's owner adds its G parts in part order
            _combine_sums(partial_ptr, G, C, channels, owned, mean_ptr, stat_ptr, sums_ptr, grad_weight_ptr,
                          grad_bias_ptr, eps, STAT_IS_VAR, HAS_GRAD_WEIGHT, HAS_GRAD_BIAS, BLOCK_P, False)
        if PHASE == 0:
            _arrive_and_wait(tickets_ptr + block, 2 * G)
    if PHASE == 0 or PHASE == 3:
        dx_offsets = _tile_offsets(rows, cols, block, Q, dx_n_stride, dx_q_stride, dx_k_stride, CHANNELS_LAST,
                                   DENSE_ROWS, INDEX_64)
        if WRITE_DRESIDUAL:
            tl.store(dr_ptr + dx_offsets, dz.to(dr_ptr.dtype.element_ty), mask=valid)
        if WRITE_DX:
            a = _along_channel_axis(invstd * gamma, CHANNELS_LAST, False)
            if TRAINING:
                sum_dz = tl.load(sums_ptr + channels, mask=channel_mask, other=0.0)
                sum_dz_xmu = tl.load(sums_ptr + C + channels, mask=channel_mask, other=0.0)
                counted = _counted(mask_ptr, rows, cols, block, Q, mask_n_stride, mask_q_stride, mask_k_stride, valid,
                                   rows < N * Q, CHANNELS_LAST, CHANNELS_LAST, False, DENSE_ROWS, INDEX_64, MASKED)
                dx = _slab_dx(dz, xmu, a, invstd, sum_dz, sum_dz_xmu, inv_count_hi, inv_count_lo, inv_counts_ptr,
                              counted, channels, channel_mask, CHANNELS_LAST, ACC_DTYPE, MASKED)
            else:
                dx = dz * a
            tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)
    if PHASE == 0 and NEED_SUMS:
        _depart(tickets_ptr + block, G, 2)
