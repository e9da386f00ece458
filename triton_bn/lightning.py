"""Layer 5, optional (imports Lightning; nothing in triton_bn imports this module): a Lightning
``LayerSync`` plugin that synchronizes batch norms with triton_bn's layers.

``Trainer(sync_batchnorm=True)`` uses Lightning's ``TorchSyncBatchNorm``: its ``apply`` is
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which turns triton_bn's layers into torch's
SyncBatchNorm (fused activations and residuals lost), and its ``revert`` makes every
SyncBatchNorm a torch ``_BatchNormXd``. ``TritonSyncBatchNorm`` instead:

    apply    every non-synchronized batch norm -> triton_bn.SyncBatchNorm, fused ones (triton_bn's
             BatchNormAct*d, timm's BatchNormAct2d) -> triton_bn.SyncBatchNormAct
             (distributed.convert_sync_batchnorm); torch's layers become triton_bn's on the way
    revert   each layer apply converted -> the triton_bn layer it was (BatchNorm2d, BatchNormAct2d,
             ... with its activation and memory mode), sharing parameters and buffers; layers
             that were synchronized before apply stay so (without a process group they run
             unsynchronized)

    trainer = Trainer(strategy="ddp", sync_batchnorm=True, plugins=[TritonSyncBatchNorm()])

It subclasses ``TorchSyncBatchNorm`` because the Trainer accepts ``sync_batchnorm=True`` with a
LayerSync plugin only of that class; ``plugins=[TritonSyncBatchNorm()]`` alone does the same.
It is built on ``lightning`` (``import lightning``), else on ``pytorch_lightning``: the two
packages' plugin classes differ, so use the Trainer of the package it names in ``BASE``.
"""
from __future__ import annotations

from torch import nn

from .convert import triton_form
from .distributed import SyncBatchNorm
from .modules import with_class

try:
    from lightning.pytorch.plugins import TorchSyncBatchNorm as _Base
    BASE = "lightning.pytorch"
except ImportError:
    try:
        from pytorch_lightning.plugins import TorchSyncBatchNorm as _Base
        BASE = "pytorch_lightning"
    except ImportError as error:
        raise ImportError("triton_bn.lightning needs Lightning: pip install lightning") from error

__all__ = ["TritonSyncBatchNorm", "BASE"]


def _synced(module: nn.Module) -> nn.Module:
    """``module`` (itself, not its children) synchronized, remembering what it was."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.SyncBatchNorm):
        return module
    local = triton_form(module)[0] or module  # torch's / timm's layer as triton_bn's
    synced = SyncBatchNorm.convert_sync_batchnorm(local)
    synced._unsynced = (type(local), getattr(local, "_origin", None))
    return synced


def _unsynced(module: nn.Module) -> nn.Module:
    record = module.__dict__.get("_unsynced")
    if record is None:
        return module
    cls, origin = record
    local = with_class(module, cls)
    for name in ("_unsynced", "process_group", "_origin"):
        local.__dict__.pop(name, None)
    if origin is not None:
        local._origin = origin
    return local


def _walk(module: nn.Module, convert) -> nn.Module:
    module = convert(module)
    for name, child in list(module.named_children()):
        setattr(module, name, _walk(child, convert))
    return module


class TritonSyncBatchNorm(_Base):
    """Lightning's LayerSync with triton_bn's synchronized layers (see the module docstring)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return _walk(model, _synced)

    def revert(self, model: nn.Module) -> nn.Module:
        return _walk(model, _unsynced)
