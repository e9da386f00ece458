"""Layer 2b: argument checks, the autograd Function, and ``batch_norm`` with
``torch.nn.functional.batch_norm``'s signature (over layer 2a, ops.py, and layer 1, kernels/).

Every check runs before any kernel, so a bad call never leaves running statistics
half-updated (the fused arguments' too: ``_check_fused``).

Fused epilogue: ``batch_norm(..., activation=, negative_slope=, residual=)`` computes
y = act(BN(x) + residual) in the same kernels (kernels/activation.py).

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
from . import ops
from .composite import composite_grads, torch_activation
from .kernels import activation_code, bn_backward, bn_forward_eval, bn_forward_train, invertible
from .kernels.activation import LEAKY_RELU
from .kernels.tuning import cpu_kernels, interpreting

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether ``x`` runs through the Triton kernels (vs. torch's fallback)."""
    return x.is_cuda or (cpu_kernels() and x.is_cpu)


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


_SAVE_MODES = ("input", "output")


def _check_fused(input, activation, negative_slope, residual, save, inplace) -> int:
    """The fused arguments' checks (before any kernel, as _check_args); returns the activation code."""
    code = activation_code(activation)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"batch_norm: negative_slope must be a float, got {type(negative_slope).__name__}")
    if save not in _SAVE_MODES:
        raise ValueError(f"batch_norm: save must be 'input' or 'output', got {save!r}")
    if save == "output" and not invertible(code, negative_slope):
        raise ValueError(f"batch_norm: save='output' needs an invertible activation (None, 'leaky_relu' with "
                         f"negative_slope > 0, 'elu'); got activation={activation!r}"
                         + (f" with negative_slope={negative_slope}" if code == LEAKY_RELU else ""))
    if inplace and save != "output":
        raise ValueError("batch_norm: inplace=True overwrites the input, so the backward cannot read it: "
                         "it needs save='output'")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"batch_norm: residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise RuntimeError(f"batch_norm: residual must have the input's shape {tuple(input.shape)}, "
                               f"got {tuple(residual.shape)}")
        if residual.device != input.device:
            raise RuntimeError(f"batch_norm: residual must be on the input's device ({input.device}), "
                               f"got {residual.device}")
        if residual.dtype != input.dtype:
            raise RuntimeError(f"batch_norm: residual must have the input's dtype ({input.dtype}), "
                               f"got {residual.dtype}")
        if inplace and (residual is input or (not torch.compiler.is_compiling()  # dynamo: no storage pointers
                                              and residual.untyped_storage().data_ptr()
                                              == input.untyped_storage().data_ptr())):
            raise ValueError("batch_norm: inplace=True with a residual that shares the input's storage "
                             "(the backward needs the residual)")
    if inplace and input.requires_grad and input.is_leaf and torch.is_grad_enabled():
        raise RuntimeError("batch_norm(inplace=True): a leaf Variable that requires grad is being used in an "
                           "in-place operation; pass inplace=False, or an input that is not a leaf")
    return code


def _traced(x: torch.Tensor) -> bool:
    """Whether this call is being traced (torch.compile, torch.export, make_fx, a fake or other
    tensor subclass, a dispatch mode): then it must go through the registered ops, which
    tracers see as one op with declared mutations. Eager calls skip the dispatcher and call
    the same launchers directly (the dispatcher round trip costs more host time than a launch)."""
    return (type(x) is not torch.Tensor or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0)


