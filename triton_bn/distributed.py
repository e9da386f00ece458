"""Layer 4: batch statistics synchronized over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Forward (training), on every rank of the process group:

    local moments   (mean_r, M2_r, n_r, pivot_r)        bn_stats_partial + bn_stats_combine
                    per channel (mean_r of x - pivot_r)
    one all_gather  -> [W, 4, C]                        every rank's moments, exact for uneven
                                                        batches and ranks with n_r = 0
    Chan-combine    -> global mean, invstd              bn_stats_combine_groups, which also
                                                        updates the running statistics (unbiased
                                                        with the global count n = sum n_r)
    normalize       y_r = (x_r - mean) * invstd * gamma + beta

Backward, with xhat = (x - mean) * invstd and the global sums over every rank's elements:

    local sums      (sum dy_r, sum dy_r (x_r - mean))   bn_backward_reduce, which also gives the
                                                        local dgamma_r, dbeta_r
    one all_reduce  -> global sums                      (skipped when dx is not needed)
    dx_r = gamma invstd (dy_r - sum dy / n - xhat_r sum dy xhat / n)      bn_backward_dx

dgamma and dbeta stay local, as ``torch.nn.SyncBatchNorm`` returns them: each rank's share of
the gradient of the sum of all ranks' losses; DDP's gradient all-reduce adds (and averages) them.
A rank with an empty batch returns zeros for them (torch returns None, which leaves DDP's
all-reduce waiting for that rank's gradient).

Bytes each rank sends per layer (C channels, float32 moments; float64 for double input):
forward all_gather 4 * C * 4 (it receives W times that), backward all_reduce 2 * C * 4.

The element counts never leave the device (no ``.item()``), so the forward and backward can be
captured in a CUDA graph with NCCL.

Fused layers (``SyncBatchNormAct``: y = act(BN(x) + residual), fused_modules.py): the same
collectives; the normalize launch applies the epilogue, and the backward launches take dy
through act' and give dresidual, as in the unsynchronized kernels. Memory mode
save="output" (In-Place ABN) keeps y instead of x, scale |gamma| + eps (functional.py).

Masked batch norm (``forward(x, mask=)``, triton_bn.mask): each rank's moments are over the
positions its mask counts, and the counts travel with them in the all_gather, so the global
statistics are exact over every rank's counted positions; the backward's dx divides by the
global counts (on the device) and applies the projection where the mask counts.

``convert_sync_batchnorm`` maps every batch norm to its synchronized form: plain ones (torch's,
triton_bn's, torch's SyncBatchNorm) to ``SyncBatchNorm``, fused ones (triton_bn's BatchNormAct*d,
timm's BatchNormAct2d / SyncBatchNormAct where timm_layers.parts expresses them) to
``SyncBatchNormAct``, keeping activation, residual, memory mode and drop.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.fx import Proxy

from .checks import check_args, check_fused
from .eager import uses_kernels
from .function import param_dtype
from .functional import _contiguous_param
from .fused_modules import _BatchNormAct, _dropped, _FusedForward
from .kernels import (bn_backward_dx, bn_backward_reduce, bn_normalize, bn_stats_combine,
                      bn_stats_combine_groups, bn_stats_partial, input_view)
from .kernels.stats import acc_dtype
from .kernels.view import mask_view, mergeable
from .mask import check_mask
from .modules import _TritonBatchNorm, with_class
from .timm_layers import Unexpressible, adopted, is_timm, parts, timm_class

__all__ = ["SyncBatchNorm", "SyncBatchNormAct", "SyncBatchNormFunction", "convert_sync_batchnorm", "sync_batch_norm"]


def _all_gather_moments(moments: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """Every rank's [4, C] moments stacked as [W, 4, C], in rank order (one collective)."""
    gathered = torch.empty((world_size, *moments.shape), dtype=moments.dtype, device=moments.device)
    if moments.device.type == "cpu" or dist.get_backend(group) == "gloo":
        # Gloo (which serves CPU tensors) has no all_gather into one tensor: gather into
        # per-rank views of one buffer instead.
        dist.all_gather(list(gathered.unbind(0)), moments, group=group)
    else:
        # all_gather_single (torch >= 2.13) is the new name of all_gather_into_tensor.
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_into(gathered.view(-1), moments.reshape(-1), group=group)
    return gathered


