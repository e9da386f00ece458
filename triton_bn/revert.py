"""Layer 5 (above modules and distributed): ``revert_model``, every triton_bn layer back to the
torch module it stands for (timm's or torchvision's, where convert_model took it from there),
for deployment and tools that know torch's classes only.

    BatchNorm1d/2d/3d, SyncBatchNorm       ->  torch.nn's class
    BatchNormAct*d, SyncBatchNormAct       ->  from timm (convert_model): timm's BatchNormAct2d /
                                               SyncBatchNormAct, its ``act`` and ``drop`` back
                                           ->  in a GraphModule (fuse_model): torch's BatchNorm*d /
                                               SyncBatchNorm node, then ``+ residual`` and the
                                               activation as nodes (F.relu, F.silu, ...)
                                           ->  in an nn.Sequential (fuse_model's fallback): torch's
                                               BatchNorm*d, its activation module back in place of
                                               the nn.Identity that stood in for it
    FrozenBatchNorm2d                      ->  timm's FrozenBatchNormAct2d or torchvision's
                                               FrozenBatchNorm2d, where it came from one

The reverted layers share the triton_bn layers' parameters, buffers, hooks and train/eval flag
(an optimizer holding them keeps working). Layers with no such place are left as they are and
listed in the summary with the reason: a BatchNormAct*d built directly (its call sites may pass
a residual, which no torch module takes), a FrozenBatchNorm2d built by ``from_batchnorm`` or
``freeze_batch_norm`` (torch has no frozen batch norm). Their exports still need no Triton:
decompose.py turns their ops into aten ones.

A layer fused with save="output" computes with |weight| + eps as its scale (In-Place ABN,
functional.py); the reverted layer computes torch's batch norm with ``weight`` itself.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch.fx
import torch.nn.functional as F
from torch import nn

from .convert import reported, summary_text
from .distributed import SyncBatchNorm, SyncBatchNormAct
from .fused_modules import FUSED_CLASSES, FrozenBatchNorm2d, _BatchNormAct
from .modules import _REPLACEMENTS, with_class

__all__ = ["revert_model", "RevertSummary"]

_TORCH_CLASS = {**{ours: theirs for theirs, ours in _REPLACEMENTS.items()},
                **{ours: theirs for theirs, ours in FUSED_CLASSES.items()},
                SyncBatchNorm: nn.SyncBatchNorm, SyncBatchNormAct: nn.SyncBatchNorm}
_FUSED_ATTRIBUTES = ("act_layer", "negative_slope", "save", "inplace", "_origin")
_ACT_FUNCTIONS = {"relu": F.relu, "silu": F.silu, "hardswish": F.hardswish, "elu": F.elu}


@dataclass
class RevertSummary:
    """What ``revert_model`` did: (name, from, to) per reverted layer, (name, class, reason) per
    triton_bn layer it left."""
    reverted: List[Tuple[str, str, str]] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return summary_text("revert_model", "reverted", self.reverted, self.left)


def _is_ours(module: nn.Module) -> bool:
    return type(module) in _TORCH_CLASS or type(module) is FrozenBatchNorm2d


def _base(layer: nn.Module) -> Tuple[Optional[nn.Module], bool]:
    """(the module computing ``layer``'s batch norm, and its activation where the origin held one
    (timm's)), or (None, False) where nothing stands for it; the bool: the activation is inside."""
    origin = getattr(layer, "_origin", None)
    cls = origin[0] if origin is not None else _TORCH_CLASS.get(type(layer))
    if cls is None:
        return None, False
    new = with_class(layer, cls)
    for name in _FUSED_ATTRIBUTES:
        new.__dict__.pop(name, None)
    modules = new._modules
    modules.pop("drop", None)
    extras = {} if origin is None else {k: m for k, m in origin[1].items() if k != "_next"}
    modules.update(extras)
    inner = extras.get("act") is not None and type(extras["act"]) is not nn.Identity
    return new, inner


def _activation_node(graph: torch.fx.Graph, y, name: str, slope: float):
    if name == "leaky_relu":
        return graph.call_function(F.leaky_relu, (y, slope))
    return graph.call_function(_ACT_FUNCTIONS[name], (y,))


def _revert_graph(gm: torch.fx.GraphModule, prefix: str, summary: RevertSummary) -> None:
    """Each call of a triton_bn layer in ``gm``'s graph: the torch layer's call, then the
    residual add and activation the fused layer computed, as nodes."""
    graph, bases = gm.graph, {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        if node.target not in bases:  # once per layer, however many call sites
            layer = gm.get_submodule(node.target)
            bases[node.target] = (layer, *_base(layer)) if _is_ours(layer) else None
        if bases[node.target] is None:
            continue
        layer, base, inner = bases[node.target]
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        if base is None or (inner and residual is not None):
            bases[node.target] = None  # left: the walk over the modules reports it
            continue
        act = None if inner else layer.__dict__.get("act_layer")  # an activation the origin did not hold
        if residual is not None or act is not None:
            with graph.inserting_before(node):
                y = graph.call_module(node.target, (node.args[0],))
                if residual is not None:
                    y = graph.call_function(operator.add, (y, residual))
                if act is not None:
                    y = _activation_node(graph, y, act, layer.negative_slope)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
        name = f"{prefix}.{node.target}" if prefix else node.target
        summary.reverted.append((name, type(layer).__name__, type(base).__name__ + (f" + {act}" if act else "")))
    for target, entry in bases.items():
        if entry is not None:
            _set(gm, target, entry[1])
    graph.lint()
    gm.recompile()


def _set(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _reverted(module: nn.Module, name: str, summary: RevertSummary) -> nn.Module:
    """``module`` as a torch module where it is a triton_bn layer that needs no call site change:
    a plain layer, or a fused / frozen one whose origin computes its activation itself."""
    if not _is_ours(module):
        return module
    fused = isinstance(module, (_BatchNormAct, SyncBatchNormAct, FrozenBatchNorm2d))
    origin = getattr(module, "_origin", None)
    base, inner = _base(module) if not fused or (origin is not None and "_next" not in origin[1]) else (None, False)
    if base is not None and (not fused or inner or getattr(module, "act_layer", None) is None):
        summary.reverted.append((name, type(module).__name__, type(base).__name__))
        return base
    if type(module) is FrozenBatchNorm2d:
        why = "torch has no frozen batch norm (it was made by from_batchnorm or freeze_batch_norm)"
    elif origin is None:
        why = ("built directly: its forward(x, residual) computes act(BN(x) + residual), which no torch module "
               "does, and its call sites are not in a graph")
    else:
        why = "its activation came from outside the layer, and its call site is not in a graph"
    summary.left.append((name, type(module).__name__, why))
    return module


def _revert_sequential_pairs(seq: nn.Sequential, prefix: str, summary: RevertSummary) -> None:
    """fuse_model's fallback pairs: (fused, nn.Identity) back to (BatchNorm, activation)."""
    keys = list(seq._modules)
    for bn_key, act_key in zip(keys, keys[1:]):
        layer, identity = seq._modules[bn_key], seq._modules[act_key]
        origin = getattr(layer, "_origin", None)
        if origin is None or "_next" not in origin[1] or type(identity) is not nn.Identity:
            continue
        base, _ = _base(layer)
        seq._modules[bn_key] = base
        seq._modules[act_key] = origin[1]["_next"]
        summary.reverted.append((f"{prefix}.{bn_key}" if prefix else bn_key, type(layer).__name__,
                                 f"{type(base).__name__}, {type(origin[1]['_next']).__name__}"))


def revert_model(module: nn.Module, *, verbose: bool = False, return_summary: bool = False):
    """Every triton_bn layer in ``module`` (itself included) as the torch (timm, torchvision)
    module it stands for (module docstring), sharing its parameters and buffers; a fused
    GraphModule becomes a GraphModule of torch's layers and ops computing the same. Changes
    ``module`` in place and returns it (a new object where ``module`` itself is a layer); with
    ``return_summary`` as ``(module, RevertSummary)``; ``verbose`` prints the summary."""
    summary = RevertSummary()
    return reported(_revert(module, "", summary), summary, verbose, return_summary)


def _revert(module: nn.Module, name: str, summary: RevertSummary) -> nn.Module:
    if isinstance(module, torch.fx.GraphModule):
        _revert_graph(module, name, summary)
    if isinstance(module, nn.Sequential):
        _revert_sequential_pairs(module, name, summary)
    module = _reverted(module, name, summary)
    for child_name, child in list(module.named_children()):
        setattr(module, child_name, _revert(child, f"{name}.{child_name}" if name else child_name, summary))
    return module
