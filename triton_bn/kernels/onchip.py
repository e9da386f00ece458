"""Layer 1: one-read batch norm where a channel's slab fits on chip (issue 10, item 5).

When every element of a channel (channels-first) or of a block of channels (channels-last)
fits in one program's registers (``tuning.onchip_tile``), each program loads its slab once:

    forward, training   x -> statistics -> running stats, save_mean/invstd -> y      1 launch, 2·T·e
    backward            x (or y), dy [, r] -> sums -> dgamma, dbeta, dx [, dr]       1 launch, 3·T·e

against 2 launches and 3·T·e / 5·T·e on the split path (stats.py -> normalize.py,
backward.py). A program owns its channels, so there are no partials and no float atomics,
and the running statistics move exactly once; the one atomic is the step counter's ticket
(helpers._count_step, with num_batches_tracked; its buffer from tickets.py, as the split
path's). For the same reason the kernels are not autotuned (an autotuner would rerun the
in-place update): the tile is a function of the shape, so the bits depend only on the input,
its shape and the Triton version, not on a config or on the order programs run in.

Numerics are the split path's: the sums are of x shifted by the channel's first element
(finite or 0), the mean is a plain sum (NaN and +-Inf as torch's), and combine.py's
``_finish_channels`` turns the moments into save_mean/save_invstd and the running update.
With the slab in registers M2 is a true second pass, sum((x - p - mean_shifted)^2), rather
than merged per-lane sums. The fused epilogue (ACTIVATION, HAS_RESIDUAL, FROM_OUTPUT) is
activation.py's, as in normalize.py and backward.py.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .activation import _activation, _recompute
from .combine import _finish_channels
from .helpers import (_along_channel_axis, _channel_pivot, _count_step, _dx_coefficients, _load_channel_param,
                      _load_channel_stats, _tile_offsets, _training_dx, _wide_scalar, split_float)
from .masking import _counted, _first_counted, _inv_count_parts
from .launch import Launch, fresh, tensor_key
from .stats import acc_dtype, tl_dtype
from .tickets import tickets as _tickets
from .tuning import cdiv, onchip_tile
from .view import (NQKView, _addressing, addressing, empty_output, mask_strides, mergeable, nqk_view,
                   output_geometry)


@triton.jit
def _slab(pid, N, Q, K, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's whole reduction domain as one tile: rows, cols, mask, its channels and
    their mask. Channels-first: channel pid, rows the N samples, cols the K positions.
    Channels-last: channels [pid * BLOCK_K, +BLOCK_K) along cols, rows the N * Q pairs."""
    rows = tl.arange(0, BLOCK_R)
    if CHANNELS_LAST:
        cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        valid = (rows < N * Q)[:, None] & (cols < K)[None, :]
        return rows, cols, valid, cols, cols < K
    else:
        cols = tl.arange(0, BLOCK_K)
        valid = (rows < N)[:, None] & (cols < K)[None, :]
        channels = pid + tl.zeros([1], tl.int32)  # a [1] vector, so per-channel code is shared
        return rows, cols, valid, channels, channels < Q


@triton.jit
def _per_channel(tile, CHANNELS_LAST: tl.constexpr):
    """Sum of a [BLOCK_R, BLOCK_K] tile per channel: over rows channels-last ([BLOCK_K]),
    over the whole tile channels-first ([1])."""
    sums = tl.sum(tile, 0)
    if not CHANNELS_LAST:
        sums = tl.sum(sums, 0, keep_dims=True)
    return sums