class SyncBatchNormFunction(torch.autograd.Function):
    """y = act(BN(x; weight, bias) + residual) with the statistics of the whole process group
    (training only); ``activation``: a code of kernels/activation.py; ``save_output``: the
    backward keeps y (weight is then |gamma| + eps, made by the caller); ``inplace``: y over x."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps,
                num_batches_tracked, group, world_size, residual=None, activation=0, negative_slope=0.01,
                save_output=False, inplace=False, mask=None):
        C = input.shape[1]
        if input.numel() > 0:
            view = input_view(input)
            counted = None if mask is None else mask_view(view, mask)
            _, _, moments = bn_stats_combine(bn_stats_partial(view, mask=counted), eps, return_moments=True)
        else:
            # An empty rank contributes count 0 (which the combine ignores) but must still
            # join the collective, or its peers would wait for it forever.
            moments = torch.zeros((4, C), dtype=acc_dtype(input.dtype), device=input.device)
        gathered = _all_gather_moments(moments, group, world_size)
        mean, invstd, *inv_counts = bn_stats_combine_groups(
            gathered, eps, running_mean=running_mean, running_var=running_var, momentum=momentum,
            num_batches_tracked=num_batches_tracked, return_inv_counts=mask is not None)
        # [C] global elements per channel, kept on the device (masked: 1 / them, from the combine)
        count = inv_counts[0] if inv_counts else gathered[:, 2].sum(0)
        if input.numel() > 0:
            y = bn_normalize(view, mean, invstd, weight, bias, out=input if inplace else None, activation=activation,
                             negative_slope=negative_slope, residual=residual)
        else:
            y = input if inplace else torch.empty_like(input)
        # The residual is read back only where z needs it: an activation, or x rebuilt from y.
        keep_residual = residual if (activation != 0 or save_output) else None
        ctx.save_for_backward(y if save_output else input, weight, bias, mean, invstd, count, keep_residual, mask)
        if inplace:
            ctx.mark_dirty(input)
        ctx.group = group
        ctx.param_dtype = param_dtype(weight, bias, input)
        ctx.epilogue = (activation, negative_slope, save_output, residual is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, bias, mean, invstd, count, residual, mask = ctx.saved_tensors  # input: y with save_output
        activation, negative_slope, from_output, has_residual = ctx.epilogue
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_dr = has_residual and ctx.needs_input_grad[10]
        fused = activation != 0 or from_output  # dz = dy * act'(z) needs z: else dz = dy
        epilogue = dict(bias=bias, activation=activation, negative_slope=negative_slope, residual=residual,
                        from_output=from_output)
        dx = d_weight = d_bias = dr = None
        if need_dr and not fused:
            dr = grad_output  # z = BN(x) + r: dr = dy
        need_dz = need_dr and fused  # dz comes with dx's launch, which needs the all-reduced sums
        if input.numel() > 0:
            view = input_view(input)
            dy = mergeable(grad_output)
            if need_dx or need_dw or need_db or need_dz:
                sums, d_weight, d_bias = bn_backward_reduce(view, dy, mean, invstd, weight,
                                                            grad_weight=need_dw, grad_bias=need_db,
                                                            param_dtype=ctx.param_dtype, **epilogue)
        else:
            C = input.shape[1]
            sums = torch.zeros((2, C), dtype=mean.dtype, device=input.device)
            # An empty batch contributes nothing: zero gradients, not None. torch returns None
            # here, and then DDP's gradient all-reduce waits on this rank for a gradient that
            # never comes.
            zeros = lambda: torch.zeros(C, dtype=ctx.param_dtype, device=input.device)  # noqa: E731
            d_weight = zeros() if need_dw else None
            d_bias = zeros() if need_db else None
        if need_dx or need_dz:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            if input.numel() > 0:
                if mask is not None:  # the masked dx reads 1 / the global counts itself
                    dx = bn_backward_dx(view, dy, mean, invstd, weight, sums, inv_count=1.0, grad_residual=need_dz,
                                        mask=mask_view(view, mask), inv_counts=count, **epilogue)
                else:
                    # The kernel takes 1 / n as a float; n lives on the device, so the sums are
                    # divided here instead (a [2, C] op, no host sync).
                    dx = bn_backward_dx(view, dy, mean, invstd, weight, sums / count, inv_count=1.0,
                                        grad_residual=need_dz, **epilogue)
                if need_dz:
                    dx, dr = dx
            else:
                dx = torch.empty_like(input)  # still joined the all_reduce: its peers wait for it
                dr = torch.empty_like(input) if need_dz else dr
        return (dx if need_dx else None, d_weight, d_bias, None, None, None, None, None, None, None, dr,
                None, None, None, None, None)


def _check_sync_args(input, running_mean, running_var, weight, bias, momentum, eps):
    """Every check, before any collective or buffer change (a rank that raises here leaves its
    peers waiting in the collective, exactly as with torch's SyncBatchNorm)."""
    if not uses_kernels(input):
        raise ValueError(f"SyncBatchNorm: synchronized statistics need a CUDA input, or a CPU input "
                         f"run through Triton's interpreter (TRITON_INTERPRET=1); got {input.device}")
    # torch's SyncBatchNorm skips the "more than 1 value per channel" check when synchronizing
    # (only the global count matters, and reading it would sync with the host): so do we.
    check_args(input, running_mean, running_var, weight, bias, True, momentum, eps, check_count=False)
    for name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
        if buffer is not None and not buffer.is_contiguous():
            raise ValueError(f"SyncBatchNorm: {name} must be contiguous (it is updated in place)")


def _apply(input, running_mean, running_var, weight, bias, momentum, eps, group, world_size,
           num_batches_tracked, mask=None):
    return SyncBatchNormFunction.apply(input, _contiguous_param(weight), _contiguous_param(bias),
                                       running_mean, running_var, float(momentum), float(eps),
                                       num_batches_tracked, group, world_size, None, 0, 0.01, False, False, mask)


def sync_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                    running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], momentum: float, eps: float, group, world_size: int,
                    num_batches_tracked: Optional[torch.Tensor] = None, *,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Training-mode batch norm with the statistics of every rank of ``group``.

    Every rank must call it (also one whose batch is empty). ``running_mean``/``running_var``
    (contiguous [C], or None) are updated in place, identically on every rank;
    ``num_batches_tracked`` (a device counter, already incremented) replaces ``momentum`` by
    1 / num_batches_tracked. ``mask``: masked batch norm (triton_bn.mask), each rank its own.
    Arguments are checked before any collective or buffer change.
    """
    _check_sync_args(input, running_mean, running_var, weight, bias, momentum, eps)
    mask = None if mask is None else check_mask(input, mask)
    return _apply(input, running_mean, running_var, weight, bias, momentum, eps, group, world_size,
                  num_batches_tracked, mask)


class SyncBatchNorm(_TritonBatchNorm, nn.SyncBatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` (same constructor, ``process_group``, state_dict).

    Training with an initialized process group of more than one rank synchronizes the batch
    statistics; eval mode, no process group or a world of one rank run exactly as
    ``triton_bn.BatchNorm*d``, with no collective. Works with NCCL on CUDA tensors and with
    gloo on CPU tensors run through Triton's interpreter.
    """

    def _sync_group(self):
        """(group, world size) to synchronize over, or None for the unsynchronized layer."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(input, Proxy):  # only a tracer makes Proxies: no private tracing flag to read
            # torch.fx.symbolic_trace: a call_module leaf (modules.py)
            return self._fx_leaf(input, **({} if mask is None else {"mask": mask}))
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        sync = self._sync_group()
        if sync is None:
            return super().forward(input, mask)
        return self._synchronized(input, sync, mask=mask)

    def _synchronized(self, input: torch.Tensor, sync, activation=None, negative_slope: float = 0.01,
                      residual=None, save: str = "input", inplace: bool = False, mask=None) -> torch.Tensor:
        """The synchronized training step of a checked input (fused epilogue: batch_norm's;
        ``mask``: masked batch norm, checked here before any collective)."""
        group, world_size = sync
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        momentum = 0.0 if self.momentum is None else self.momentum
        code = check_fused(input, activation, negative_slope, residual, save, inplace)
        _check_sync_args(input, running_mean, running_var, self.weight, self.bias, momentum, self.eps)
        mask = None if mask is None else check_mask(input, mask)
        num_batches_tracked = None
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                num_batches_tracked = self.num_batches_tracked
        weight = self.weight
        if save == "output" and weight is not None:
            weight = weight.abs() + self.eps  # In-Place ABN's scale (functional.py), differentiable
        return SyncBatchNormFunction.apply(input, _contiguous_param(weight), _contiguous_param(self.bias),
                                           running_mean, running_var, float(momentum), float(self.eps),
                                           num_batches_tracked, group, world_size, residual, code,
                                           float(negative_slope), save == "output", inplace, mask)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch norm in ``module`` by its synchronized form, as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for torch's: BatchNorm*d (torch's,
        triton_bn's, other subclasses) and SyncBatchNorm become this class; fused layers
        (triton_bn's BatchNormAct*d, timm's BatchNormAct2d / SyncBatchNormAct) become
        ``SyncBatchNormAct`` with their activation, memory mode and drop. The new layers share
        the old parameters, buffers and hooks and keep the train/eval state. A timm layer whose
        activation has no fused kernel becomes timm's own SyncBatchNormAct (torch's kernels),
        as timm's converter makes it. Returns the converted module (a new object if ``module``
        itself is a batch norm)."""
        output = _sync_form(module, process_group, cls)
        for name, child in list(output.named_children()):
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output