class BatchNormFunction(torch.autograd.Function):
    """(y, save_mean, save_invstd) = act(BN(x; weight, bias) + residual); running statistics
    updated in place (training). In eval mode the second and third outputs are empty: the
    backward reads the running statistics. setup_context makes it usable under torch.func
    transforms. ``save_output``: the backward keeps y, not x (In-Place ABN; weight > 0);
    ``inplace``: y is written over x (x is marked dirty and returned)."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps, num_batches_tracked,
                residual=None, activation=0, negative_slope=0.01, save_output=False, inplace=False):
        fused = dict(activation=activation, negative_slope=negative_slope, residual=residual)
        traced = _traced(input)  # traced calls never come here with inplace (see _batch_norm)
        out = input if inplace else None
        if training:
            if traced:
                y, mean, invstd = ops.forward_train(input, weight, bias, running_mean, running_var,
                                                    num_batches_tracked, momentum, eps, activation, negative_slope,
                                                    residual)
            else:
                y, mean, invstd = bn_forward_train(input, weight, bias, running_mean, running_var, momentum, eps,
                                                   num_batches_tracked, out=out, **fused)
        else:
            if traced:
                y = ops.forward_eval(input, weight, bias, running_mean, running_var, eps, activation, negative_slope,
                                     residual)
            else:
                y = bn_forward_eval(input, weight, bias, running_mean, running_var, eps, out=out, **fused)
            mean, invstd = input.new_empty((0,)), input.new_empty((0,))
        return y, mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, weight, bias, running_mean, running_var, training, momentum, eps, _, residual, activation,
         negative_slope, save_output, inplace) = inputs
        y, mean, stat = output
        if not training:
            mean, stat = running_mean, running_var
        # The residual is read back only where z needs it: an activation, or x rebuilt from y.
        keep_residual = residual if (activation != 0 or save_output) else None
        ctx.save_for_backward(y if save_output else input, weight, bias, mean, stat, keep_residual)
        if inplace:
            ctx.mark_dirty(input)
        ctx.mark_non_differentiable(mean, stat)
        ctx.training, ctx.eps = training, eps
        ctx.activation, ctx.negative_slope, ctx.save_output = activation, negative_slope, save_output
        ctx.param_dtype = (weight if weight is not None else bias if bias is not None else input).dtype

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_stat):
        saved, weight, bias, mean, stat, residual = ctx.saved_tensors
        n = ctx.needs_input_grad
        dx, dw, db, dr = _gradients(ctx, grad_output, saved, weight, bias, mean, stat, (n[0], n[1], n[2], n[9]),
                                    residual, ctx.activation, ctx.negative_slope, ctx.save_output)
        return dx, dw, db, None, None, None, None, None, None, dr, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            "triton_bn.batch_norm has no torch.vmap rule (its kernels normalize one batch per call); "
            "under vmap use torch.nn.functional.batch_norm, or loop over the vmapped dimension.")


def _gradients(ctx, grad_output, saved, weight, bias, mean, stat, needs, residual, activation, negative_slope,
               save_output):
    """(dx, dweight, dbias, dresidual) for both Functions, None where ``needs`` (4 flags) says so.
    ``saved`` is x (or y when ``save_output``); ``residual`` the one z needs (None otherwise)."""
    fused = dict(activation=activation, negative_slope=negative_slope, residual=residual)
    if torch.is_grad_enabled():
        # create_graph=True (double backward, gradient penalties): a differentiable
        # composition of torch ops instead of the kernels.
        if save_output:
            raise RuntimeError("triton_bn.batch_norm: double backward (create_graph=True) needs the input, "
                               "which save='output' does not keep; use save='input'")
        grads = composite_grads(grad_output, saved, weight, bias, mean, stat, ctx.training, ctx.eps,
                                needs if residual is not None else needs[:3], **fused)
        if residual is None:  # no activation: z = BN(x) + r, so dr = dy
            grads = (*grads, grad_output if needs[3] else None)
        return grads
    if _traced(grad_output):
        grads = ops.backward(grad_output, saved, weight, mean, stat, ctx.eps, ctx.training, list(needs),
                             ctx.param_dtype, bias, activation, negative_slope, residual, save_output)
        return tuple(g if need else None for g, need in zip(grads, needs))
    return bn_backward(grad_output, saved, weight, mean, stat, ctx.eps, ctx.training, needs,
                       param_dtype=ctx.param_dtype, bias=bias, from_output=save_output, **fused)


def _eager_backward(ctx, grad_output):
    """The plain (unfused) backward of _EagerBatchNormFunction."""
    input, weight, bias, mean, stat = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() or _traced(grad_output):
        dx, dw, db, _ = _gradients(ctx, grad_output, input, weight, bias, mean, stat, (*needs, False), None, 0, 0.01,
                                   False)
    else:  # the common case, with positional arguments only: the launcher's replay key is cheapest
        dx, dw, db = bn_backward(grad_output, input, weight, mean, stat, ctx.eps, ctx.training, needs, None,
                                 ctx.param_dtype)
    return dx, dw, db, None, None, None, None, None, None


class _EagerBatchNormFunction(torch.autograd.Function):
    """BatchNormFunction's eager twin, for calls outside tracers and torch.func: one output
    (the statistics are saved as intermediates instead of returned), forward(ctx, ...) with no
    setup_context, so autograd wraps one tensor and makes one Python call per direction."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, num_batches_tracked):
        if training:
            y, mean, stat = bn_forward_train(input, weight, bias, running_mean, running_var, momentum, eps,
                                             num_batches_tracked)
        else:
            y = bn_forward_eval(input, weight, bias, running_mean, running_var, eps)
            mean, stat = running_mean, running_var
        ctx.save_for_backward(input, weight, bias, mean, stat)
        ctx.training, ctx.eps = training, eps
        ctx.param_dtype = (weight if weight is not None else bias if bias is not None else input).dtype
        return y

    backward = staticmethod(_eager_backward)


