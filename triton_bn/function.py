"""Layer 2b: ``BatchNormFunction``, batch norm's autograd Function (over layer 2a, ops.py, and
layer 1, kernels/), and the gradients both Functions share.

Traced calls (torch.compile, torch.export, fake tensors, dispatch modes) and torch.func
transforms come here and go through the registered ops (ops.py), which tracers see as single
ops with declared mutations; eager fused calls come here too and call the launchers directly.
Plain eager calls take eager.py's leaner twin.
"""
from __future__ import annotations

import torch
from .compat import functorch_transforms_active, len_dispatch_stack  # first: it checks the versions
from . import ops
from .composite import composite_grads
from .kernels import bn_backward, bn_forward_eval, bn_forward_train

def param_dtype(weight, bias, input) -> torch.dtype:
    """The dtype of weight and bias, hence of their gradients (the input's when both are None)."""
    return (weight if weight is not None else bias if bias is not None else input).dtype


def traced(x: torch.Tensor) -> bool:
    """Whether this call is being traced (torch.compile, torch.export, make_fx, a fake or other
    tensor subclass, a dispatch mode): then it must go through the registered ops, which
    tracers see as one op with declared mutations. Eager calls skip the dispatcher and call
    the same launchers directly (the dispatcher round trip costs more host time than a launch)."""
    return (type(x) is not torch.Tensor or torch.compiler.is_compiling()
            or len_dispatch_stack() > 0)


class BatchNormFunction(torch.autograd.Function):
    """(y, save_mean, save_invstd, inv_counts) = act(BN(x; weight, bias) + residual); running
    statistics updated in place (training). In eval mode the second and third outputs are empty:
    the backward reads the running statistics. setup_context makes it usable under torch.func
    transforms. ``save_output``: the backward keeps y, not x (In-Place ABN; weight > 0);
    ``inplace``: y is written over x (x is marked dirty and returned). ``mask`` (training only,
    checked and expanded: mask.py): statistics over its positions, ``inv_counts`` 1 / their number
    per channel (kernels.bn_forward_train; empty without a mask)."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps, num_batches_tracked,
                residual=None, activation=0, negative_slope=0.01, save_output=False, inplace=False, mask=None):
        fused = dict(activation=activation, negative_slope=negative_slope, residual=residual)
        is_traced = traced(input)  # traced calls never come here with inplace (see _batch_norm)
        out = input if inplace else None
        inv_counts = input.new_empty((0,), dtype=torch.float32)
        if training:
            if is_traced:
                y, mean, invstd, inv_counts = ops.forward_train(input, weight, bias, running_mean, running_var,
                                                           num_batches_tracked, momentum, eps, activation,
                                                           negative_slope, residual, mask)
            else:
                y, mean, invstd, *counted = bn_forward_train(input, weight, bias, running_mean, running_var, momentum,
                                                             eps, num_batches_tracked, out=out, mask=mask, **fused)
                inv_counts = counted[0] if counted else inv_counts
        else:
            if is_traced:
                y = ops.forward_eval(input, weight, bias, running_mean, running_var, eps, activation, negative_slope,
                                     residual)
            else:
                y = bn_forward_eval(input, weight, bias, running_mean, running_var, eps, out=out, **fused)
            mean, invstd = input.new_empty((0,)), input.new_empty((0,))
        return y, mean, invstd, inv_counts

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, weight, bias, running_mean, running_var, training, momentum, eps, _, residual, activation,
         negative_slope, save_output, inplace, *mask) = inputs
        y, mean, stat, inv_counts = output
        mask = mask[0] if mask and training else None
        if not training:
            mean, stat = running_mean, running_var
        # The residual is read back only where z needs it: an activation, or x rebuilt from y.
        keep_residual = residual if (activation != 0 or save_output) else None
        ctx.save_for_backward(y if save_output else input, weight, bias, mean, stat, keep_residual, mask,
                              inv_counts if mask is not None else None)
        if inplace:
            ctx.mark_dirty(input)
        ctx.mark_non_differentiable(mean, stat, inv_counts)
        ctx.training, ctx.eps = training, eps
        ctx.activation, ctx.negative_slope, ctx.save_output = activation, negative_slope, save_output
        ctx.param_dtype = param_dtype(weight, bias, input)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_stat, _grad_inv_counts):
        saved, weight, bias, mean, stat, residual, mask, inv_counts = ctx.saved_tensors
        n = ctx.needs_input_grad
        dx, dw, db, dr = gradients(grad_output, saved, weight, bias, mean, stat, (n[0], n[1], n[2], n[9]),
                                   ctx.training, ctx.eps, ctx.param_dtype, residual, ctx.activation,
                                   ctx.negative_slope, ctx.save_output, mask, inv_counts)
        return dx, dw, db, None, None, None, None, None, None, dr, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            "triton_bn.batch_norm has no torch.vmap rule (its kernels normalize one batch per call); "
            "under vmap use torch.nn.functional.batch_norm, or loop over the vmapped dimension.")


def gradients(grad_output, saved, weight, bias, mean, stat, needs, training, eps, param_dtype, residual=None,
              activation=0, negative_slope=0.01, save_output=False, mask=None, inv_counts=None):
    """(dx, dweight, dbias, dresidual) for both Functions, None where ``needs`` (4 flags) says so.
    ``saved`` is x (or y when ``save_output``); ``residual`` the one z needs (None otherwise);
    ``mean``/``stat``: save_mean/save_invstd (training) or the running statistics (eval);
    ``mask``/``inv_counts``: a masked training forward's mask and 1 / M_c per channel."""
    fused = dict(activation=activation, negative_slope=negative_slope, residual=residual)
    if torch.is_grad_enabled():
        # create_graph=True (double backward, gradient penalties): a differentiable
        # composition of torch ops instead of the kernels.
        if save_output:
            raise RuntimeError("triton_bn.batch_norm: double backward (create_graph=True) needs the input, "
                               "which save='output' does not keep; use save='input'")
        grads = composite_grads(grad_output, saved, weight, bias, mean, stat, training, eps,
                                needs if residual is not None else needs[:3], mask=mask, **fused)
        if residual is None:  # no activation: z = BN(x) + r, so dr = dy
            grads = (*grads, grad_output if needs[3] else None)
        return grads
    if traced(grad_output):
        grads = ops.backward(grad_output, saved, weight, mean, stat, eps, training, list(needs), param_dtype,
                             bias, activation, negative_slope, residual, save_output, mask, inv_counts)
        return tuple(g if need else None for g, need in zip(grads, needs))
    return bn_backward(grad_output, saved, weight, mean, stat, eps, training, needs, param_dtype=param_dtype,
                       bias=bias, from_output=save_output, mask=mask, inv_counts=inv_counts, **fused)


# Function.apply adds Python around the C++ apply (default-argument binding with
# inspect.signature for setup_context Functions, functorch unwrapping): eager calls outside
# torch.func transforms pass every argument and go straight to the C++ apply.
apply_fused = super(torch.autograd.Function, BatchNormFunction).apply
functorch_active = functorch_transforms_active
