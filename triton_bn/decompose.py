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
which traces with it) records only torch's own ops and cannot see into Triton launches: while
it traces, batch_norm takes functional.py's torch-ops path (eager.computes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._C import DispatchKey

from .composite import torch_activation
from . import ops  # noqa: F401  (the ops must be registered before their decompositions)

__all__ = ["forward_eval_aten"]


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
