"""Layer 5 helper of fuse.py: ``torch.fx`` tracing that never traces through a batch norm.

``torch.fx.symbolic_trace`` keeps only ``torch.nn``'s own modules whole and traces through
every other one. Tracing through a batch norm runs its Python once: ``if self.training``
takes the branch of the moment, and the graph calls ``F.batch_norm(..., training=True)``
with the flag baked in. After ``.eval()`` such a graph still normalizes with batch
statistics and keeps moving the running statistics, with no error. timm's
``BatchNormAct2d`` (a ``BatchNorm2d`` subclass outside ``torch.nn``) is exactly that case.

``trace`` therefore keeps whole (a ``call_module`` node, which reads the flag when it runs):

    every ``torch.nn.modules.batchnorm._BatchNorm`` (subclasses included), and
    every module whose traced code called a batch norm function (``F.batch_norm``,
    ``torch.batch_norm``, triton_bn's): found after a trace, then traced again with it whole.

A batch norm called by the traced root itself cannot be kept whole: ``trace`` raises
``BatchNormInRoot`` and fuse_model leaves the model untraced.
"""
from __future__ import annotations

from typing import List, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import functional

__all__ = ["BatchNormInRoot", "trace"]

# The functions that, traced, bake a module's train/eval flag into the graph.
_BATCH_NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm, torch.native_batch_norm, functional.batch_norm,
                         functional._batch_norm}


class BatchNormInRoot(RuntimeError):
    """The traced root module calls a batch norm function itself."""


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaves: Set[int]):
        super().__init__()
        self.leaves = leaves  # ids of modules to keep whole

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return (isinstance(module, nn.modules.batchnorm._BatchNorm) or id(module) in self.leaves
                or super().is_leaf_module(module, qualname))


def trace(model: nn.Module) -> Tuple[torch.fx.GraphModule, List[str]]:
    """``torch.fx.symbolic_trace(model)`` with every batch norm kept whole (module docstring),
    and the names of the modules kept whole because their code calls a batch norm function."""
    leaves: Set[int] = set()
    while True:
        tracer = _Tracer(leaves)
        graph = tracer.trace(model)
        owners = set()
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
                stack = node.meta.get("nn_module_stack") or {}
                if not stack:
                    raise BatchNormInRoot(f"{type(model).__name__}.forward calls {node.target.__name__} itself")
                owners.add(id(model.get_submodule(next(reversed(stack)))))
        if not owners - leaves:
            kept = [name for name, module in model.named_modules() if id(module) in leaves]
            return torch.fx.GraphModule(tracer.root, graph, type(model).__name__), kept
        leaves |= owners
