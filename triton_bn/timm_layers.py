"""Layer 3, beside fused_modules: timm's norm-act layers and torchvision's FrozenBatchNorm2d in
triton_bn's terms, for the converters above (convert.py, distributed.py, fuse.py, revert.py).

timm builds most of its models from ``timm.layers.BatchNormAct2d`` (a ``BatchNorm2d`` subclass
computing ``act(drop(BN(x)))`` with ``act`` and ``drop`` child modules), ``SyncBatchNormAct``
and ``FrozenBatchNormAct2d``; its ``freeze_batch_norm_2d`` makes torchvision's
``FrozenBatchNorm2d`` of plain layers. Here:

    parts(layer)       (activation (name, slope) or None, drop module or None) of the fused
                       layer that computes the same, or ``Unexpressible`` with the reason
    adopted(layer, cls, act, drop)
                       the triton_bn ``cls`` sharing the layer's parameters and buffers, its
                       origin recorded for revert.py

A fused layer applies its activation in the kernel, then its ``drop`` module: timm's order is
the other one, ``act(drop(y))``. They agree when the drop multiplies by a non-negative random
mask (dropout, DropPath, DropBlock without noise) and the activation is positively
homogeneous (none, relu, leaky_relu): ``act(m * y) = m * act(y)`` for m >= 0. Other pairs
are not converted. In eval mode every drop is the identity, so the pairs only differ in training.

timm and torchvision are never imported here: a model that holds one of their layers has
imported the module defining it, so the classes are looked up in ``sys.modules``.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

from torch import nn

from .fused_modules import activation_of
from .modules import with_class

__all__ = ["Unexpressible", "timm_class", "is_timm", "is_torchvision_frozen", "parts", "adopted"]

_NORM_ACT = "timm.layers.norm_act"
_DROP = "timm.layers.drop"
_TORCHVISION_MISC = "torchvision.ops.misc"
# Activations that commute with a non-negative mask (see the module docstring).
_HOMOGENEOUS = (None, "relu", "leaky_relu")


class Unexpressible(ValueError):
    """A layer that triton_bn's fused layers cannot compute exactly; the message says why."""


def timm_class(name: str) -> Optional[type]:
    """timm's ``timm.layers.<name>`` if timm's norm-act module is loaded, else None."""
    module = sys.modules.get(_NORM_ACT)
    return getattr(module, name, None) if module is not None else None


def is_timm(layer: nn.Module, *names: str) -> bool:
    """Whether ``layer`` is exactly one of timm's classes ``names`` (not a subclass)."""
    return any(type(layer) is timm_class(name) for name in names) if sys.modules.get(_NORM_ACT) else False


def is_torchvision_frozen(layer: nn.Module) -> bool:
    """Whether ``layer`` is exactly ``torchvision.ops.FrozenBatchNorm2d``."""
    module = sys.modules.get(_TORCHVISION_MISC)
    return module is not None and type(layer) is getattr(module, "FrozenBatchNorm2d", None)


def _commutes(drop: nn.Module) -> bool:
    """A drop that multiplies by a non-negative random mask (and nothing else)."""
    if type(drop) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
        return True
    timm_drop = sys.modules.get(_DROP)
    if timm_drop is None:
        return False
    if type(drop) is getattr(timm_drop, "DropPath", None):
        return True
    return type(drop) is getattr(timm_drop, "DropBlock2d", None) and not getattr(drop, "with_noise", True)


def parts(layer: nn.Module) -> Tuple[Optional[Tuple[str, float]], Optional[nn.Module]]:
    """(activation, drop) of the fused layer computing what timm's norm-act ``layer`` does:
    activation (name, negative_slope), None for none; the drop module, None for nn.Identity.
    Raises Unexpressible when no fused layer computes it."""
    act_module = layer._modules.get("act")
    drop = layer._modules.get("drop")
    act = (None, 0.01) if act_module is None else activation_of(act_module)
    if act is None:
        raise Unexpressible(f"activation {type(act_module).__name__} has no fused kernel (the kernels compute "
                            f"relu, leaky_relu, silu, hardswish, elu with alpha=1)")
    if drop is None or type(drop) is nn.Identity:
        return (None if act[0] is None else act), None
    if act[0] not in _HOMOGENEOUS or (act[0] == "leaky_relu" and act[1] < 0):
        raise Unexpressible(f"drop {type(drop).__name__} comes before the activation {act[0]} in timm's layer, "
                            f"and the fused kernel applies the activation first; they do not commute")
    if not _commutes(drop):
        raise Unexpressible(f"drop {type(drop).__name__} is not known to be a non-negative mask, so it cannot "
                            f"move after the activation")
    return (None if act[0] is None else act), drop


def adopted(layer: nn.Module, cls: type, act: Optional[Tuple[str, float]], drop: Optional[nn.Module],
            **fused) -> nn.Module:
    """timm's (or torchvision's) ``layer`` as triton_bn's ``cls``, sharing its parameters,
    buffers, hooks and flags, with activation ``act`` and ``drop`` (a child module, or none);
    ``fused``: the rest of the fused layer's settings (save, inplace). The original class and
    its ``act``/``drop`` modules are kept in ``_origin`` for revert.py."""
    new = with_class(layer, cls)
    children = new._modules
    removed = {name: children.pop(name) for name in ("drop", "act") if name in children}
    if drop is not None:
        children["drop"] = drop
    name, slope = act if act is not None else (None, 0.01)
    if hasattr(new, "_setup_fused"):
        new._setup_fused(name, slope, fused.get("save", "input"), fused.get("inplace", False))
    else:  # FrozenBatchNorm2d: no memory modes (its backward never reads statistics of x)
        new.act_layer, new.negative_slope = name, float(slope)
        new.num_features = new.running_mean.numel()
    new._origin = (type(layer), removed)
    return new
