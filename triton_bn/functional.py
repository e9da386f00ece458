"""Layer 2b: ``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature, over the
checks (checks.py), the eager fast path (eager.py), the autograd Function (function.py) and
layer 1 (kernels/).

Every check runs before any kernel, so a bad call never leaves running statistics
half-updated (the fused arguments' too: ``check_fused``). An eager call takes eager.py's
path (its signature checked once) unless it is in place or save="output"; every other call
is checked and dispatched here.

Fused epilogue: ``batch_norm(..., activation=, negative_slope=, residual=)`` computes
y = act(BN(x) + residual) in the same kernels (kernels/activation.py).

Masked batch norm: ``batch_norm(..., mask=)`` (mask.py) takes the training statistics over the
positions a bool mask counts, in the same kernels and launches (kernels/stats.py, onchip.py,
backward.py); checked like every other argument before any kernel runs.

Memory mode ``save="output"`` (In-Place Activated BatchNorm, Rota Bulò et al., CVPR 2018): for
an invertible activation (None, "leaky_relu" with negative_slope > 0, "elu") the backward
keeps y instead of x (and the residual, when there is one) and reconstructs
x - mean = (act^-1(y) - residual - beta) / (gamma * invstd). To keep that division finite the
scale used is |gamma| + eps (eps: batch norm's eps), exactly as the paper's code does: in this
mode y = act((x - mean) * invstd * (|gamma| + eps) + beta [+ r]), which differs from torch's
BN wherever gamma < 0 (the sign is dropped) and by eps * xhat everywhere (relative eps/|gamma|);
dgamma is dL/d(|gamma| + eps) * sign(gamma) (0 at gamma = 0), through torch's abs.
``inplace=True`` (with save="output") also writes y over x's storage.

CUDA tensors run the Triton kernels; CPU tensors run them through Triton's interpreter when
``TRITON_INTERPRET=1`` and otherwise fall back to torch's own batch_norm (the fused epilogue
as torch ops).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from . import eager
from .checks import check_args, check_fused
from .composite import masked_batch_norm, torch_activation
from .eager import computes, uses_kernels  # noqa: F401 (uses_kernels: part of this module's api)
from .function import BatchNormFunction, apply_fused, functorch_active, traced
from .kernels import bn_forward_eval, bn_forward_train
from .kernels.tuning import cpu_kernels, interpreting
from .mask import check_mask


def backend(x: torch.Tensor) -> str:
    """Which path a batch norm of ``x`` takes: "triton" (a CUDA tensor: compiled kernels),
    "triton-interpreter" (a CPU tensor with TRITON_INTERPRET=1 set before triton's import:
    the same kernels, interpreted, slowly), or "torch" (anything else: torch's own batch_norm)."""
    if x.is_cuda:
        return "triton"
    if x.device.type == "cpu" and interpreting():
        return "triton-interpreter"
    if x.device.type == "cpu" and cpu_kernels():
        return "triton"
    return "torch"


def _contiguous_param(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or (t.dim() == 1 and t.is_contiguous()):
        return t
    return t.reshape(-1).contiguous()


def feature_axis(axis: int, ndim: int) -> int:
    """``axis`` in [0, ndim) for an ndim-D input; the batch axis 0 is not a feature axis."""
    if not -ndim <= axis < ndim:
        raise IndexError(f"batch_norm: axis {axis} is out of range for a {ndim}-D input "
                         f"(expected in [{-ndim}, {ndim - 1}])")
    if axis % ndim == 0:
        raise ValueError("batch_norm: axis 0 is the batch axis; the feature axis must be another one")
    return axis % ndim


def _batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                num_batches_tracked: Optional[torch.Tensor] = None,
                cumulative_average: bool = False, *, activation: Optional[str] = None,
                negative_slope: float = 0.01, residual: Optional[torch.Tensor] = None,
                save: str = "input", inplace: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """batch_norm, plus the modules' step counter: ``num_batches_tracked`` (a device tensor) is
    incremented once the arguments have passed their checks (by the statistics kernel, no
    launch of its own), and with ``cumulative_average`` (momentum=None) its reciprocal replaces
    ``momentum`` on the device, with no host sync."""
    if mask is not None:
        mask = check_mask(input, mask)
        if not training:
            mask = None  # eval normalizes with the running statistics: the mask changes nothing
    if (mask is None and save == "input" and not inplace and type(negative_slope) is float
            and (activation is None or type(activation) is str)):  # hashable: the signature holds them
        y = eager.run(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                      cumulative_average, activation, negative_slope, residual)
        if y is not None:  # eager, its signature checked: launched from its recordings
            return y
    code = check_fused(input, activation, negative_slope, residual, save, inplace)
    save_output = save == "output"
    if not computes(input):
        # Nothing to compute (torch's own semantics for empty and 1-D input: no statistics
        # update, a differentiable empty output), or no Triton backend for this device.
        # The fused epilogue as torch ops; inplace has no effect on this path.
        if mask is not None:  # F.batch_norm checks its own arguments; the composition, here, first
            check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, check_count=False)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if cumulative_average:
                momentum = 1.0 / float(num_batches_tracked)
        if save_output and weight is not None:
            weight = weight.abs() + eps
        if mask is not None:
            y = masked_batch_norm(input, mask, running_mean, running_var, weight, bias, training, momentum, eps)
        else:
            y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if residual is not None:
            y = y + residual
        return torch_activation(y, code, negative_slope)
    # Masked: a channel may count 0 or 1 positions, known only on the device (mask.py's rules).
    check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, check_count=mask is None)
    if not training:
        num_batches_tracked = None  # the statistics kernel counts the step; eval is no step
        # Read only: any strides become the [C] vectors the kernels index.
        running_mean, running_var = _contiguous_param(running_mean), _contiguous_param(running_var)
    weight, bias = _contiguous_param(weight), _contiguous_param(bias)
    if save_output and weight is not None:
        weight = weight.abs() + eps  # the paper's guard: the backward divides by it (module docstring)
    # The statistics kernel increments the counter (once the arguments have passed their
    # checks: no launch before); momentum=None tells it to use 1 / counter (cumulative).
    momentum = None if cumulative_average and num_batches_tracked is not None else float(momentum)
    eps, negative_slope = float(eps), float(negative_slope)
    args = (input, weight, bias, running_mean, running_var, training, momentum, eps, num_batches_tracked, residual,
            code, negative_slope, save_output, inplace, mask)
    if traced(input) or functorch_active():
        if inplace:  # traced: the out-of-place op, then a copy (save="output" keeps y, not x)
            return input.copy_(BatchNormFunction.apply(*args[:-2], False, mask)[0])
        return BatchNormFunction.apply(*args)[0]
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        return apply_fused(*args)[0]
    # Nothing to differentiate: no autograd node at all.
    fused = dict(activation=code, negative_slope=negative_slope, residual=residual, out=input if inplace else None)
    if training:
        return bn_forward_train(input, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked,
                                mask=mask, **fused)[0]
    return bn_forward_eval(input, weight, bias, running_mean, running_var, eps, **fused)


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1,
               activation: Optional[str] = None, negative_slope: float = 0.01,
               residual: Optional[torch.Tensor] = None, save: str = "input", inplace: bool = False,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` computed by the Triton kernels.

    Same arguments, semantics and errors: batch statistics when ``training`` (running
    statistics, if given, updated in place with ``momentum``), running statistics otherwise.

    ``axis`` (keyword only; default 1 as in torch) names the feature axis; the statistics
    run over every other axis. ``axis=-1`` on a contiguous (N, ..., C) tensor is the
    channels-last case: the kernels read it in place, with no transpose or copy.

    Fused epilogue (keyword only): ``y = act(BN(x) + residual)``, ``activation`` one of None,
    "relu", "leaky_relu" (``negative_slope``), "silu", "hardswish", "elu"; ``residual`` a tensor
    of the input's shape, device and dtype (any strides), which gets its own gradient.
    ``save="output"``: the backward keeps y instead of x (invertible activations only; the
    scale becomes |weight| + eps, see the module docstring); ``inplace=True`` (needs
    save="output") writes y over the input's storage and returns it.

    ``mask`` (keyword only; masked batch norm, mask.py): a bool tensor of the input's shape
    without the feature axis (or broadcastable to it), True where a position counts. In
    training the statistics and the running update are over the counted positions only; the
    output is computed at every position. In eval it changes nothing.
    """
    if axis == 1 or input.dim() < 2:
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None, False,
                           activation=activation, negative_slope=negative_slope, residual=residual, save=save,
                           inplace=inplace, mask=mask)
    axis = feature_axis(axis, input.dim())
    # movedim is a view: the kernels see the features as dim 1 with whatever stride they have.
    if residual is not None and residual.dim() == input.dim():
        residual = residual.movedim(axis, 1)
    # The mask's dims are the input's without the feature axis, in order: movedim keeps them so.
    y = _batch_norm(input.movedim(axis, 1), running_mean, running_var, weight, bias, training, momentum, eps,
                    activation=activation, negative_slope=negative_slope, residual=residual, save=save,
                    inplace=inplace, mask=mask)
    return y.movedim(1, axis)
