"""Layer 2a: the kernels as PyTorch operators (``torch.ops.triton_bn.*``).

Registered with ``torch.library.custom_op``, each with a fake (meta) implementation, so that
torch.compile, torch.export, CUDA graphs and FX see one opaque op per step, with exactly the
mutations it makes declared in its schema:

    triton_bn::forward_train(x, weight?, bias?, running_mean(a!)?, running_var(b!)?,
                             num_batches_tracked(c!)?, momentum?, eps,
                             activation=0, negative_slope=0.01, residual?=None, mask?=None)
                             -> (y, save_mean, save_invstd, inv_counts)
    triton_bn::forward_eval(x, weight?, bias?, running_mean, running_var, eps,
                            activation=0, negative_slope=0.01, residual?=None) -> y
    triton_bn::backward(dy, x, weight?, mean, stat, eps, training, output_mask, param_dtype,
                        bias?=None, activation=0, negative_slope=0.01, residual?=None,
                        from_output=False, mask?=None, inv_counts?=None)
                             -> (dx, dweight, dbias, dresidual)   (a [0] tensor where not wanted)

``mask`` (masked batch norm, mask.py: bool (N, *spatial), already checked and expanded): the
training statistics count its positions only; ``inv_counts`` is then 1 / M_c per channel as
[C, 2] float32 (hi, lo) pairs, which the forward returns (a [0] tensor without a mask) and the
backward takes back.

The fused epilogue (y = act(BN(x) + residual), activation codes of kernels/activation.py) is
part of every schema, with defaults that give plain batch norm. ``output_mask`` has 3 or 4
entries (the 4th: dresidual). ``from_output``: ``x`` is the forward's output (save="output").
In-place (``inplace=True``) is not an op: traced calls run the out-of-place op and copy.

Why ``custom_op`` and not ``triton_op`` + ``wrap_triton``: the launchers are Python that picks
a view, splits and grid per shape and chooses between kernels; ``triton_op`` would let
Inductor see (and re-schedule) the individual kernels, but it traces that Python on fake
tensors and, on the CPU, runs the kernels inside Inductor-generated code that the Triton
interpreter cannot serve. An opaque op keeps one implementation for eager, compile, export
and the interpreter; what it costs is that Inductor does not fuse into our kernels (it fuses
around them), which the fused epilogues make up for.

``num_batches_tracked`` (the step counter) is incremented by forward_train's statistics
kernel, once per call (no separate ``add_`` launch); ``momentum=None`` is torch's cumulative
average, 1 / the new count, read on the device.
Autograd is not registered on these ops (torch refuses autograd formulas on ops that mutate
their inputs); ``triton_bn.function.BatchNormFunction`` wraps them when traced; eager calls
reach the same launchers directly, skipping the dispatcher (function.py, eager.py).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernels import bn_backward, bn_forward_eval, bn_forward_train, output_for
from .kernels.stats import acc_dtype

__all__ = ["forward_train", "forward_eval", "backward"]


def _stat_vector(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("triton_bn::forward_train",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def forward_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                  activation: int = 0, negative_slope: float = 0.01, residual: Optional[Tensor] = None,
                  mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out = bn_forward_train(x, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked,
                           activation=activation, negative_slope=negative_slope, residual=residual, mask=mask)
    return out if mask is not None else (*out, _no_counts(x))


@forward_train.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, activation=0,
      negative_slope=0.01, residual=None, mask=None):
    inv_counts = x.new_empty((x.shape[1], 2), dtype=torch.float32) if mask is not None else _no_counts(x)
    return output_for(x), _stat_vector(x), _stat_vector(x), inv_counts


def _no_counts(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("triton_bn::forward_eval", mutates_args=())
def forward_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float, activation: int = 0,
                 negative_slope: float = 0.01, residual: Optional[Tensor] = None) -> Tensor:
    return bn_forward_eval(x, weight, bias, running_mean, running_var, eps, activation=activation,
                           negative_slope=negative_slope, residual=residual)


@forward_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps, activation=0, negative_slope=0.01, residual=None):
    return output_for(x)


@torch.library.custom_op("triton_bn::backward", mutates_args=())
def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, stat: Tensor, eps: float,
             training: bool, output_mask: List[bool], param_dtype: torch.dtype, bias: Optional[Tensor] = None,
             activation: int = 0, negative_slope: float = 0.01, residual: Optional[Tensor] = None,
             from_output: bool = False, mask: Optional[Tensor] = None,
             inv_counts: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(output_mask) + (False,) * (4 - len(output_mask))
    grads = bn_backward(dy, x, weight, mean, stat, eps, training, needs, param_dtype=param_dtype, bias=bias,
                        activation=activation, negative_slope=negative_slope, residual=residual,
                        from_output=from_output, mask=mask, inv_counts=inv_counts)
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@backward.register_fake
def _(dy, x, weight, mean, stat, eps, training, output_mask, param_dtype, bias=None, activation=0,
      negative_slope=0.01, residual=None, from_output=False, mask=None, inv_counts=None):
    need_dx, need_dw, need_db, need_dr = tuple(output_mask) + (False,) * (4 - len(output_mask))
    C = x.shape[1]
    # dresidual is allocated like dx (the launcher's output_for of the saved tensor).
    return (output_for(x) if need_dx else x.new_empty((0,)),
            x.new_empty((C,), dtype=param_dtype) if need_dw and weight is not None else x.new_empty((0,)),
            x.new_empty((C,), dtype=param_dtype) if need_db else x.new_empty((0,)),
            output_for(x) if need_dr else x.new_empty((0,)))
