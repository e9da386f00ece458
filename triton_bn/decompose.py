"""Layer 2a, beside ops.py: what the ops compute, as standard torch (aten) ops, for the tools
that must not run Triton: ``torch.export``'s ``run_decompositions()``, the ONNX exporters,
TensorRT and AOTInductor through them.

Decompositions. ``triton_bn::forward_eval`` gets a Python CompositeImplicitAutograd kernel
(``OpOverload.py_impl``): ``aten._native_batch_norm_legit_no_training`` (what torch.export
makes of an eval ``F.batch_norm``), ``+ residual``, then the activation's aten op. Only the
Python dispatcher sees it, so eager calls never take it; export's default decomposition
table collects every such kernel of a non-mutating op, so ``ep.run_decompositions()`` and
``torch.onnx.export(..., dynamo=True)`` (which runs it) give a standard aten graph with no
table to pass. torch.compile's tracer would decompose through the same kernel, losing the
Triton kernels: the kernel therefore answers ``NotImplemented`` (keep the op) unless
``torch.compiler.is_exporting()``. ``torch.export.export`` itself keeps the op (its
pre-dispatch trace does not decompose): an exported program still runs triton_bn's kernels
until ``run_decompositions()`` is called.

``forward_train`` and ``backward`` mutate buffers or only appear in training graphs:
deployment exports eval models, so they keep no decomposition (a training-mode export keeps
the opaque ops and needs triton_bn where it runs).

``torch.jit.trace`` (and the legacy ONNX exporter, ``torch.onnx.export(..., dynamo=False)``,
which traces with it) records only torch's own ops and cannot see into Triton launches:
``jit_batch_norm`` computes a layer's forward with torch's ``F.batch_norm`` plus the fused
epilogue as torch ops, and the modules call it while ``torch.jit`` traces.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch._C import DispatchKey

from .composite import torch_activation
from .kernels.activation import activation_code
from . import ops  # noqa: F401  (the ops must be registered before their decompositions)

__all__ = ["forward_eval_aten", "jit_batch_norm", "jit_tracing"]

#: Whether torch.jit is tracing (~0.2 us, read on every module call). torch's own function, not
#: the C++ flag it reads: torch.compile folds this one to False, and cannot trace the flag.
jit_tracing = torch.jit.is_tracing


def forward_eval_aten(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, activation: int = 0,
                      negative_slope: float = 0.01, residual: Optional[torch.Tensor] = None):
    """``triton_bn::forward_eval`` as aten ops, under export; NotImplemented otherwise."""
    if not torch.compiler.is_exporting():  # torch.compile: keep the op (and its Triton kernels)
        return NotImplemented
    y = torch.ops.aten._native_batch_norm_legit_no_training.default(x, weight, bias, running_mean, running_var,
                                                                     0.0, eps)[0]
    if residual is not None:
        y = torch.ops.aten.add.Tensor(y, residual)
    return torch_activation(y, activation, negative_slope)


torch.ops.triton_bn.forward_eval.default.py_impl(DispatchKey.CompositeImplicitAutograd)(forward_eval_aten)


def jit_batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool, momentum: float,
                   eps: float, num_batches_tracked: Optional[torch.Tensor] = None, cumulative_average: bool = False,
                   *, activation: Optional[str] = None, negative_slope: float = 0.01,
                   residual: Optional[torch.Tensor] = None, save: str = "input", inplace: bool = False):
    """functional._batch_norm's arguments and result, with torch's ops only (what torch.jit.trace
    can record): the step counter and cumulative average as the modules keep them, the memory
    mode's scale (|weight| + eps for save="output"), and ``act(BN(x) + residual)``. ``inplace``
    has no effect (a trace records values)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if cumulative_average:
            momentum = 1.0 / float(num_batches_tracked)
    if save == "output" and weight is not None:
        weight = weight.abs() + eps  # the In-Place ABN scale the kernels use in this mode
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch_activation(y, activation_code(activation), negative_slope)
