"""Backward: a per-channel reduction (one launch; its last programs combine), then an elementwise dx.

With xhat = (x - mean) * invstd and a = gamma * invstd:

    dbeta_c  = sum dy                  dgamma_c = sum dy * xhat = invstd * sum dy * (x - mean)
    training: dx = a * (dy - dbeta_c / M - xhat * dgamma_c / M)
            = (dy - mean_dy - (x - mean) * proj) * a,   mean_dy = (sum dy) / M,
                                                         proj = invstd^2 * (sum dy (x - mean)) / M
    eval:     dx = a * dy   (mean and invstd are the running statistics, constants)

dx subtracts before it scales, as torch does (helpers._training_dx): a * dy - a * mean_dy would
leave the roundings of two terms of size a * |dy| on a near-constant channel, where a ~ 1/sqrt(eps).

The reduction writes per-split float partial sums (the same split of the domain as the forward
statistics); the last program per channel, found by an atomic ticket, adds them in split
order (reproducible for a fixed config: stats.py) and writes dgamma, dbeta. Then the elementwise dx, which keeps
(x - mean) explicit for the same reason as the forward.

Fused epilogue (ACTIVATION, HAS_RESIDUAL; forward y = act(z), z = BN(x) [+ r]): every formula
above holds with dy replaced by dz = dy * act'(z), and dresidual = dz. Both kernels recompute
z per tile from x (and r) and the per-channel mean, invstd, gamma, beta, in registers: z is
never written. FROM_OUTPUT (In-Place ABN, save="output"): the kernels get y instead of x and
reconstruct z = act^-1(y), x - mean = (z [- r] - beta) / (gamma * invstd) (activation.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .activation import _recompute
from .helpers import (_combine_block, _along_channel_axis, _dx_coefficients, _elementwise_offsets, _elementwise_tile,
                      _l2_policy, _last_of_channel, _walk_pid, _load_channel_param, _load_channel_stats,
                      _release_ticket, _split_bounds, _tile_offsets, _training_dx, _wide, _wide_scalar, split_float)
from .masking import _counted, _inv_count_parts
from .normalize import elementwise_grid
from .launch import Launch, fresh, tensor_key
from .stats import acc_dtype, tl_dtype
from .tickets import tickets as _tickets
from .tuning import autotune_tiles, cdiv, flat_walk, stats_splits
from .view import NQKView, addressing, empty_output, mask_strides, nqk_view, output_geometry, split_addressing


@autotune_tiles()
@triton.jit
def _bn_backward_partial_kernel(
    x_ptr, dy_ptr,  # [N, Q, K] views, strides {x,dy}_{n,q,k}_stride (x_ptr holds y when FROM_OUTPUT)
    r_ptr,  # [N, Q, K] residual (HAS_RESIDUAL), strides r_{n,q,k}_stride
    mean_ptr, stat_ptr,  # [C] mean and invstd (or running var when STAT_IS_VAR)
    weight_ptr, bias_ptr,  # [C] gamma, beta (HAS_WEIGHT, HAS_BIAS; read only when FUSED)
    partial_ptr,  # [2, P, C] out: sum dz, sum dz * (x - mean) per split (ACC_DTYPE); dz = dy unfused
    N, Q, K, C,
    x_n_stride, x_q_stride, x_k_stride,
    dy_n_stride, dy_q_stride, dy_k_stride,
    r_n_stride, r_q_stride, r_k_stride,
    rows_per_split, cols_per_split, splits_k,
    partial_field_stride,  # P * C
    eps, slope_hi, slope_lo,  # negative_slope = hi + lo
    tickets_ptr,  # [programs along axis 0] int32, zero between calls
    sums_ptr,  # [2, C] out: sum dz, sum dz * (x - mean), merged by the last program per channel
    grad_weight_ptr, grad_bias_ptr,  # [C] out (HAS_GRAD_WEIGHT, HAS_GRAD_BIAS), parameter dtype
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    FUSED: tl.constexpr,  # ACTIVATION != 0 or FROM_OUTPUT: dz differs from dy, or x - mean needs y
    HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr,
    DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr,  # addressing (helpers._row_offsets)
    EVICT_LAST: tl.constexpr,  # x, dy, r loads evict_last: dx reads them again from L2 (tuning.l2_passes)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    row_lo, row_hi, col_lo, col_hi = _split_bounds(pid_c, pid_split, N, Q, K, rows_per_split,
                                                   cols_per_split, splits_k, CHANNELS_LAST, BLOCK_K, INDEX_64)
    if CHANNELS_LAST:
        channels = col_lo + tl.arange(0, BLOCK_K)
        mean = tl.load(mean_ptr + channels, mask=channels < K, other=0.0).to(ACC_DTYPE)[None, :]
    else:
        mean = tl.load(mean_ptr + pid_c).to(ACC_DTYPE)
    if FUSED:  # per-channel tiles: [1, BLOCK_K] channels-last, [1] (one channel) channels-first
        if CHANNELS_LAST:
            fused_channels = col_lo + tl.arange(0, BLOCK_K)
        else:
            fused_channels = pid_c + tl.zeros([1], tl.int32)
        fused_mask = fused_channels < C
        _, invstd = _load_channel_stats(mean_ptr, stat_ptr, fused_channels, fused_mask, eps, STAT_IS_VAR,
                                        ACC_DTYPE)
        gamma = _load_channel_param(weight_ptr, fused_channels, fused_mask, 1.0, HAS_WEIGHT, ACC_DTYPE)
        beta = _load_channel_param(bias_ptr, fused_channels, fused_mask, 0.0, HAS_BIAS, ACC_DTYPE)
        if CHANNELS_LAST:
            invstd, gamma, beta = invstd[None, :], gamma[None, :], beta[None, :]
        negative_slope = _wide_scalar(slope_hi, slope_lo, ACC_DTYPE)
    sum_dy = tl.zeros([BLOCK_K], ACC_DTYPE)
    sum_dy_xmu = tl.zeros([BLOCK_K], ACC_DTYPE)
    for col0 in range(col_lo, col_hi, BLOCK_K):
        cols = col0 + tl.arange(0, BLOCK_K)
        for row0 in range(row_lo, row_hi, BLOCK_R):
            rows = row0 + tl.arange(0, BLOCK_R)
            valid = (rows < row_hi)[:, None] & (cols < col_hi)[None, :]
            x_offsets = _tile_offsets(rows, cols, pid_c, Q, x_n_stride, x_q_stride, x_k_stride, CHANNELS_LAST,
                                      DENSE_ROWS, INDEX_64)
            dy_offsets = _tile_offsets(rows, cols, pid_c, Q, dy_n_stride, dy_q_stride, dy_k_stride, CHANNELS_LAST,
                                       DENSE_ROWS, INDEX_64)
            x = tl.load(x_ptr + x_offsets, mask=valid, other=0.0,
                        eviction_policy=_l2_policy(EVICT_LAST, "evict_last")).to(ACC_DTYPE)
            dy = tl.load(dy_ptr + dy_offsets, mask=valid, other=0.0,
                         eviction_policy=_l2_policy(EVICT_LAST, "evict_last")).to(ACC_DTYPE)
            if FUSED:
                r = x
                if HAS_RESIDUAL:
                    r_offsets = _tile_offsets(rows, cols, pid_c, Q, r_n_stride, r_q_stride, r_k_stride,
                                              CHANNELS_LAST, DENSE_ROWS, INDEX_64)
                    r = tl.load(r_ptr + r_offsets, mask=valid, other=0.0,
                                eviction_policy=_l2_policy(EVICT_LAST, "evict_last")).to(ACC_DTYPE)
                xmu, act_grad = _recompute(x, r, mean, invstd, gamma, beta, negative_slope,
                                           ACTIVATION, HAS_RESIDUAL, FROM_OUTPUT)
                dz = dy * act_grad  # masked lanes: dy = 0 and a finite act_grad
                sum_dy += tl.sum(dz, 0)
                sum_dy_xmu += tl.sum(dz * xmu, 0)
            else:
                sum_dy += tl.sum(dy, 0)
                sum_dy_xmu += tl.sum(dy * (x - mean), 0)  # masked dy is 0, so masked lanes add 0
    out = partial_ptr + _wide(pid_split, INDEX_64) * C
    field = _wide(partial_field_stride, INDEX_64)
    if CHANNELS_LAST:
        channels = col_lo + tl.arange(0, BLOCK_K)
        tl.store(out + channels, sum_dy, mask=channels < K)
        tl.store(out + field + channels, sum_dy_xmu, mask=channels < K)
    else:
        tl.store(out + pid_c, tl.sum(sum_dy, 0))
        tl.store(out + field + pid_c, tl.sum(sum_dy_xmu, 0))
    # The last program of a channel (block) to finish adds every split's sums in split order.
    # Only outputs are written: rerunning it (an autotuner) changes nothing.
    last, channels = _last_of_channel(tickets_ptr, pid_c, col_lo, CHANNELS_LAST, BLOCK_K)
    if last:
        _combine_sums(partial_ptr, tl.num_programs(1), C, channels, channels < C, mean_ptr, stat_ptr, sums_ptr,
                      grad_weight_ptr, grad_bias_ptr, eps, STAT_IS_VAR, HAS_GRAD_WEIGHT, HAS_GRAD_BIAS,
                      _combine_block(BLOCK_R, BLOCK_K, CHANNELS_LAST), INDEX_64)
        _release_ticket(tickets_ptr, pid_c)


@triton.jit
def _combine_sums(partial_ptr, P, C, channels, channel_mask, mean_ptr, stat_ptr, sums_ptr,
                  grad_weight_ptr, grad_bias_ptr, eps,
                  STAT_IS_VAR: tl.constexpr, HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr,
                  BLOCK_P: tl.constexpr, INDEX_64: tl.constexpr):
    """Add the P splits' partial sums ([2, P, C]) of ``channels`` in split order; write the sums
    ([2, C]), dgamma = invstd * sum dz (x - mean) and dbeta = sum dz in the parameters' dtype."""
    acc_dtype = partial_ptr.dtype.element_ty
    sum_dy = tl.zeros(channels.shape, acc_dtype)
    sum_dy_xmu = tl.zeros(channels.shape, acc_dtype)
    for p0 in range(0, P, BLOCK_P):
        splits = p0 + tl.arange(0, BLOCK_P)
        mask = (splits < P)[:, None] & channel_mask[None, :]
        offsets = splits[:, None].to(tl.int64) * C + channels[None, :]
        sum_dy += tl.sum(tl.load(partial_ptr + offsets, mask=mask, other=0.0), 0)
        sum_dy_xmu += tl.sum(tl.load(partial_ptr + _wide(P, INDEX_64) * C + offsets, mask=mask, other=0.0), 0)
    tl.store(sums_ptr + channels, sum_dy, mask=channel_mask)
    tl.store(sums_ptr + C + channels, sum_dy_xmu, mask=channel_mask)
    if HAS_GRAD_WEIGHT:
        _, invstd = _load_channel_stats(mean_ptr, stat_ptr, channels, channel_mask, eps, STAT_IS_VAR, acc_dtype)
        tl.store(grad_weight_ptr + channels, (sum_dy_xmu * invstd).to(grad_weight_ptr.dtype.element_ty),
                 mask=channel_mask)
    if HAS_GRAD_BIAS:
        tl.store(grad_bias_ptr + channels, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=channel_mask)


