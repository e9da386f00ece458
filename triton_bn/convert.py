"""Layer 5 (above modules and distributed): ``convert_model``, every batch norm of a model as
triton_bn's layer.

    torch.nn.BatchNorm1d/2d/3d                  ->  triton_bn.BatchNorm1d/2d/3d
    torch.nn.SyncBatchNorm                      ->  triton_bn.SyncBatchNorm
    timm.layers.BatchNormAct2d                  ->  triton_bn.BatchNormAct2d   (activation fused)
    timm.layers.SyncBatchNormAct                ->  triton_bn.SyncBatchNormAct
    timm.layers.FrozenBatchNormAct2d            ->  triton_bn.FrozenBatchNorm2d (activation fused)
    torchvision.ops.FrozenBatchNorm2d           ->  triton_bn.FrozenBatchNorm2d

Each new layer shares the old one's parameters, buffers, hooks and flags (and process group).
timm's layers keep their activation (fused) and their drop module (applied after it) where
timm_layers.parts says a fused layer computes exactly what they do; the others are left as
they are, and the summary (``verbose=True`` prints it, ``return_summary=True`` returns it)
says which and why. Subclasses of torch's classes other than these (user subclasses, whose
forward may differ) are left alone and listed too. revert.py undoes every conversion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch import nn

from .distributed import SyncBatchNorm, SyncBatchNormAct
from .fused_modules import BatchNormAct2d, FrozenBatchNorm2d
from .modules import _REPLACEMENTS, _TritonBatchNorm, with_class
from .timm_layers import Unexpressible, adopted, is_timm, is_torchvision_frozen, parts

__all__ = ["convert_model", "ConvertSummary", "triton_form"]


@dataclass
class ConvertSummary:
    """What ``convert_model`` did: (name, from, to) per converted layer; (name, class, reason)
    per batch norm it left as it was."""
    converted: List[Tuple[str, str, str]] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return summary_text("convert_model", "converted", self.converted, self.left)


def reported(result, summary, verbose: bool, return_summary: bool):
    """What the converters (convert_model, revert_model, fuse_model) return: ``result``, or
    ``(result, summary)`` with ``return_summary``; ``verbose`` prints the summary first."""
    if verbose:
        print(summary)
    return (result, summary) if return_summary else result


def summary_text(tool: str, verb: str, done: list, left: list) -> str:
    """The converters' summaries (convert_model, revert_model): a count line, then a line per
    layer changed ((name, from, to)) and per layer left ((name, class, reason))."""
    lines = [f"{tool}: {len(done)} layers {verb}, {len(left)} left as they were"]
    lines += [f"  {name or '(root)'}: {old} -> {new}" for name, old, new in done]
    lines += [f"  {name or '(root)'}: {cls} left: {reason}" for name, cls, reason in left]
    return "\n".join(lines)


def _describe(module: nn.Module) -> str:
    act = getattr(module, "act_layer", None)
    drop = module._modules.get("drop")
    extra = [act] if act else []
    if drop is not None:
        extra.append(f"then {type(drop).__name__}")
    return type(module).__name__ + (f"({', '.join(extra)})" if extra else "")


def triton_form(module: nn.Module) -> Tuple[Optional[nn.Module], Optional[str]]:
    """(triton_bn's layer standing for ``module``, None), or (None, why not) for a batch norm
    that stays as it is, or (None, None) for anything else (its children are looked at)."""
    cls = type(module)
    if cls in _REPLACEMENTS:
        return with_class(module, _REPLACEMENTS[cls]), None
    if cls is nn.SyncBatchNorm:
        return with_class(module, SyncBatchNorm), None
    timm_target = (BatchNormAct2d if is_timm(module, "BatchNormAct2d") else
                   SyncBatchNormAct if is_timm(module, "SyncBatchNormAct") else
                   FrozenBatchNorm2d if is_timm(module, "FrozenBatchNormAct2d") else None)
    if timm_target is not None:
        try:
            return adopted(module, timm_target, *parts(module)), None
        except Unexpressible as why:
            return None, str(why)
    if is_torchvision_frozen(module):
        return adopted(module, FrozenBatchNorm2d, None, None), None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _TritonBatchNorm):
        return None, ("a subclass of torch's batch norm: its forward may do more, and only torch's own classes "
                      "(and timm's norm-act layers) are converted")
    return None, None


def convert_model(module: nn.Module, *, verbose: bool = False, return_summary: bool = False):
    """Replace every batch norm in ``module`` (itself included) by triton_bn's layer (the table
    in the module docstring), keeping parameters, buffers, device, dtype, hooks, train/eval
    state and, for synchronized layers, the process group.

    ``triton_bn.convert_model(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model))`` thus gives
    triton_bn's SyncBatchNorm layers (torch's converter alone turns triton_bn layers back into
    torch's SyncBatchNorm); ``triton_bn.convert_sync_batchnorm(model)`` does it in one step.
    Returns the converted module (children are replaced in place; a new object where
    ``module`` itself is converted), with ``return_summary`` as ``(module, ConvertSummary)``;
    ``verbose`` prints the summary.
    """
    summary = ConvertSummary()
    return reported(_convert(module, "", summary), summary, verbose, return_summary)


def _convert(module: nn.Module, name: str, summary: ConvertSummary) -> nn.Module:
    new, reason = triton_form(module)
    if new is not None:
        summary.converted.append((name, type(module).__name__, _describe(new)))
        module = new
    elif reason is not None:
        summary.left.append((name, type(module).__name__, reason))
    for child_name, child in list(module.named_children()):
        setattr(module, child_name, _convert(child, f"{name}.{child_name}" if name else child_name, summary))
    return module
