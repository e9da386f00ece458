"""Layer 5: ``fuse_model``: BatchNorm -> activation and BatchNorm -> add -> ReLU become fused layers.

Where the model traces with ``torch.fx`` (fx_trace.trace: every batch norm, and every module
that calls one, stays a whole ``call_module``, so train/eval is read when the graph runs), the
graph is rewritten:

    y = act(bn(x))                   ->  y = fused(x)              fused = BatchNormAct*d(act)
    y = relu(bn(x) + identity)       ->  y = fused(x, identity)    (either operand order; +=)

``act`` is a module (``nn.ReLU``, ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.Hardswish``,
``nn.ELU(alpha=1)``, in-place or not, shared by several call sites or not: each call site is
its own node) or the functions ``F.relu``/``torch.relu``/``F.silu``/... A BatchNorm is fused
only when its output feeds nothing else, and only if the module is called once. Every other
BatchNorm becomes triton_bn's (as ``convert_model``).

Layers: torch's BatchNorm1d/2d/3d and SyncBatchNorm (-> BatchNormAct*d, SyncBatchNormAct),
triton_bn's own, and timm's BatchNormAct2d / SyncBatchNormAct: their own activation is fused
(timm_layers.parts), and one without activation or drop joins the patterns above. Other
subclasses of torch's batch norm, and timm layers the kernels cannot compute, are left as
they are, each with a note in the summary. Each fused layer keeps where it came from
(``_origin`` or its class) for ``revert_model``. The result is a ``GraphModule`` whose
layers share the original's parameters and buffers (an optimizer built on either updates
both); the original model is left as it was.

Where tracing fails (data-dependent control flow), the model is converted in place: in every
``nn.Sequential`` an adjacent (BatchNorm, activation) pair becomes (fused, ``nn.Identity``),
and the remaining BatchNorms are converted as ``convert_model`` does.

``save="output"`` (In-Place ABN, functional.py) applies to the fused layers whose activation
is invertible (leaky_relu with a positive slope, elu; plain BatchNorm too); the others keep
save="input", and the summary says which.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .convert import convert_model, reported, triton_form
from .distributed import SyncBatchNorm, SyncBatchNormAct
from .fused_modules import BatchNormAct2d, activation_of, fused_from
from .fx_trace import BatchNormInRoot, trace
from .kernels.activation import activation_code, invertible
from .modules import _REPLACEMENTS, with_class
from .timm_layers import Unexpressible, adopted, is_timm, parts

# The plain layers fuse_model fuses: torch's exact classes and triton_bn's (no subclasses).
_PLAIN = (*_REPLACEMENTS, *_REPLACEMENTS.values())
_SYNC = (nn.SyncBatchNorm, SyncBatchNorm)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                  F.silu: "silu", F.hardswish: "hardswish", F.leaky_relu: "leaky_relu", F.elu: "elu"}
_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class FuseSummary:
    """What ``fuse_model`` did: (BatchNorm name, activation) pairs per kind, and what it left."""
    method: str = "fx"
    fused_activation: List[Tuple[str, str]] = field(default_factory=list)
    fused_residual: List[Tuple[str, str]] = field(default_factory=list)
    plain: List[str] = field(default_factory=list)
    save_output: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def counts(self) -> dict:
        return {"bn+act": len(self.fused_activation), "bn+add+act": len(self.fused_residual),
                "plain": len(self.plain)}

    def __str__(self) -> str:
        total = sum(self.counts.values())
        lines = [f"fuse_model ({self.method}): {total} BatchNorm layers: {len(self.fused_activation)} BN+activation, "
                 f"{len(self.fused_residual)} BN+add+activation, {len(self.plain)} left plain (converted)"]
        if self.save_output:
            lines.append(f"  save='output' on {len(self.save_output)} layers")
        for name, act in self.fused_activation:
            lines.append(f"  {name}: BN -> {act}")
        for name, act in self.fused_residual:
            lines.append(f"  {name}: BN -> add -> {act}")
        for name in self.plain:
            lines.append(f"  {name}: plain")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def fuse_model(model: nn.Module, *, save: str = "input", inplace: bool = False, verbose: bool = False,
               return_summary: bool = False):
    """``model`` with its BatchNorm -> activation (-> with a residual add) patterns fused.

    ``save``/``inplace``: the fused layers' memory mode (see the module docstring);
    ``verbose`` prints the summary; ``return_summary`` returns ``(model, FuseSummary)``.
    """
    if save not in ("input", "output"):
        raise ValueError(f"fuse_model: save must be 'input' or 'output', got {save!r}")
    try:
        traced, kept = trace(model)
    except BatchNormInRoot as error:  # tracing would bake its train/eval flag into the graph
        result, summary = _fuse_sequentials(model, save, inplace)
        summary.notes.append(f"{error}: tracing it would freeze its train/eval mode into the graph; "
                             f"fused adjacent nn.Sequential pairs only")
    except Exception as error:  # noqa: BLE001 - any tracing failure means: take the fallback
        result, summary = _fuse_sequentials(model, save, inplace)
        summary.notes.append(f"torch.fx could not trace the model ({type(error).__name__}: {error}); "
                             f"fused adjacent nn.Sequential pairs only")
    else:
        result, summary = _fuse_graph(traced, save, inplace)
        summary.notes += [f"{name}: kept whole, not fused: its code calls a batch norm function, and tracing "
                          f"through it would freeze its train/eval mode" for name in kept]
    return reported(result, summary, verbose, return_summary)


def _activation_of_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[Tuple[str, float]]:
    """(name, negative_slope) when ``node`` applies a fusable activation to its first argument."""
    if node.op == "call_module":
        found = activation_of(gm.get_submodule(node.target))
        return None if found is None or found[0] is None else found  # nn.Identity: nothing to fuse
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[node.target]
        slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        if name == "elu" and (node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0) != 1.0):
            return None
        return name, float(slope) if name == "leaky_relu" else 0.01
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", 0.01
    return None


def _fused_layer(bn: nn.Module, name: Optional[str], slope: float, save: str, inplace: bool) -> nn.Module:
    """The fused layer standing for ``bn`` (a plain, synchronized or timm layer, see
    ``_own_parts``) with activation ``name`` (and slope), sharing its parameters and buffers."""
    if is_timm(bn, "BatchNormAct2d", "SyncBatchNormAct"):
        cls = SyncBatchNormAct if is_timm(bn, "SyncBatchNormAct") else BatchNormAct2d
        return adopted(bn, cls, None if name is None else (name, slope), parts(bn)[1], save=save, inplace=inplace)
    if isinstance(bn, _SYNC):
        new = with_class(bn, SyncBatchNormAct)
        new._setup_fused(name, slope, save, inplace)
        return new
    return fused_from(bn, name, slope, save, inplace)


def _own_parts(bn: nn.Module):
    """(activation (name, slope) or None, drop or None) that layer ``bn`` computes itself, for
    the layers fuse_model fuses; Unexpressible (with the reason) for any other batch norm."""
    if type(bn) in _PLAIN or type(bn) in _SYNC:
        return None, None
    if is_timm(bn, "BatchNormAct2d", "SyncBatchNormAct"):
        return parts(bn)
    raise Unexpressible("a subclass of torch's batch norm: its forward may do more than batch norm")


def _install_fused(gm, target: str, bn, act, save: str, inplace: bool, summary, fused_list: list) -> None:
    """Replace BN ``target`` by its fused layer for activation ``act`` (name, slope) and record it:
    in ``fused_list`` (which pattern), and in ``summary.save_output`` when it keeps y."""
    mode = _mode(*act, save)
    _set_submodule(gm, target, _fused_layer(bn, act[0], act[1], mode, inplace and mode == "output"))
    fused_list.append((target, act[0]))
    if mode == "output":
        summary.save_output.append(target)


def _mode(name: str, slope: float, save: str) -> str:
    return save if save == "input" or invertible(activation_code(name), slope) else "input"


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _fuse_graph(gm: torch.fx.GraphModule, save: str, inplace: bool):
    summary = FuseSummary("fx")
    graph = gm.graph
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = gm.get_submodule(node.target)
        if hasattr(bn, "act_layer"):  # fused already
            continue
        try:
            own_act, drop = _own_parts(bn)
        except Unexpressible as why:
            summary.notes.append(f"{node.target}: {type(bn).__name__} left as it is: {why}")
            continue
        if own_act is not None:  # a timm layer's own activation: fused as it is, no pattern
            _install_fused(gm, node.target, bn, own_act, save, inplace, summary, summary.fused_activation)
            continue
        if drop is not None:  # its drop comes before any activation of the graph: convert only
            _set_submodule(gm, node.target, triton_form(bn)[0])
            summary.plain.append(node.target)
            continue
        users = list(node.users)
        fusable = calls[node.target] == 1 and len(users) == 1 and len(node.args) == 1 and not node.kwargs
        user = users[0] if fusable else None
        act = _activation_of_node(gm, user) if user is not None and user.args[0] is node else None
        if act is not None:  # BN -> activation
            _install_fused(gm, node.target, bn, act, save, inplace, summary, summary.fused_activation)
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            continue
        residual = _residual_pattern(gm, node, user)
        if residual is not None:  # BN -> add -> activation
            add, act_node, other, act = residual
            _install_fused(gm, node.target, bn, act, save, inplace, summary, summary.fused_residual)
            with graph.inserting_before(add):  # after the residual's producer, wherever it was
                fused = graph.call_module(node.target, (node.args[0], other))
            act_node.replace_all_uses_with(fused)
            graph.erase_node(act_node)
            graph.erase_node(add)
            graph.erase_node(node)
            continue
        mode_plain = save == "output" and fusable
        if mode_plain:  # a lone BatchNorm is invertible: In-Place ABN applies to it too
            _set_submodule(gm, node.target, _fused_layer(bn, None, 0.01, "output", inplace))
            summary.save_output.append(node.target)
        else:
            _set_submodule(gm, node.target, triton_form(bn)[0] or bn)
        summary.plain.append(node.target)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, summary


def _residual_pattern(gm, node, user):
    """(add node, activation node, the other operand, (name, slope)) for bn -> add -> act."""
    if user is None or user.op != "call_function" or user.target not in _ADDS or user.kwargs:
        return None
    if len(user.args) != 2 or len(user.users) != 1:
        return None
    a, b = user.args
    other = b if a is node else a if b is node else None
    if other is None or other is node or not isinstance(other, torch.fx.Node):
        return None
    act_node = next(iter(user.users))
    act = _activation_of_node(gm, act_node)
    if act is None or act_node.args[0] is not user:
        return None
    return user, act_node, other, act


def _fuse_sequentials(model: nn.Module, save: str, inplace: bool):
    summary = FuseSummary("nn.Sequential pairs")
    fused_names = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module._modules.items())
        for (bn_key, bn), (act_key, act_module) in zip(children, children[1:]):
            act = activation_of(act_module) if type(bn) in _PLAIN else None
            if act is None or act[0] is None:
                continue
            mode = _mode(*act, save)
            fused = fused_from(bn, act[0], act[1], mode, inplace and mode == "output")
            fused._origin = (type(bn), {"_next": act_module})  # revert_model puts it back in place
            module._modules[bn_key] = fused
            module._modules[act_key] = nn.Identity()
            full = f"{name}.{bn_key}" if name else bn_key
            fused_names.add(full)
            summary.fused_activation.append((full, act[0]))
            if mode == "output":
                summary.save_output.append(full)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in fused_names \
                and not hasattr(module, "act_layer"):
            summary.plain.append(name)
    model, converted = convert_model(model, return_summary=True)
    summary.notes += [f"{name}: {cls} left as it is: {reason}" for name, cls, reason in converted.left]
    return model, summary


__all__ = ["fuse_model", "FuseSummary"]
