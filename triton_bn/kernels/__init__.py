"""Layer 1: Triton kernels and their launchers (tensor in, tensor out; no autograd).

The three launchers below compose the per-stage launchers into whole batch-norm steps:

    forward, training: statistics (partials; the last program per channel combines and
                       updates the running stats) -> normalize                           2 launches
                       on chip (a channel's slab fits in registers, onchip.py)            1 launch
                       cooperative (the slab over G co-resident programs, cooperative.py) 1 launch
    forward, eval:     normalize with the running statistics                          1 launch
    backward:          reduction (the last program per channel adds the splits) -> dx   2 launches
                       on chip, or cooperative                                          1 launch

The on-chip path is taken when ``splits`` is None, ``tuning.onchip_enabled()`` and
``onchip.onchip_tile_for(view)`` (tuning.onchip_tile: the padded slab has at most
ONCHIP_MAX_ELEMENTS elements; int32 addressing); else the cooperative path when ``splits`` is
None and ``cooperative.cooperative_plan_for(view)`` (its switch, off by default until a GPU has
measured it, and a co-resident grid). SyncBatchNorm keeps the split path.

The statistics launch (either path) also increments ``num_batches_tracked`` when given.
``bn_forward_train`` and ``bn_backward`` are replayed per call signature (replay.py);
``bn_forward_eval`` only under a key its caller computed (``keyed``, eager.py).

Each takes the fused epilogue as keyword arguments: ``activation`` (a code of activation.py),
``negative_slope``, ``residual`` (y = act(BN(x) + residual)); the backward also ``bias`` (z
needs beta), ``from_output`` (its ``x`` argument is y: save="output") and returns dresidual.
"""
from __future__ import annotations

from typing import Optional

import torch

from .activation import ACTIVATIONS, activation_code, invertible
from .backward import bn_backward_dx, bn_backward_reduce
from .normalize import bn_normalize
from .replay import replayable
from .onchip import bn_onchip_backward, bn_onchip_forward, onchip_tile_for
from .cooperative import bn_cooperative_backward, bn_cooperative_forward, cooperative_plan_for
from .combine import bn_stats_combine, bn_stats_combine_groups
from .stats import bn_stats, bn_stats_partial
from .tuning import (cooperative_enabled, l2_hints_enabled, l2_passes, onchip_enabled, use_cooperative, use_l2_hints,
                     use_onchip)
from .view import NQKView, _geometry, mask_view, mergeable, nqk_view, output_for

__all__ = [
    "bn_forward_train", "bn_forward_eval", "bn_backward", "input_view", "check_writable",
    "bn_stats", "bn_stats_partial", "bn_stats_combine", "bn_stats_combine_groups", "bn_normalize",
    "bn_backward_reduce", "bn_backward_dx", "NQKView", "nqk_view", "output_for",
    "ACTIVATIONS", "activation_code", "invertible", "onchip_enabled", "use_onchip", "l2_hints_enabled", "use_l2_hints",
    "cooperative_enabled", "use_cooperative",
]


def input_view(x: torch.Tensor) -> NQKView:
    """The kernels' view of an (N, C, *spatial) input; copies only non-mergeable spatial dims."""
    geometry = _geometry(tuple(x.shape), x.stride(), None)
    return NQKView(x, *geometry) if geometry is not None else nqk_view(x.contiguous())


def check_writable(out: torch.Tensor) -> None:
    """An in-place output (``inplace=True``, the launchers' ``out=``) must be one the kernels can
    write without a race, checked before any launch. torch's rule for in-place ops (its
    assert_no_internal_overlap): a dim of size > 1 with stride 0 makes several elements one
    memory location: on a GPU their programs race, so torch's error. Spatial dims that do not
    merge into one strided axis cannot be addressed by the kernels (view.py), and an in-place
    call must not fall back to a copy it would then have to write back."""
    if any(size > 1 and stride == 0 for size, stride in zip(out.shape, out.stride())):
        raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                           "single memory location. Please clone() the tensor before performing the operation.")
    if out.dim() > 2 and _geometry(tuple(out.shape), out.stride(), None) is None:
        raise ValueError("batch_norm(inplace=True): the input's spatial dimensions do not merge into one strided "
                         "axis (e.g. a view sliced in two spatial directions), which the kernels cannot write in "
                         "place; pass inplace=False or a contiguous input")


@replayable
def bn_forward_train(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     momentum: Optional[float] = 0.1, eps: float = 1e-5,
                     num_batches_tracked: Optional[torch.Tensor] = None,
                     splits: Optional[int] = None, *, activation: int = 0, negative_slope: float = 0.01,
                     residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                     mask: Optional[torch.Tensor] = None):
    """(y, save_mean, save_invstd) from batch statistics; running stats updated in place (any
    strides: a non-contiguous buffer is updated through a contiguous copy, written back).
    ``mask``: bool (N, *spatial), True where a position counts: the statistics (and the running
    update, unbiased by M_c / (M_c - 1)) are over those positions only, y is computed everywhere,
    and the result gains a 4th entry, ``inv_counts``: 1 / M_c per channel as [C, 2] float32
    (hi, lo) pairs (M_c the counted positions), which bn_backward takes back.
    ``num_batches_tracked`` (the step counter) is incremented by the statistics launch;
    ``momentum=None``: the cumulative average, factor 1 / its new value (as torch's modules).
    y = act(BN(x) + residual) with the fused epilogue; ``out=x`` writes y over x (in-place)."""
    if out is not None:
        check_writable(out)  # before the statistics launch moves the running statistics
    view = input_view(x)
    m = None if mask is None else mask_view(view, mask)
    rm, rv = _contiguous(running_mean), _contiguous(running_var)
    tile = onchip_tile_for(view) if splits is None and onchip_enabled() else None
    plan = cooperative_plan_for(view) if splits is None and tile is None else None
    fused = dict(activation=activation, negative_slope=negative_slope, residual=residual, out=out, mask=m)
    if tile is not None:  # the slab fits on chip: one launch, x read once
        y, *stats = bn_onchip_forward(view, tile, weight, bias, rm, rv, momentum, eps, num_batches_tracked, **fused)
    elif plan is not None:  # the slab over a co-resident grid: one launch, x read once
        y, *stats = bn_cooperative_forward(view, plan, weight, bias, rm, rv, momentum, eps, num_batches_tracked,
                                           **fused)
    else:  # the split path: normalize re-reads x after the statistics pass (tuning.l2_passes)
        evict_last, l2_reversed = l2_passes(view.N * view.Q * view.K * x.element_size(), x.device)
        stats = bn_stats(view, eps, rm, rv, momentum, num_batches_tracked, splits, evict_last, m)
    for buffer, updated in ((running_mean, rm), (running_var, rv)):
        if updated is not buffer:
            buffer.copy_(updated)
    if tile is None and plan is None:
        y = bn_normalize(view, stats[0], stats[1], weight, bias, out=out, activation=activation,
                         negative_slope=negative_slope, residual=residual, l2_reversed=l2_reversed)
    return (y, *stats)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