@autotune_tiles("TRAINING", "STAT_IS_VAR", "FLAT")
@triton.jit
def _bn_backward_dx_kernel(
    x_ptr, dy_ptr, dx_ptr,  # [N, Q, K] views, strides {x,dy,dx}_{n,q,k}_stride (x_ptr: y when FROM_OUTPUT)
    r_ptr,  # [N, Q, K] residual (HAS_RESIDUAL), strides r_{n,q,k}_stride
    dr_ptr,  # [N, Q, K] out: dresidual = dz (WRITE_DRESIDUAL), dx's strides
    mean_ptr, stat_ptr,  # [C] mean and invstd (or running var when STAT_IS_VAR)
    weight_ptr, bias_ptr,  # [C] gamma (HAS_WEIGHT), beta (HAS_BIAS; read only when FUSED)
    sums_ptr,  # [2, C] sum dz, sum dz * (x - mean) (TRAINING)
    inv_counts_ptr,  # [C, 2] 1 / M_c of the masked forward, float32 (hi, lo) (MASKED)
    mask_ptr,  # (MASKED) bool [N, Q, K] view, strides mask_{n,q,k}_stride, 0 along the channel axis
    N, Q, K, C,
    x_n_stride, x_q_stride, x_k_stride,
    dy_n_stride, dy_q_stride, dy_k_stride,
    dx_n_stride, dx_q_stride, dx_k_stride,
    r_n_stride, r_q_stride, r_k_stride,
    mask_n_stride, mask_q_stride, mask_k_stride,
    inv_count_hi, inv_count_lo, eps,  # 1 / M = hi + lo, M the elements per channel of the (global) batch
    slope_hi, slope_lo,  # negative_slope = hi + lo
    TRAINING: tl.constexpr, STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    WRITE_DRESIDUAL: tl.constexpr,
    FUSED: tl.constexpr,  # ACTIVATION != 0 or FROM_OUTPUT
    DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr,  # addressing (helpers._row_offsets)
    # FLAT: every tensor above is dense with x's strides and is walked as one flat [N*Q*K] array
    FLAT: tl.constexpr, FLAT_INNER: tl.constexpr, FLAT_C: tl.constexpr,  # (helpers._flat_tile)
    # L2_REVERSED: after the partial pass, the last tile first, x, dy, r loaded evict_first (_walk_pid)
    L2_REVERSED: tl.constexpr,
    MASKED: tl.constexpr,  # training dx of a masked forward (the module docstring)
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, mask, channels, channel_mask = _elementwise_tile(_walk_pid(L2_REVERSED), N, Q, K, CHANNELS_LAST, FLAT,
                                                                 FLAT_INNER, FLAT_C, INDEX_64, BLOCK_R, BLOCK_K)
    mean, invstd = _load_channel_stats(mean_ptr, stat_ptr, channels, channel_mask, eps, STAT_IS_VAR, ACC_DTYPE)
    gamma = _load_channel_param(weight_ptr, channels, channel_mask, 1.0, HAS_WEIGHT, ACC_DTYPE)
    a = invstd * gamma

    dy_offsets = _elementwise_offsets(rows, cols, Q, dy_n_stride, dy_q_stride, dy_k_stride, FLAT,
                                      DENSE_ROWS, INDEX_64)
    dx_offsets = _elementwise_offsets(rows, cols, Q, dx_n_stride, dx_q_stride, dx_k_stride, FLAT,
                                      DENSE_ROWS, INDEX_64)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0,
                 eviction_policy=_l2_policy(L2_REVERSED, "evict_first")).to(ACC_DTYPE)
    if FUSED:
        beta = _load_channel_param(bias_ptr, channels, channel_mask, 0.0, HAS_BIAS, ACC_DTYPE)
        x_offsets = _elementwise_offsets(rows, cols, Q, x_n_stride, x_q_stride, x_k_stride, FLAT,
                                         DENSE_ROWS, INDEX_64)
        v = tl.load(x_ptr + x_offsets, mask=mask, other=0.0,
                    eviction_policy=_l2_policy(L2_REVERSED, "evict_first")).to(ACC_DTYPE)
        r = v
        if HAS_RESIDUAL:
            r_offsets = _elementwise_offsets(rows, cols, Q, r_n_stride, r_q_stride, r_k_stride, FLAT,
                                             DENSE_ROWS, INDEX_64)
            r = tl.load(r_ptr + r_offsets, mask=mask, other=0.0,
                        eviction_policy=_l2_policy(L2_REVERSED, "evict_first")).to(ACC_DTYPE)
        fused_xmu, act_grad = _recompute(v, r, _along_channel_axis(mean, CHANNELS_LAST, FLAT),
                                         _along_channel_axis(invstd, CHANNELS_LAST, FLAT),
                                         _along_channel_axis(gamma, CHANNELS_LAST, FLAT),
                                         _along_channel_axis(beta, CHANNELS_LAST, FLAT),
                                         _wide_scalar(slope_hi, slope_lo, ACC_DTYPE),
                                         ACTIVATION, HAS_RESIDUAL, FROM_OUTPUT)
        dy = dy * act_grad  # dz from here on
    if WRITE_DRESIDUAL:
        tl.store(dr_ptr + dx_offsets, dy.to(dr_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        sum_dy = tl.load(sums_ptr + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        sum_dy_xmu = tl.load(sums_ptr + C + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        if MASKED:
            inv_count_hi, inv_count_lo = _inv_count_parts(inv_counts_ptr, channels, channel_mask)
        mean_dz, proj = _dx_coefficients(invstd, sum_dy, sum_dy_xmu, inv_count_hi, inv_count_lo, ACC_DTYPE)
        if FUSED:
            xmu = fused_xmu
        else:
            x_offsets = _elementwise_offsets(rows, cols, Q, x_n_stride, x_q_stride, x_k_stride, FLAT,
                                             DENSE_ROWS, INDEX_64)
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0,
                        eviction_policy=_l2_policy(L2_REVERSED, "evict_first")).to(ACC_DTYPE)
            xmu = x - _along_channel_axis(mean, CHANNELS_LAST, FLAT)
        dx = _training_dx(dy, xmu, _along_channel_axis(a, CHANNELS_LAST, FLAT),
                          _along_channel_axis(mean_dz, CHANNELS_LAST, FLAT),
                          _along_channel_axis(proj, CHANNELS_LAST, FLAT))
        if MASKED:  # an uncounted position enters no statistic: only its own term, as in eval
            counted = _counted(mask_ptr, rows, cols, 0, Q, mask_n_stride, mask_q_stride, mask_k_stride, mask,
                               rows < _wide(N, INDEX_64) * Q, CHANNELS_LAST, True, FLAT, DENSE_ROWS, INDEX_64, MASKED)
            dx = tl.where(counted, dx, dy * _along_channel_axis(a, CHANNELS_LAST, FLAT))
    else:
        dx = dy * _along_channel_axis(a, CHANNELS_LAST, FLAT)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def bn_backward_reduce(view: NQKView, dy: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor,
                       weight: Optional[torch.Tensor] = None, eps: float = 0.0, stat_is_var: bool = False,
                       grad_weight: bool = True, grad_bias: bool = True, splits: Optional[int] = None,
                       param_dtype: Optional[torch.dtype] = None, *, bias: Optional[torch.Tensor] = None,
                       activation: int = 0, negative_slope: float = 0.01,
                       residual: Optional[torch.Tensor] = None, from_output: bool = False,
                       evict_last: bool = False):
    """Per-channel (sums [2, C] = (sum dz, sum dz (x - mean)), dgamma or None, dbeta or None),
    dz = dy * act'(z) (dz = dy without an activation).

    dgamma and dbeta take ``param_dtype``, the dtype of the parameters (fp32 under AMP with
    half input); default: the weight's, else the input's. ``bias`` and ``residual`` enter z;
    ``from_output``: the view's tensor is y (save="output"), x is reconstructed from it.
    ``evict_last``: the loads keep x, dy (and r) in L2 for the dx pass that follows (tuning.l2_passes)."""
    x = view.tensor
    C = view.C
    dy_view = nqk_view(dy, view.channels_last)
    r_view = None if residual is None else nqk_view(residual, view.channels_last)
    split = stats_splits(view.N, view.Q, view.K, view.channels_last, x.device, splits)
    partial = fresh(torch.empty((2, split.num, C), dtype=acc_dtype(x.dtype), device=x.device))
    fused = activation != 0 or from_output
    if not fused:  # z's parameters are not read: pass no pointer (plain BN's launch unchanged)
        weight_arg = bias_arg = residual = r_view = None
    else:
        weight_arg, bias_arg = weight, bias

    if param_dtype is None:
        param_dtype = weight.dtype if weight is not None else x.dtype
    sums = fresh(torch.empty((2, C), dtype=partial.dtype, device=x.device))
    # Unused outputs are None, never another buffer (see combine._combine).
    d_weight = fresh(torch.empty(C, dtype=param_dtype, device=x.device)) if grad_weight else None
    d_bias = fresh(torch.empty(C, dtype=param_dtype, device=x.device)) if grad_bias else None
    key = (view[1:], dy_view[1:], split.num, tensor_key(x, dy, mean, stat, weight_arg, bias_arg, residual),
           None if r_view is None else r_view[1:], activation, from_output, stat_is_var, param_dtype,
           grad_weight, grad_bias, eps, negative_slope, evict_last)
    tickets = _tickets(x.device, C)
    tensors = tuple(t for t in (x, dy, residual, mean, stat, weight_arg, bias_arg, partial, tickets, sums, d_weight,
                                d_bias) if t is not None)

    def build():
        if view.channels_last:
            grid = lambda meta: (cdiv(C, meta["BLOCK_K"]), split.num)  # noqa: E731
        else:
            grid = (C, split.num)
        args = (x, dy, residual, mean, stat, weight_arg, bias_arg, partial, view.N, view.Q, view.K, C,
                *view.strides, *dy_view.strides, *(view.strides if r_view is None else r_view.strides),
                split.rows_per_split, split.cols_per_split, split.splits_k, split.num * C,
                float(eps), *split_float(negative_slope), tickets, sums, d_weight, d_bias)
        constexprs = dict(CHANNELS_LAST=view.channels_last, ACC_DTYPE=tl_dtype(x.dtype), STAT_IS_VAR=stat_is_var,
                          HAS_WEIGHT=weight_arg is not None, HAS_BIAS=bias_arg is not None, ACTIVATION=activation,
                          HAS_RESIDUAL=residual is not None, FROM_OUTPUT=from_output, FUSED=fused,
                          HAS_GRAD_WEIGHT=grad_weight, HAS_GRAD_BIAS=grad_bias, EVICT_LAST=evict_last,
                          **reduce_addressing(view, dy_view, r_view, split))
        return grid, args, constexprs, ()
    _PARTIAL.run(key, tensors, build)
    return sums, d_weight, d_bias


def reduce_addressing(view: NQKView, dy_view: NQKView, r_view: Optional[NQKView], split) -> dict:
    """The addressing constexprs of the reduction over these views with this split: its [2, P, C]
    partial sums count too (view.split_addressing)."""
    return split_addressing(addressing(view, dy_view, r_view), split, view.C, 2)


def bn_backward_dx(view: NQKView, dy: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor,
                   weight: Optional[torch.Tensor], sums: Optional[torch.Tensor], inv_count: float,
                   eps: float = 0.0, stat_is_var: bool = False, training: bool = True, *,
                   bias: Optional[torch.Tensor] = None, activation: int = 0, negative_slope: float = 0.01,
                   residual: Optional[torch.Tensor] = None, from_output: bool = False,
                   grad_residual: bool = False, l2_reversed: bool = False, mask: Optional[NQKView] = None,
                   inv_counts: Optional[torch.Tensor] = None):
    """dx for the view's input; ``sums`` from bn_backward_reduce (ignored in eval mode).
    With ``grad_residual`` returns (dx, dresidual), dresidual = dz = dy * act'(z) (dx's strides).
    ``l2_reversed``: right after the reduction, walk the tiles last first, loading evict_first
    (tuning.l2_passes); the same bits as the forward walk. ``mask`` (view.mask_view) and ``inv_counts``
    (1 / M_c per channel, from the forward): a masked training forward's dx (``inv_count`` unused)."""
    x = view.tensor
    C = view.C
    dx = fresh(empty_output(view))
    dr = fresh(empty_output(view)) if grad_residual else None
    dy_view = nqk_view(dy, view.channels_last)
    dx_view = NQKView(dx, *output_geometry(view, dx))
    fused = activation != 0 or from_output
    if not fused:  # dz = dy: neither beta nor the residual is read
        bias = residual = None
    r_view = None if residual is None else nqk_view(residual, view.channels_last)
    sums = sums if training else None
    r_geometry = None if r_view is None else r_view[1:]
    mask = mask if training else None
    m, inv_counts = (None, None) if mask is None else (mask.tensor, inv_counts)
    m_geometry = None if mask is None else mask[1:]  # stride 0 along the channels: never a flat walk
    # dr is allocated like dx: its geometry is dx's. The key's geometries determine the flat walk.
    key = (view[1:], dy_view[1:], dx_view[1:], training, stat_is_var,
           tensor_key(x, dy, dx, mean, stat, weight, sums, bias, residual, dr, m, inv_counts),
           r_geometry, activation, from_output, inv_count, eps, negative_slope, l2_reversed, m_geometry)
    tensors = tuple(t for t in (x, dy, dx, residual, dr, mean, stat, weight, bias, sums, inv_counts, m)
                    if t is not None)

    def build():
        flat = flat_walk((view[1:], dy_view[1:], dx_view[1:], r_geometry, m_geometry))
        args = (x, dy, dx, residual, dr, mean, stat, weight, bias, sums, inv_counts, m,
                view.N, view.Q, view.K, C, *view.strides, *dy_view.strides, *dx_view.strides,
                *(view.strides if r_view is None else r_view.strides), *mask_strides(mask),
                *split_float(inv_count), float(eps), *split_float(negative_slope))
        constexprs = dict(TRAINING=training, STAT_IS_VAR=stat_is_var, HAS_WEIGHT=weight is not None,
                          CHANNELS_LAST=view.channels_last, ACC_DTYPE=tl_dtype(x.dtype), HAS_BIAS=bias is not None,
                          ACTIVATION=activation, HAS_RESIDUAL=residual is not None, FROM_OUTPUT=from_output,
                          WRITE_DRESIDUAL=grad_residual, FUSED=fused,
                          **addressing(view, dy_view, dx_view, r_view, mask), **flat, L2_REVERSED=l2_reversed,
                          MASKED=mask is not None)
        return elementwise_grid(view, flat["FLAT"]), args, constexprs, ()
    _DX.run(key, tensors, build)
    return (dx, dr) if grad_residual else dx


_PARTIAL = Launch(_bn_backward_partial_kernel)
_DX = Launch(_bn_backward_dx_kernel)
