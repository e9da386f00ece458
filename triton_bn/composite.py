"""Layer 2b helper: batch norm's gradients as a composition of torch ops, for double backward.

The kernels' backward is a fused first-order formula; it is not itself differentiable. When
autograd asks for a differentiable gradient (``create_graph=True``: gradient penalties such
as WGAN-GP's, Hessian-vector products, ``torch.func`` nested transforms), BatchNormFunction's
backward calls ``composite_grads`` instead: it recomputes y from x with torch ops (batch
statistics in training, the running statistics as constants in eval) and differentiates that
with ``create_graph=True``. Every op in it is differentiable, so any order works.

Cost: one extra forward and backward of torch's unfused ops (about 10 elementwise and
reduction kernels, roughly 3-4x the fused kernels' time), paid only when a graph of the
gradient is requested. Accumulation is in float32 for half inputs (float64 for double), as in
the kernels.

Fused calls (activation, residual) compose the same way: y = act(BN(x) + r) with torch's own
activation ops (``torch_activation``), differentiated for x, weight, bias and r.

Masked calls (mask.py) too: ``masked_moments`` are the statistics over the counted positions
with Keras 3's no-NaN division, and ``masked_batch_norm`` is the whole masked forward in torch
ops: functional.py's fallback where no kernels run, and the perf harness's torch baseline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def torch_activation(z: torch.Tensor, activation: int, negative_slope: float = 0.01) -> torch.Tensor:
    """act(z) with torch ops, for an activation code of kernels/activation.py."""
    if activation == 0:
        return z
    if activation == 1:
        return F.relu(z)
    if activation == 2:
        return F.leaky_relu(z, negative_slope)
    if activation == 3:
        return F.silu(z)
    if activation == 4:
        return F.hardswish(z)
    if activation == 5:
        return F.elu(z)
    raise ValueError(f"unknown activation code {activation}")


def masked_moments(x: torch.Tensor, mask: torch.Tensor):
    """(mean, biased var, count M) per channel, each of shape [1, C, 1, ...], over the positions
    ``mask`` (bool (N, *spatial)) counts: torch ops, differentiable, in x's dtype. M = 0 gives
    mean 0 and var 0 (Keras 3's divide_no_nan); uncounted values (NaN padding too) never enter."""
    counted = mask.unsqueeze(1)
    dims = [0] + list(range(2, x.dim()))
    count = counted.expand_as(x).sum(dims, keepdim=True).to(x.dtype)
    safe = count.clamp(min=1)
    mean = torch.where(counted, x, 0).sum(dims, keepdim=True) / safe
    var = torch.where(counted, (x - mean) ** 2, 0).sum(dims, keepdim=True) / safe
    return mean, var, count


def masked_batch_norm(x: torch.Tensor, mask: torch.Tensor, running_mean: Optional[torch.Tensor],
                      running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], training: bool, momentum: float, eps: float) -> torch.Tensor:
    """A masked batch norm in torch ops (the semantics of mask.py), differentiable; the running
    statistics (if any) move in place in training, by ``momentum``, with the unbiased variance
    var * M / (M - 1) (0 where M <= 1). Accumulates in float32 for half inputs."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    xf = x.to(acc)
    if training:
        mean, var, count = masked_moments(xf, mask)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = torch.where(count > 1, var * count / (count - 1).clamp(min=1), 0)
                running_mean.mul_(1 - momentum).add_(mean.reshape(-1).to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.reshape(-1).to(running_var.dtype), alpha=momentum)
    else:
        mean, var = running_mean.to(acc).reshape(shape), running_var.to(acc).reshape(shape)
    return _normalized(xf, mean, var, eps, weight, bias).to(x.dtype)


def _normalized(xf, mean, var, eps, weight, bias):
    """(x - mean) / sqrt(var + eps) * weight + bias in x's (accumulation) dtype, per channel."""
    shape = [1, xf.shape[1]] + [1] * (xf.dim() - 2)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(xf.dtype).reshape(shape)
    return y


def composite_grads(grad_output: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], mean: torch.Tensor, stat: torch.Tensor, training: bool,
                    eps: float, needs: Sequence[bool], activation: int = 0, negative_slope: float = 0.01,
                    residual: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
    """(dx, dweight, dbias[, dresidual]) with autograd graphs attached, None where not needed
    (dresidual when ``needs`` has a 4th entry).

    ``mean``/``stat`` are the running mean/variance in eval mode (constants); in training the
    statistics are recomputed from x (over ``mask``'s positions, when given) so that their
    dependence on x is differentiated too.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    with torch.enable_grad():
        xf = x.to(acc)
        if training and mask is not None:
            mu, var, _ = masked_moments(xf, mask)
        elif training:
            var, mu = torch.var_mean(xf, dims, correction=0, keepdim=True)
        else:
            var, mu = stat.to(acc).reshape(shape), mean.to(acc).reshape(shape)
        y = _normalized(xf, mu, var, eps, weight, bias)
        if residual is not None:
            y = y + residual.to(acc)
        y = torch_activation(y, activation, negative_slope)
        inputs = (x, weight, bias, residual)[:len(needs)]
        wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
        grads = iter(torch.autograd.grad(y, wanted, grad_output.to(acc), create_graph=True))
    return tuple(next(grads).to(t.dtype) if need and t is not None else None
                 for t, need in zip(inputs, needs))