@triton.jit
def _slab_dx(dz, xmu, a, invstd, sum_dz, sum_dz_xmu, inv_count_hi, inv_count_lo, inv_counts_ptr, counted, channels,
             channel_mask, CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """Training dx of a slab held in registers (on chip, and cooperative_kernels.py) from its
    channels' sums; a = gamma * invstd on the tile. MASKED: 1 / M_c from the forward's inv_counts,
    and an uncounted position (``counted`` False) enters no statistic: only its own term, dz * a."""
    if MASKED:
        inv_count_hi, inv_count_lo = _inv_count_parts(inv_counts_ptr, channels, channel_mask)
    mean_dz, proj = _dx_coefficients(invstd, sum_dz, sum_dz_xmu, inv_count_hi, inv_count_lo, ACC_DTYPE)
    dx = _training_dx(dz, xmu, a, _along_channel_axis(mean_dz, CHANNELS_LAST, False),
                      _along_channel_axis(proj, CHANNELS_LAST, False))
    if MASKED:
        dx = tl.where(counted, dx, dz * a)
    return dx


@triton.jit
def _bn_onchip_forward_kernel(
    x_ptr,  # [N, Q, K] input, strides x_{n,q,k}_stride
    r_ptr,  # [N, Q, K] residual (HAS_RESIDUAL), strides r_{n,q,k}_stride
    y_ptr,  # [N, Q, K] output, strides y_{n,q,k}_stride (may be x: the slab is loaded before any store)
    mean_ptr, invstd_ptr,  # [C] out: batch mean, 1 / sqrt(biased var + eps) (ACC_DTYPE)
    inv_counts_ptr,  # [C, 2] out (MASKED): 1 / M_c of the counted elements, float32 (hi, lo)
    mask_ptr,  # (MASKED) bool [N, Q, K] view, strides mask_{n,q,k}_stride, 0 along the channel axis
    weight_ptr, bias_ptr,  # [C] gamma, beta (HAS_WEIGHT, HAS_BIAS)
    running_mean_ptr, running_var_ptr,  # [C] contiguous, updated in place (UPDATE_RUNNING)
    num_batches_tracked_ptr,  # [] int64 step counter, incremented once (COUNT_STEP)
    ticket_ptr,  # [1] int32, zero between calls (COUNT_STEP)
    N, Q, K,
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
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, valid, channels, channel_mask = _slab(pid, N, Q, K, CHANNELS_LAST, BLOCK_R, BLOCK_K)
    x_offsets = _tile_offsets(rows, cols, pid, Q, x_n_stride, x_q_stride, x_k_stride, CHANNELS_LAST,
                              DENSE_ROWS, INDEX_64)
    x = tl.load(x_ptr + x_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
    counted = _counted(mask_ptr, rows, cols, pid, Q, mask_n_stride, mask_q_stride, mask_k_stride, valid, rows < N * Q,
                       CHANNELS_LAST, CHANNELS_LAST, False, DENSE_ROWS, INDEX_64, MASKED)
    # The split path's shift (stats.py): the channel's first (counted) element, so the sums are of
    # values O(std) however large |mean| is. One element per channel, already in cache.
    base = 0
    if MASKED:
        base = _first_counted(mask_ptr, N, Q, K, mask_n_stride, mask_q_stride, mask_k_stride, x_n_stride,
                              x_q_stride, x_k_stride, CHANNELS_LAST, INDEX_64)
    pivot = _channel_pivot(x_ptr, pid, pid * BLOCK_K, K, x_q_stride, x_k_stride, CHANNELS_LAST, ACC_DTYPE,
                           BLOCK_K, base) + tl.zeros(channels.shape, ACC_DTYPE)
    if MASKED:
        count = _per_channel(counted.to(ACC_DTYPE), CHANNELS_LAST)
    elif CHANNELS_LAST:
        count = tl.zeros(channels.shape, ACC_DTYPE) + N * Q
    else:
        count = tl.zeros(channels.shape, ACC_DTYPE) + N * K
    d = tl.where(counted, x - _along_channel_axis(pivot, CHANNELS_LAST, False), 0.0)
    # A plain sum for the mean (torch's NaN/Inf behaviour), then M2 as a second pass over the
    # registers: exact up to rounding of O(std) values, no cancellation.
    shifted_mean = _per_channel(d, CHANNELS_LAST) / tl.maximum(count, 1.0)
    delta = tl.where(counted, d - _along_channel_axis(shifted_mean, CHANNELS_LAST, False), 0.0)
    m2 = _per_channel(delta * delta, CHANNELS_LAST)
    # This program owns its channels: the running statistics move here, exactly once.
    mean, invstd, _ = _finish_channels(pivot, shifted_mean, m2, count, channels, channel_mask, mean_ptr, invstd_ptr,
                                       inv_counts_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
                                       momentum_hi, momentum_lo, eps, UPDATE_RUNNING, CUMULATIVE_AVERAGE, COUNT_STEP,
                                       MASKED)
    if COUNT_STEP:
        _count_step(ticket_ptr, num_batches_tracked_ptr)
    scale = invstd * _load_channel_param(weight_ptr, channels, channel_mask, 1.0, HAS_WEIGHT, ACC_DTYPE)
    shift = _load_channel_param(bias_ptr, channels, channel_mask, 0.0, HAS_BIAS, ACC_DTYPE)
    # (x - mean) * a + beta, not x * a + (beta - mean * a): see normalize.py.
    y = (x - _along_channel_axis(mean, CHANNELS_LAST, False)) * _along_channel_axis(scale, CHANNELS_LAST, False) \
        + _along_channel_axis(shift, CHANNELS_LAST, False)
    if HAS_RESIDUAL:
        r_offsets = _tile_offsets(rows, cols, pid, Q, r_n_stride, r_q_stride, r_k_stride, CHANNELS_LAST,
                                  DENSE_ROWS, INDEX_64)
        y += tl.load(r_ptr + r_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
    y = _activation(y, _wide_scalar(slope_hi, slope_lo, ACC_DTYPE), ACTIVATION)
    y_offsets = _tile_offsets(rows, cols, pid, Q, y_n_stride, y_q_stride, y_k_stride, CHANNELS_LAST,
                              DENSE_ROWS, INDEX_64)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _bn_onchip_backward_kernel(
    x_ptr, dy_ptr,  # [N, Q, K] views, strides {x,dy}_{n,q,k}_stride (x_ptr holds y when FROM_OUTPUT)
    r_ptr,  # [N, Q, K] residual (HAS_RESIDUAL), strides r_{n,q,k}_stride
    dx_ptr,  # [N, Q, K] out (WRITE_DX), strides dx_{n,q,k}_stride
    dr_ptr,  # [N, Q, K] out: dresidual = dz (WRITE_DRESIDUAL), dx's strides
    mean_ptr, stat_ptr,  # [C] mean and invstd (or running var when STAT_IS_VAR)
    inv_counts_ptr,  # [C, 2] 1 / M_c of the masked forward, float32 (hi, lo) (MASKED)
    mask_ptr,  # (MASKED) bool [N, Q, K] view, strides mask_{n,q,k}_stride, 0 along the channel axis
    weight_ptr, bias_ptr,  # [C] gamma (HAS_WEIGHT), beta (HAS_BIAS; read only when FUSED)
    grad_weight_ptr, grad_bias_ptr,  # [C] out (HAS_GRAD_WEIGHT, HAS_GRAD_BIAS), parameter dtype
    N, Q, K,
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
    MASKED: tl.constexpr,  # training dx of a masked forward (_slab_dx)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, valid, channels, channel_mask = _slab(pid, N, Q, K, CHANNELS_LAST, BLOCK_R, BLOCK_K)
    mean, invstd = _load_channel_stats(mean_ptr, stat_ptr, channels, channel_mask, eps, STAT_IS_VAR, ACC_DTYPE)
    gamma = _load_channel_param(weight_ptr, channels, channel_mask, 1.0, HAS_WEIGHT, ACC_DTYPE)
    dy_offsets = _tile_offsets(rows, cols, pid, Q, dy_n_stride, dy_q_stride, dy_k_stride, CHANNELS_LAST,
                               DENSE_ROWS, INDEX_64)
    dz = tl.load(dy_ptr + dy_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
    # Eval-mode dx alone needs neither x nor the sums: then x is never read.
    NEED_SUMS: tl.constexpr = TRAINING or HAS_GRAD_WEIGHT or HAS_GRAD_BIAS
    if FUSED or NEED_SUMS:
        x_offsets = _tile_offsets(rows, cols, pid, Q, x_n_stride, x_q_stride, x_k_stride, CHANNELS_LAST,
                                  DENSE_ROWS, INDEX_64)
        v = tl.load(x_ptr + x_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
        if FUSED:
            r = v
            if HAS_RESIDUAL:
                r_offsets = _tile_offsets(rows, cols, pid, Q, r_n_stride, r_q_stride, r_k_stride, CHANNELS_LAST,
                                          DENSE_ROWS, INDEX_64)
                r = tl.load(r_ptr + r_offsets, mask=valid, other=0.0).to(ACC_DTYPE)
            beta = _load_channel_param(bias_ptr, channels, channel_mask, 0.0, HAS_BIAS, ACC_DTYPE)
            xmu, act_grad = _recompute(v, r, _along_channel_axis(mean, CHANNELS_LAST, False),
                                       _along_channel_axis(invstd, CHANNELS_LAST, False),
                                       _along_channel_axis(gamma, CHANNELS_LAST, False),
                                       _along_channel_axis(beta, CHANNELS_LAST, False),
                                       _wide_scalar(slope_hi, slope_lo, ACC_DTYPE), ACTIVATION, HAS_RESIDUAL,
                                       FROM_OUTPUT)
            dz = dz * act_grad  # masked lanes: dy = 0 and a finite act_grad
        else:
            xmu = v - _along_channel_axis(mean, CHANNELS_LAST, False)
        # Masked lanes add 0: dz is 0 there.
        sum_dz = _per_channel(dz, CHANNELS_LAST)
        sum_dz_xmu = _per_channel(dz * xmu, CHANNELS_LAST)
        if HAS_GRAD_WEIGHT:
            tl.store(grad_weight_ptr + channels, (sum_dz_xmu * invstd).to(grad_weight_ptr.dtype.element_ty),
                     mask=channel_mask)
        if HAS_GRAD_BIAS:
            tl.store(grad_bias_ptr + channels, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=channel_mask)
    dx_offsets = _tile_offsets(rows, cols, pid, Q, dx_n_stride, dx_q_stride, dx_k_stride, CHANNELS_LAST,
                               DENSE_ROWS, INDEX_64)
    if WRITE_DRESIDUAL:
        tl.store(dr_ptr + dx_offsets, dz.to(dr_ptr.dtype.element_ty), mask=valid)
    if WRITE_DX:
        a = _along_channel_axis(invstd * gamma, CHANNELS_LAST, False)
        if TRAINING:
            counted = _counted(mask_ptr, rows, cols, pid, Q, mask_n_stride, mask_q_stride, mask_k_stride, valid,
                               rows < N * Q, CHANNELS_LAST, CHANNELS_LAST, False, DENSE_ROWS, INDEX_64, MASKED)
            dx = _slab_dx(dz, xmu, a, invstd, sum_dz, sum_dz_xmu, inv_count_hi, inv_count_lo, inv_counts_ptr, counted,
                          channels, channel_mask, CHANNELS_LAST, ACC_DTYPE, MASKED)
        else:
            dx = dz * a
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)


_FORWARD = Launch(_bn_onchip_forward_kernel)
_BACKWARD = Launch(_bn_onchip_backward_kernel)


def onchip_tile_for(view: NQKView) -> Optional[tuple]:
    """(BLOCK_R, BLOCK_K, num_warps) when the view's slabs fit on chip (tuning.onchip_tile)
    and the tensor addresses in int32 (the path is for small slabs; huge strided views take
    the split path), else None."""
    tile = onchip_tile(view.N, view.Q, view.K, view.channels_last, view.tensor.dtype)
    if tile is None or _addressing((view[1:],))["INDEX_64"]:
        return None
    return tile


@functools.lru_cache(maxsize=4096)
def _grid(C: int, channels_last: bool, block_k: int) -> tuple:
    return (cdiv(C, block_k),) if channels_last else (C,)


def _views(view: NQKView, out: Optional[torch.Tensor], residual: Optional[torch.Tensor]):
    """The output (fresh in the input's memory format, or ``out``), its view and the residual's."""
    y = fresh(empty_output(view)) if out is None else out
    y_view = NQKView(y, *output_geometry(view, y, allocated=out is None))
    r_view = None if residual is None else nqk_view(mergeable(residual), view.channels_last)
    return y, y_view, r_view


def bn_onchip_forward(view: NQKView, tile: tuple, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                      momentum: Optional[float], eps: float, num_batches_tracked: Optional[torch.Tensor] = None, *,
                      activation: int = 0, negative_slope: float = 0.01, residual: Optional[torch.Tensor] = None,
                      out: Optional[torch.Tensor] = None, mask: Optional[NQKView] = None):
    """(y, save_mean, save_invstd) in one launch; running statistics (contiguous) updated in
    place once. ``tile`` from onchip_tile_for(view); the rest as kernels.bn_forward_train.
    ``mask`` (view.mask_view): (y, save_mean, save_invstd, inv_counts), statistics over its positions
    (inv_counts: stats.bn_stats)."""
    x = view.tensor
    block_r, block_k, num_warps = tile
    y, y_view, r_view = _views(view, out, residual)
    residual = None if r_view is None else r_view.tensor
    mean = fresh(torch.empty(view.C, dtype=acc_dtype(x.dtype), device=x.device))
    invstd = fresh(torch.empty_like(mean))
    m = None if mask is None else mask.tensor
    inv_counts = None if mask is None else fresh(torch.empty((view.C, 2), dtype=torch.float32, device=x.device))
    update = running_mean is not None
    count = num_batches_tracked is not None
    cumulative = momentum is None
    ticket = _tickets(x.device, 1) if count else None
    key = (view[1:], y_view[1:], None if r_view is None else r_view[1:], activation, update, count, tile,
           tensor_key(x, residual, y, weight, bias, running_mean, running_var, num_batches_tracked, m),
           momentum, eps, negative_slope, None if mask is None else mask[1:])
    tensors = tuple(t for t in (x, residual, y, mean, invstd, inv_counts, m, weight, bias, running_mean, running_var,
                                num_batches_tracked, ticket) if t is not None)

    def build():
        args = (x, residual, y, mean, invstd, inv_counts, m, weight, bias, running_mean, running_var,
                num_batches_tracked, ticket, view.N, view.Q, view.K, *view.strides,
                *(view.strides if r_view is None else r_view.strides), *y_view.strides, *mask_strides(mask),
                *split_float(0.0 if cumulative else momentum), float(eps), *split_float(negative_slope))
        constexprs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE_RUNNING=update,
                          COUNT_STEP=count, CUMULATIVE_AVERAGE=cumulative, CHANNELS_LAST=view.channels_last,
                          ACC_DTYPE=tl_dtype(x.dtype), ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
                          **addressing(view, y_view, r_view, mask), MASKED=m is not None, BLOCK_R=block_r,
                          BLOCK_K=block_k, num_warps=num_warps)
        return _grid(view.C, view.channels_last, block_k), args, constexprs, ()
    _FORWARD.run(key, tensors, build)
    return (y, mean, invstd) if m is None else (y, mean, invstd, inv_counts)


def one_read_outputs(view: NQKView, dy: torch.Tensor, weight, bias, residual, activation: int, from_output: bool,
                     needs: tuple, param_dtype) -> tuple:
    """What a one-read backward (on chip, cooperative.py) launches with: (fused, bias, residual,
    dy's view, the residual's view, dx, dr, dx's view, dweight, dbias); the outputs fresh where
    ``needs`` asks for them, else None. Unfused, dz = dy: neither beta nor the residual is read."""
    need_dx, need_dw, need_db, need_dr = needs
    x = view.tensor
    fused = activation != 0 or from_output
    if not fused:
        bias = residual = None
    dy_view = nqk_view(dy, view.channels_last)
    r_view = None if residual is None else nqk_view(residual, view.channels_last)
    dx = fresh(empty_output(view)) if need_dx else None
    dr = fresh(empty_output(view)) if need_dr else None
    out = dx if dx is not None else dr  # dx and dr share strides; neither: dx_view is unused
    dx_view = view if out is None else NQKView(out, *output_geometry(view, out))
    if param_dtype is None:
        param_dtype = weight.dtype if weight is not None else x.dtype
    d_weight = fresh(torch.empty(view.C, dtype=param_dtype, device=x.device)) if need_dw else None
    d_bias = fresh(torch.empty(view.C, dtype=param_dtype, device=x.device)) if need_db else None
    return fused, bias, residual, dy_view, r_view, dx, dr, dx_view, d_weight, d_bias


def bn_onchip_backward(view: NQKView, tile: tuple, dy: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor,
                       weight: Optional[torch.Tensor], eps: float, training: bool, needs: tuple,
                       param_dtype: Optional[torch.dtype] = None, *, bias: Optional[torch.Tensor] = None,
                       activation: int = 0, negative_slope: float = 0.01, residual: Optional[torch.Tensor] = None,
                       from_output: bool = False, mask: Optional[NQKView] = None,
                       inv_counts: Optional[torch.Tensor] = None):
    """(dx, dweight, dbias, dresidual), each None where ``needs`` (need_dx, need_dw, need_db,
    need_dr) says no, in one launch; arguments as kernels.bn_backward (``mean``/``stat``:
    save_mean/save_invstd, or the running statistics when not ``training``; ``mask`` and
    ``inv_counts``: a masked training forward's mask view and 1 / M_c)."""
    need_dx, need_dw, need_db, need_dr = needs
    if not (need_dx or need_dw or need_db or need_dr):
        return None, None, None, None
    x = view.tensor
    block_r, block_k, num_warps = tile
    fused, bias, residual, dy_view, r_view, dx, dr, dx_view, d_weight, d_bias = one_read_outputs(
        view, dy, weight, bias, residual, activation, from_output, needs, param_dtype)
    masked = mask is not None and training and need_dx
    m, inv_counts = (mask.tensor, inv_counts) if masked else (None, None)
    key = (view[1:], dy_view[1:], dx_view[1:], None if r_view is None else r_view[1:], training, activation,
           from_output, need_dx, need_dr, tile, tensor_key(x, dy, residual, dx, dr, mean, stat, weight, bias, d_weight,
                                                           d_bias, m, inv_counts), eps, negative_slope,
           mask[1:] if masked else None)
    tensors = tuple(t for t in (x, dy, residual, dx, dr, mean, stat, inv_counts, m, weight, bias, d_weight, d_bias)
                    if t is not None)

    def build():
        args = (x, dy, residual, dx, dr, mean, stat, inv_counts, m, weight, bias, d_weight, d_bias, view.N, view.Q,
                view.K,
                *view.strides, *dy_view.strides, *(view.strides if r_view is None else r_view.strides),
                *dx_view.strides, *mask_strides(mask if masked else None),
                *split_float(1.0 / max(view.per_channel, 1)), float(eps), *split_float(negative_slope))
        constexprs = dict(TRAINING=training, STAT_IS_VAR=not training, HAS_WEIGHT=weight is not None,
                          HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
                          FROM_OUTPUT=from_output, FUSED=fused, WRITE_DX=need_dx, WRITE_DRESIDUAL=need_dr,
                          HAS_GRAD_WEIGHT=need_dw, HAS_GRAD_BIAS=need_db, CHANNELS_LAST=view.channels_last,
                          ACC_DTYPE=tl_dtype(x.dtype),
                          **addressing(view, dy_view, dx_view, r_view, mask if masked else None),
                          MASKED=masked, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
        return _grid(view.C, view.channels_last, block_k), args, constexprs, ()
    _BACKWARD.run(key, tensors, build)
    return dx, d_weight, d_bias, dr