class SyncBatchNormAct(_FusedForward, SyncBatchNorm):
    """act(SyncBatchNorm(x) + residual) (``forward(x, residual=None)``), any input of rank >= 2:
    ``BatchNormAct*d``'s fused arguments (act_layer, negative_slope, save, inplace) after
    ``torch.nn.SyncBatchNorm``'s. Unsynchronized (eval, no process group, one rank) it is
    exactly the BatchNormAct*d of the same settings."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, act_layer="relu",
                 negative_slope: float = 0.01, save: str = "input", inplace: bool = False, device=None, dtype=None,
                 **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device=device,
                         dtype=dtype, **kwargs)
        self._setup_fused(act_layer, negative_slope, save, inplace)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sync = None if isinstance(input, Proxy) else self._sync_group()
        if sync is None:  # the unsynchronized fused layer (or the tracer's call_module leaf)
            return _FusedForward.forward(self, input, residual, mask)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return _dropped(self, self._synchronized(input, sync, self.act_layer, self.negative_slope, residual,
                                                 self.save, self.inplace, mask))


def _sync_form(module: nn.Module, process_group, plain_cls: type) -> nn.Module:
    """The synchronized layer standing for ``module`` (itself when it is no batch norm)."""
    if is_timm(module, "BatchNormAct2d", "SyncBatchNormAct"):
        try:
            act, drop = parts(module)
        except Unexpressible:
            new = with_class(module, timm_class("SyncBatchNormAct"))  # timm's own converter's result
        else:
            new = adopted(module, SyncBatchNormAct, act, drop)
            new._origin = (timm_class("SyncBatchNormAct"), new._origin[1])
    elif isinstance(module, (_BatchNormAct, SyncBatchNormAct)):
        new = with_class(module, SyncBatchNormAct)
        origin = getattr(module, "_origin", None)
        if origin is not None and origin[0] is timm_class("BatchNormAct2d"):
            new._origin = (timm_class("SyncBatchNormAct"), origin[1])
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = with_class(module, plain_cls)
    else:
        return module
    new.process_group = process_group
    return new


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``SyncBatchNorm.convert_sync_batchnorm``: every batch norm in ``module`` becomes its
    synchronized form (``SyncBatchNorm``, or ``SyncBatchNormAct`` for fused and timm's norm-act
    layers) synchronizing over ``process_group`` (default: the world)."""
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
