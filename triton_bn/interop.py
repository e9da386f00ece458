"""Layer 3, beside the modules: their integration with torch's own tools.

``torch.ao.quantization.fuse_modules`` / ``fuse_modules_qat`` find a fuser method by the exact
tuple of module types, ``(nn.Conv2d, nn.BatchNorm2d)``, in torch's table; a subclass is not
found, so a converted model could not be fused. This module adds, once at import, an entry
for every torch entry that names a ``torch.nn.BatchNorm1d/2d/3d``, with triton_bn's class in its
place (Conv1d/2d/3d + BN, + ReLU, Linear + BatchNorm1d, BN + ReLU, ConvTranspose + BN). It
only adds entries for triton_bn's own types and never replaces one.

Each entry is torch's own fuser method, handed torch's layer class for the batch norm: a
``torch.nn.BatchNorm*d`` sharing the very same parameters, buffers and hooks. The fused
modules torch builds (``nni.ConvBn2d``, ``nni.BNReLU2d``, …) accept only torch's exact types,
and quantization maps them by exact type, so the result is exactly what fusing torch's model
gives. Eval fusion of a conv or linear layer folds the batch norm into its weights
(``fuse_conv_bn_eval``, which reads the layer's attributes and needs nothing of this); where a
fused module keeps the batch norm (``nni.BNReLU2d``, QAT's ``nni.ConvBn2d``), it runs torch's
kernels, and ``prepare_qat`` rebuilds ``nni.ConvBn*d`` as ``nniqat.ConvBn*d`` with a torch
BatchNorm of its own anyway.
"""
from torch import nn
from torch.ao.quantization import fuser_method_mappings

from .modules import _REPLACEMENTS

_TORCH_CLASS = {ours: theirs for theirs, ours in _REPLACEMENTS.items()}


def _as_torch_layer(module: nn.Module) -> nn.Module:
    """``module`` as torch's class, for a fuser method: the same parameters, buffers and hooks,
    in the very same containers. torch's fused module holds the layer itself, and
    ``fuse_known_modules`` then moves the layer's hooks onto the fused module and clears them on
    the layer: sharing the containers clears them on this stand-in too, so hooks run once."""
    cls = _TORCH_CLASS.get(type(module))
    if cls is None:
        return module
    layer = cls.__new__(cls)
    layer.__dict__.update(module.__dict__)
    return layer


def _on_torch_layers(fuser_method):
    """torch's ``fuser_method(is_qat, *modules)``, handed torch's class for triton_bn's layers."""

    def fuse(is_qat, *modules):
        return fuser_method(is_qat, *map(_as_torch_layer, modules))

    return fuse


def _register_fuser_methods(table: dict) -> None:
    """For each entry of ``table`` naming a torch BatchNorm*d, the same with triton_bn's class."""
    for types, fuser_method in list(table.items()):
        if any(t in _REPLACEMENTS for t in types):
            table.setdefault(tuple(_REPLACEMENTS.get(t, t) for t in types), _on_torch_layers(fuser_method))


_register_fuser_methods(fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD)
