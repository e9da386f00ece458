"""Layer 1: Triton kernels and their launchers (tensor in, tensor out; no autograd).

The three launchers below compose the per-stage launchers into whole batch-norm steps:

    forward, training: statistics (partials; the last program per channel combines and
                       updates the running stats) -> normalize                           2 launches
    forward, eval:     normalize with the running statistics                          1 launch
    backward:          backward partial -> backward combine -> dx                     3 launches
"""
from __future__ import annotations

from typing import Optional

import torch

from .backward import bn_backward_dx, bn_backward_reduce
from .normalize import bn_normalize
from .combine import bn_stats_combine, bn_stats_combine_groups
from .stats import bn_stats, bn_stats_partial
from .view import NQKView, _geometry, mergeable, nqk_view, output_for

__all__ = [
    "bn_forward_train", "bn_forward_eval", "bn_backward", "input_view",
    "bn_stats", "bn_stats_partial", "bn_stats_combine", "bn_stats_combine_groups", "bn_normalize",
    "bn_backward_reduce", "bn_backward_dx", "NQKView", "nqk_view", "output_for",
]


def input_view(x: torch.Tensor) -> NQKView:
    """The kernels' view of an (N, C, *spatial) input; copies only non-mergeable spatial dims."""
    view = _cached_view(x)
    return view if view is not None else nqk_view(x.contiguous())


def _cached_view(x: torch.Tensor) -> Optional[NQKView]:
    geometry = _geometry(tuple(x.shape), x.stride(), None)
    return None if geometry is None else NQKView(x, *geometry)


def bn_forward_train(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     momentum: float = 0.1, eps: float = 1e-5,
                     num_batches_tracked: Optional[torch.Tensor] = None,
                     splits: Optional[int] = None):
    """(y, save_mean, save_invstd) from batch statistics; running stats updated in place (any
    strides: a non-contiguous buffer is updated through a contiguous copy, written back)."""
    view = input_view(x)
    rm, rv = _contiguous(running_mean), _contiguous(running_var)
    mean, invstd = bn_stats(view, eps, rm, rv, momentum, num_batches_tracked, splits)
    for buffer, updated in ((running_mean, rm), (running_var, rv)):
        if updated is not buffer:
            buffer.copy_(updated.view_as(buffer))
    return bn_normalize(view, mean, invstd, weight, bias), mean, invstd


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def bn_forward_eval(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y from the running statistics."""
    return bn_normalize(input_view(x), running_mean, running_var, weight, bias, eps, stat_is_var=True)


def bn_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                mean: torch.Tensor, stat: torch.Tensor, eps: float = 0.0, training: bool = True,
                needs_input_grad=(True, True, True), splits: Optional[int] = None,
                param_dtype: Optional[torch.dtype] = None):
    """(dx, dweight, dbias), each None where not needed.

    ``mean``/``stat`` are save_mean/save_invstd (training) or running_mean/running_var (eval).
    ``param_dtype``: the dtype of weight and bias, hence of their gradients (needed when there
    is a bias but no weight; default: the weight's, else the input's).
    """
    view = input_view(x)
    dy = mergeable(dy)
    need_dx, need_dw, need_db = needs_input_grad
    need_dw = need_dw and weight is not None
    stat_is_var = not training
    sums = d_weight = d_bias = None
    if need_dw or need_db or (need_dx and training):
        sums, d_weight, d_bias = bn_backward_reduce(view, dy, mean, stat, weight, eps, stat_is_var,
                                                    grad_weight=need_dw, grad_bias=need_db, splits=splits,
                                                    param_dtype=param_dtype)
    dx = None
    if need_dx:
        inv_count = 1.0 / max(view.per_channel, 1)
        dx = bn_backward_dx(view, dy, mean, stat, weight, sums, inv_count, eps, stat_is_var, training)
    return dx, d_weight, d_bias
