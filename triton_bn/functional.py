"""Layer 2: argument checks, the autograd Function, and ``batch_norm`` with
``torch.nn.functional.batch_norm``'s signature.

Every check runs before any kernel, so a bad call never leaves running statistics
half-updated. CUDA tensors run the Triton kernels; CPU tensors run them through Triton's
interpreter when ``TRITON_INTERPRET=1`` and otherwise fall back to torch's own batch_norm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .kernels import bn_backward, bn_forward_eval, bn_forward_train
from .kernels.tuning import cpu_kernels, interpreting

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether ``x`` runs through the Triton kernels (vs. torch's fallback)."""
    return x.is_cuda or (x.device.type == "cpu" and cpu_kernels())


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


def _scalar_type_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype, as its error messages print it ('Long', 'ComplexFloat')."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, check_count=True):
    """torch's checks and messages, in torch's order: F.batch_norm's Python checks (count, eps),
    the binding's argument types, then ATen's (sizes, running statistics, dtype, devices).
    ``check_count=False`` skips "more than 1 value per channel" (SyncBatchNorm: the count that
    matters is global, on the device)."""
    if training and check_count:
        size = input.shape
        per_channel = size[0]
        for s in size[2:]:
            per_channel *= s
        if per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if momentum is None:
        raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not NoneType")
    C = input.shape[1]
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, t in params.items():
        if t is None:
            if not training and name.startswith("running"):
                raise RuntimeError(f"{name} must be defined in evaluation mode")
        elif t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_scalar_type_name(input.dtype)}'")
    for name, t in params.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on "
                               f"{t.device} and input is on {input.device}")
    dtypes = {t.dtype for t in params.values() if t is not None}
    allowed = {input.dtype, torch.float32} if input.dtype in _HALF_DTYPES else {input.dtype}
    if len(dtypes) > 1 or not dtypes <= allowed:
        got = ", ".join(f"{n}={t.dtype}" for n, t in params.items() if t is not None)
        raise RuntimeError(f"mixed dtype: batch_norm parameters and running statistics must share one "
                           f"dtype, the input's ({input.dtype})"
                           + (" or float32" if input.dtype in _HALF_DTYPES else "") + f"; got {got}")


class BatchNormFunction(torch.autograd.Function):
    """y = BN(x; weight, bias); running statistics are updated in place (training)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps,
                num_batches_tracked):
        if training:
            y, mean, stat = bn_forward_train(input, weight, bias, running_mean, running_var,
                                             momentum, eps, num_batches_tracked)
        else:
            y = bn_forward_eval(input, weight, bias, running_mean, running_var, eps)
            mean, stat = running_mean, running_var
        ctx.save_for_backward(input, weight, mean, stat)
        ctx.training, ctx.eps = training, eps
        ctx.param_dtype = (weight if weight is not None else bias if bias is not None else input).dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, stat = ctx.saved_tensors
        dx, dw, db = bn_backward(grad_output, input, weight, mean, stat, ctx.eps, ctx.training,
                                 ctx.needs_input_grad[:3], param_dtype=ctx.param_dtype)
        return dx, dw, db, None, None, None, None, None, None


def _contiguous_param(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(-1).contiguous()


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
                cumulative_average: bool = False) -> torch.Tensor:
    """batch_norm, plus the modules' step counter: ``num_batches_tracked`` (a device tensor) is
    incremented once the arguments have passed their checks, and with ``cumulative_average``
    (momentum=None) its reciprocal replaces ``momentum`` on the device, with no host sync."""
    if input.dim() < 2 or input.numel() == 0 or not uses_kernels(input):
        # Nothing to compute (torch's own semantics for empty and 1-D input: no statistics
        # update, a differentiable empty output), or no Triton backend for this device.
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if cumulative_average:
                momentum = 1.0 / float(num_batches_tracked)
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    update = training and running_mean is not None and running_var is not None
    rm = _contiguous_param(running_mean) if update or not training else None
    rv = _contiguous_param(running_var) if update or not training else None
    y = BatchNormFunction.apply(input, _contiguous_param(weight), _contiguous_param(bias), rm, rv,
                                training, float(momentum), float(eps),
                                num_batches_tracked if cumulative_average else None)
    if update:
        # Non-contiguous running buffers were updated on a contiguous copy: write it back.
        for buffer, updated in ((running_mean, rm), (running_var, rv)):
            if updated.data_ptr() != buffer.data_ptr():
                buffer.copy_(updated.view_as(buffer))
    return y


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` computed by the Triton kernels.

    Same arguments, semantics and errors: batch statistics when ``training`` (running
    statistics, if given, updated in place with ``momentum``), running statistics otherwise.

    ``axis`` (keyword only; default 1 as in torch) names the feature axis; the statistics
    run over every other axis. ``axis=-1`` on a contiguous (N, ..., C) tensor is the
    channels-last case: the kernels read it in place, with no transpose or copy.
    """
    if axis == 1 or input.dim() < 2:
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    axis = feature_axis(axis, input.dim())
    # movedim is a view: the kernels see the features as dim 1 with whatever stride they have.
    y = _batch_norm(input.movedim(axis, 1), running_mean, running_var, weight, bias, training, momentum, eps)
    return y.movedim(1, axis)