@replayable(by_arguments=False)  # its own key costs more than its Python: replayed under eager.py's
def bn_forward_eval(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float = 1e-5, *,
                    activation: int = 0, negative_slope: float = 0.01, residual: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = act(BN(x) + residual) from the running statistics (``out=x``: in place)."""
    if out is not None:
        check_writable(out)
    return bn_normalize(input_view(x), running_mean, running_var, weight, bias, eps, stat_is_var=True, out=out,
                        activation=activation, negative_slope=negative_slope, residual=residual)


@replayable
def bn_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                mean: torch.Tensor, stat: torch.Tensor, eps: float = 0.0, training: bool = True,
                needs_input_grad=(True, True, True), splits: Optional[int] = None,
                param_dtype: Optional[torch.dtype] = None, *, bias: Optional[torch.Tensor] = None,
                activation: int = 0, negative_slope: float = 0.01, residual: Optional[torch.Tensor] = None,
                from_output: bool = False, mask: Optional[torch.Tensor] = None,
                inv_counts: Optional[torch.Tensor] = None):
    """(dx, dweight, dbias), each None where not needed; (dx, dweight, dbias, dresidual) when
    ``needs_input_grad`` has a 4th entry (the residual's). ``mask`` and ``inv_counts``: a masked
    training forward's mask and the inv_counts it returned (dx of the masked statistics).

    ``mean``/``stat`` are save_mean/save_invstd (training) or running_mean/running_var (eval).
    ``param_dtype``: the dtype of weight and bias, hence of their gradients (needed when there
    is a bias but no weight; default: the weight's, else the input's).
    Fused epilogue: ``bias``, ``activation``, ``negative_slope``, ``residual`` as in the forward;
    ``from_output``: ``x`` is the forward's output y (save="output"), whose weight must be > 0.
    """
    view = input_view(x)
    dy = mergeable(dy)
    residual = None if residual is None else mergeable(residual)
    need_dx, need_dw, need_db = needs_input_grad[:3]
    need_dr = len(needs_input_grad) > 3 and bool(needs_input_grad[3])
    fused = dict(bias=bias, activation=activation, negative_slope=negative_slope, residual=residual,
                 from_output=from_output)
    need_dw = need_dw and weight is not None
    m = None if mask is None or not training else mask_view(view, mask)
    tile = onchip_tile_for(view) if splits is None and onchip_enabled() else None
    plan = cooperative_plan_for(view) if splits is None and tile is None else None
    if tile is not None or plan is not None:  # on chip or cooperative: one launch, x and dy read once
        args = (dy, mean, stat, weight, eps, training, (need_dx, need_dw, need_db, need_dr), param_dtype)
        one_read = dict(mask=m, inv_counts=inv_counts, **fused)
        grads = (bn_onchip_backward(view, tile, *args, **one_read) if tile is not None
                 else bn_cooperative_backward(view, plan, *args, **one_read))
        return grads if len(needs_input_grad) > 3 else grads[:3]
    stat_is_var = not training
    sums = d_weight = d_bias = None
    reduce = need_dw or need_db or ((need_dx or need_dr) and training)
    # The split path's dx re-reads x, dy (and r) after the reduction (tuning.l2_passes).
    evict_last = l2_reversed = False
    if reduce and (need_dx or need_dr):
        read = 3 if residual is not None and (activation != 0 or from_output) else 2
        evict_last, l2_reversed = l2_passes(read * view.N * view.Q * view.K * x.element_size(), x.device)
    if reduce:
        sums, d_weight, d_bias = bn_backward_reduce(view, dy, mean, stat, weight, eps, stat_is_var,
                                                    grad_weight=need_dw, grad_bias=need_db, splits=splits,
                                                    param_dtype=param_dtype, evict_last=evict_last, **fused)
    dx = d_residual = None
    if need_dx or need_dr:
        inv_count = 1.0 / max(view.per_channel, 1)
        dx = bn_backward_dx(view, dy, mean, stat, weight, sums, inv_count, eps, stat_is_var, training,
                            grad_residual=need_dr, l2_reversed=l2_reversed, mask=m, inv_counts=inv_counts, **fused)
        if need_dr:
            dx, d_residual = dx
        dx = dx if need_dx else None
    if len(needs_input_grad) > 3:
        return dx, d_weight, d_bias, d_residual
    return dx, d_weight, d_bias
