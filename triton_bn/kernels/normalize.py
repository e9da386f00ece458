"""Normalize-affine, the elementwise half of the forward, with the fused epilogue:

    z = (x - mean_c) * a_c + beta_c [+ r],     a_c = gamma_c * invstd_c
    y = act(z)                                 (ACTIVATION, HAS_RESIDUAL; see activation.py)

a_c is folded once per channel per tile; each element costs one subtract and one FMA.
(The fully folded y = x * a_c + b_c, b_c = beta_c - mean_c * a_c, is one FMA but rounds
a_c's error times |x|: with |mean| >> std, e.g. x = 1e4 + randn, it loses ~3 digits in fp32.)
In eval mode mean_c and invstd_c = 1/sqrt(running_var_c + eps) come from the running stats.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .activation import _activation
from .helpers import (_along_channel_axis, _elementwise_offsets, _elementwise_tile, _l2_policy, _load_channel_param,
                      _load_channel_stats, _walk_pid, _wide_scalar, split_float)
from .stats import tl_dtype
from .launch import Launch, fresh, tensor_key
from .tuning import autotune_tiles, cdiv, flat_walk
from .view import addressing, NQKView, empty_output, mergeable, nqk_view, output_geometry


@autotune_tiles("STAT_IS_VAR", "FLAT")
@triton.jit
def _bn_normalize_kernel(
    x_ptr,  # [N, Q, K] input, strides x_{n,q,k}_stride
    r_ptr,  # [N, Q, K] residual (HAS_RESIDUAL), strides r_{n,q,k}_stride
    y_ptr,  # [N, Q, K] output, strides y_{n,q,k}_stride (may be x itself: in-place)
    mean_ptr, stat_ptr,  # [C] mean and invstd (or running var when STAT_IS_VAR)
    weight_ptr, bias_ptr,  # [C] gamma, beta (HAS_WEIGHT, HAS_BIAS)
    N, Q, K,
    x_n_stride, x_q_stride, x_k_stride,
    r_n_stride, r_q_stride, r_k_stride,
    y_n_stride, y_q_stride, y_k_stride,
    eps, slope_hi, slope_lo,  # negative_slope = hi + lo (see split_float)
    STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DENSE_ROWS: tl.constexpr, INDEX_64: tl.constexpr,  # addressing (helpers._row_offsets)
    # FLAT: x, r, y are dense with the same strides and walked as one flat [N*Q*K] array
    FLAT: tl.constexpr, FLAT_INNER: tl.constexpr, FLAT_C: tl.constexpr,  # (helpers._flat_tile)
    # L2_REVERSED: after the statistics pass, the last tile first, x and r loaded evict_first (_walk_pid)
    L2_REVERSED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, mask, channels, channel_mask = _elementwise_tile(_walk_pid(L2_REVERSED), N, Q, K, CHANNELS_LAST, FLAT,
                                                                 FLAT_INNER, FLAT_C, INDEX_64, BLOCK_R, BLOCK_K)
    mean, invstd = _load_channel_stats(mean_ptr, stat_ptr, channels, channel_mask, eps, STAT_IS_VAR, ACC_DTYPE)
    scale = invstd * _load_channel_param(weight_ptr, channels, channel_mask, 1.0, HAS_WEIGHT, ACC_DTYPE)
    shift = _load_channel_param(bias_ptr, channels, channel_mask, 0.0, HAS_BIAS, ACC_DTYPE)

    x_offsets = _elementwise_offsets(rows, cols, Q, x_n_stride, x_q_stride, x_k_stride, FLAT, DENSE_ROWS,
                                     INDEX_64)
    y_offsets = _elementwise_offsets(rows, cols, Q, y_n_stride, y_q_stride, y_k_stride, FLAT, DENSE_ROWS,
                                     INDEX_64)
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0,
                eviction_policy=_l2_policy(L2_REVERSED, "evict_first")).to(ACC_DTYPE)
    y = (x - _along_channel_axis(mean, CHANNELS_LAST, FLAT)) * _along_channel_axis(scale, CHANNELS_LAST, FLAT) \
        + _along_channel_axis(shift, CHANNELS_LAST, FLAT)
    if HAS_RESIDUAL:
        r_offsets = _elementwise_offsets(rows, cols, Q, r_n_stride, r_q_stride, r_k_stride, FLAT, DENSE_ROWS,
                                         INDEX_64)
        y += tl.load(r_ptr + r_offsets, mask=mask, other=0.0,
                     eviction_policy=_l2_policy(L2_REVERSED, "evict_first")).to(ACC_DTYPE)
    y = _activation(y, _wide_scalar(slope_hi, slope_lo, ACC_DTYPE), ACTIVATION)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def elementwise_grid(view: NQKView, flat: bool = False):
    """The 1-D grid of an elementwise launch: one program per [BLOCK_R, BLOCK_K] tile of the
    [N*Q, K] matrix, or per BLOCK_R * BLOCK_K elements of the flat array (FLAT)."""
    if flat:
        return _flat_grid(view.N * view.Q * view.K)
    return _elementwise_grid(view.N * view.Q, view.K)


@functools.lru_cache(maxsize=4096)
def _elementwise_grid(rows: int, K: int):
    return lambda meta: (cdiv(rows, meta["BLOCK_R"]) * cdiv(K, meta["BLOCK_K"]),)


@functools.lru_cache(maxsize=4096)
def _flat_grid(numel: int):
    return lambda meta: (cdiv(numel, meta["BLOCK_R"] * meta["BLOCK_K"]),)


@functools.lru_cache(maxsize=4096)
def _normalize_constexprs(stat_is_var: bool, has_weight: bool, has_bias: bool, channels_last: bool,
                          dtype: torch.dtype, activation: int, has_residual: bool, dense_rows: bool,
                          index_64: bool, flat: bool, flat_inner: int, flat_c: int, l2_reversed: bool) -> dict:
    return dict(STAT_IS_VAR=stat_is_var, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
                CHANNELS_LAST=channels_last, ACC_DTYPE=tl_dtype(dtype), ACTIVATION=activation,
                HAS_RESIDUAL=has_residual, DENSE_ROWS=dense_rows, INDEX_64=index_64,
                FLAT=flat, FLAT_INNER=flat_inner, FLAT_C=flat_c, L2_REVERSED=l2_reversed)


_NORMALIZE = Launch(_bn_normalize_kernel)
_Y_ARG = _NORMALIZE.names.index("y_ptr")


def bn_normalize(view: NQKView, mean: torch.Tensor, stat: torch.Tensor,
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 eps: float = 0.0, stat_is_var: bool = False,
                 out: Optional[torch.Tensor] = None, *, activation: int = 0, negative_slope: float = 0.01,
                 residual: Optional[torch.Tensor] = None, l2_reversed: bool = False) -> torch.Tensor:
    """y = act((x - mean) * invstd * weight + bias [+ residual]) over the view's tensor, written
    into ``out`` (default: ``empty_output``, the input's memory format where the kernels can
    address it; ``out`` may be x itself: each element is read before it is written).
    ``stat`` is invstd, or the running variance when ``stat_is_var`` (eval mode; then eps is used).
    ``activation``: a code of activation.py; ``residual``: x's shape, any strides.
    ``l2_reversed``: right after the statistics pass, walk the tiles last first, loading x
    evict_first (tuning.l2_passes); the same bits as the forward walk."""
    x = view.tensor
    y = fresh(empty_output(view)) if out is None else out
    y_geometry = output_geometry(view, y, allocated=out is None)
    r_view = None
    if residual is not None:
        residual = mergeable(residual)
        r_view = nqk_view(residual, view.channels_last)
    # In place, a key the autotuner has not seen would be benchmarked by launching every
    # candidate config several times, each normalizing the previous one's output: the first
    # call of the key runs on a scratch output first (Launch's scratch).
    in_place = out is not None and out.data_ptr() == x.data_ptr()
    # y is fresh (aligned) unless given; its geometry is part of the key either way. The key's
    # geometries determine the flat walk (and with it the compiled variant and the grid).
    key = (view[1:], y_geometry, stat_is_var, tensor_key(x, mean, stat, weight, bias, residual),
           True if out is None else out.data_ptr() & 15 == 0, activation, None if r_view is None else r_view[1:],
           eps, negative_slope, in_place, l2_reversed)
    tensors = (x, y, mean, stat) if weight is None and bias is None and residual is None else \
        tuple(t for t in (x, residual, y, mean, stat, weight, bias) if t is not None)

    def build():
        y_view = NQKView(y, *y_geometry)
        flat = flat_walk((view[1:], y_geometry, None if r_view is None else r_view[1:]))
        args = (x, residual, y, mean, stat, weight, bias, view.N, view.Q, view.K, *view.strides,
                *(view.strides if r_view is None else r_view.strides), *y_view.strides, float(eps),
                *split_float(negative_slope))
        constexprs = _normalize_constexprs(stat_is_var, weight is not None, bias is not None, view.channels_last,
                                           x.dtype, activation, residual is not None,
                                           *addressing(view, y_view, r_view).values(), *flat.values(),
                                           l2_reversed)
        return elementwise_grid(view, flat["FLAT"]), args, constexprs, (_Y_ARG,) if in_place else ()
    _NORMALIZE.run(key, tensors, build)
    return y