# Function.apply adds Python around the C++ apply (default-argument binding with
# inspect.signature for setup_context Functions, functorch unwrapping); eager calls outside
# torch.func transforms pass every argument and go straight to the C++ apply: plain batch
# norm through the one-output twin, fused calls through BatchNormFunction itself. Tracers and
# transforms take BatchNormFunction.apply, the documented path.
_apply_eager = super(torch.autograd.Function, _EagerBatchNormFunction).apply
_apply_fused = super(torch.autograd.Function, BatchNormFunction).apply
_functorch_active = torch._C._are_functorch_transforms_active


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
                save: str = "input", inplace: bool = False) -> torch.Tensor:
    """batch_norm, plus the modules' step counter: ``num_batches_tracked`` (a device tensor) is
    incremented once the arguments have passed their checks (by the statistics kernel, no
    launch of its own), and with ``cumulative_average`` (momentum=None) its reciprocal replaces
    ``momentum`` on the device, with no host sync."""
    code = _check_fused(input, activation, negative_slope, residual, save, inplace)
    save_output = save == "output"
    if input.dim() < 2 or input.numel() == 0 or not uses_kernels(input):
        # Nothing to compute (torch's own semantics for empty and 1-D input: no statistics
        # update, a differentiable empty output), or no Triton backend for this device.
        # The fused epilogue as torch ops; inplace has no effect on this path.
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if cumulative_average:
                momentum = 1.0 / float(num_batches_tracked)
        if save_output and weight is not None:
            weight = weight.abs() + eps
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if residual is not None:
            y = y + residual
        return torch_activation(y, code, negative_slope)
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
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
            code, negative_slope, save_output, inplace)
    if _traced(input) or _functorch_active():
        if inplace:  # traced: the out-of-place op, then a copy (save="output" keeps y, not x)
            return input.copy_(BatchNormFunction.apply(*args[:-1], False)[0])
        return BatchNormFunction.apply(*args)[0]
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        if code == 0 and residual is None and not save_output and not inplace:  # plain BN: the lean twin
            return _apply_eager(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                num_batches_tracked)
        return _apply_fused(*args)[0]
    # Nothing to differentiate: no autograd node at all.
    fused = dict(activation=code, negative_slope=negative_slope, residual=residual, out=input if inplace else None)
    if training:
        return bn_forward_train(input, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked,
                                **fused)[0]
    return bn_forward_eval(input, weight, bias, running_mean, running_var, eps, **fused)


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1,
               activation: Optional[str] = None, negative_slope: float = 0.01,
               residual: Optional[torch.Tensor] = None, save: str = "input", inplace: bool = False) -> torch.Tensor:
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
    """
    fused = dict(activation=activation, negative_slope=negative_slope, residual=residual, save=save,
                 inplace=inplace)
    if axis == 1 or input.dim() < 2:
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, **fused)
    axis = feature_axis(axis, input.dim())
    # movedim is a view: the kernels see the features as dim 1 with whatever stride they have.
    if residual is not None and residual.dim() == input.dim():
        fused["residual"] = residual.movedim(axis, 1)
    y = _batch_norm(input.movedim(axis, 1), running_mean, running_var, weight, bias, training, momentum, eps,
                    **fused)
    return y.movedim(1, axis)
