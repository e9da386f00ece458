"""Layer 5 (above modules and distributed): ``freeze_batch_norm``, a whole model's 2-D batch
norms as ``triton_bn.FrozenBatchNorm2d`` (fixed statistics and affine), fused ones included.

timm's ``freeze_batch_norm_2d`` knows its own classes and torch's: triton_bn's fused layers
are ``BatchNorm2d`` subclasses to it, so it makes torchvision's ``FrozenBatchNorm2d`` of them,
which drops the fused activation and whose ``forward(x)`` fails where fuse_model made the call
``layer(x, residual)``. This function keeps both: each fused layer freezes with its activation
and drop, and FrozenBatchNorm2d's ``forward(x, residual=None)`` serves the residual call.

    torch's / triton_bn's BatchNorm2d, SyncBatchNorm       ->  FrozenBatchNorm2d
    triton_bn's BatchNormAct2d, SyncBatchNormAct           ->  FrozenBatchNorm2d(act_layer=its activation)
    timm's BatchNormAct2d, SyncBatchNormAct                ->  FrozenBatchNorm2d(activation, drop), or
                                                               timm's FrozenBatchNormAct2d where the
                                                               fused kernels cannot compute it
    BatchNorm1d/3d (and their fused forms)                 ->  left (no frozen layer of those ranks)

SyncBatchNorm layers are taken for 2-D ones, as timm's helper takes them.

The frozen layers hold copies of the current parameters and running statistics (as
torchvision's and timm's do); the rest of the model is changed in place.
"""
from __future__ import annotations

import sys

from torch import nn

from .distributed import SyncBatchNormAct
from .fused_modules import BatchNormAct2d, FrozenBatchNorm2d
from .timm_layers import Unexpressible, is_timm, parts, timm_class

__all__ = ["freeze_batch_norm"]


def _frozen(module: nn.Module) -> nn.Module:
    """The frozen layer standing for ``module``, or ``module`` itself."""
    if is_timm(module, "BatchNormAct2d", "SyncBatchNormAct"):
        try:
            act, drop = parts(module)
        except Unexpressible:
            return sys.modules["timm.layers.norm_act"].freeze_batch_norm_2d(module)  # timm's own frozen layer
        frozen = FrozenBatchNorm2d.from_batchnorm(module, *(act or (None, 0.01)))
        frozen._modules.pop("drop", None)  # timm's drop is always there (nn.Identity when unused)
        if drop is not None:
            frozen.drop = drop
        frozen._origin = (timm_class("FrozenBatchNormAct2d"), {n: m for n, m in module._modules.items()})
        return frozen
    if isinstance(module, (BatchNormAct2d, SyncBatchNormAct, nn.BatchNorm2d, nn.SyncBatchNorm)):
        frozen = FrozenBatchNorm2d.from_batchnorm(module)
        origin = getattr(module, "_origin", None)
        if origin is not None and origin[0] in (timm_class("BatchNormAct2d"), timm_class("SyncBatchNormAct")):
            frozen._origin = (timm_class("FrozenBatchNormAct2d"), origin[1])
        return frozen
    return module


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Every 2-D batch norm in ``module`` (itself included) as a ``FrozenBatchNorm2d`` with its
    fused activation, drop and residual call kept (the module docstring lists the classes).
    Returns the module (a new object where ``module`` itself is frozen); children are
    replaced in place."""
    root = _frozen(module)
    if root is not module:
        return root
    for name, child in list(module.named_children()):
        setattr(module, name, freeze_batch_norm(child))
    return module
