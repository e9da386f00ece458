"""triton_bn: batch normalization in Triton, a drop-in for torch.nn.BatchNorm1d/2d/3d."""
from .function import BatchNormFunction
from .functional import backend, batch_norm
from .mask import lengths_to_mask
from . import decompose  # noqa: F401  (the ops' aten decompositions: export, ONNX; decompose.py)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .fused_modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, FrozenBatchNorm2d
from .axis_norm import BatchNorm, from_keras
from .distributed import SyncBatchNorm, SyncBatchNormAct, convert_sync_batchnorm, sync_batch_norm
from .convert import ConvertSummary, convert_model
from .freeze import freeze_batch_norm
from .fuse import FuseSummary, fuse_model
from .revert import RevertSummary, revert_model
from . import interop  # noqa: F401  (torch's fuse_modules table learns triton_bn's layers)

__version__ = "0.1.0"

# Tuning files (docs/tuning.md). $TRITON_BN_TUNING is applied here, at import, so a bad file
# fails now with its TuningFileError, never inside a kernel launch.
from .tune import TuningFileError, use_tuning, use_tuning_from_env  # noqa: E402

use_tuning_from_env()

__all__ = ["batch_norm", "backend", "lengths_to_mask", "BatchNormFunction", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "convert_model", "ConvertSummary", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "FrozenBatchNorm2d",
           "freeze_batch_norm", "fuse_model", "FuseSummary", "revert_model", "RevertSummary",
           "BatchNorm", "from_keras", "SyncBatchNorm", "SyncBatchNormAct", "convert_sync_batchnorm", "sync_batch_norm",
           "use_tuning", "TuningFileError"]
