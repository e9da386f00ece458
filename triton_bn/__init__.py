"""triton_bn: batch normalization in Triton, a drop-in for torch.nn.BatchNorm1d/2d/3d."""
from .functional import BatchNormFunction, batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_model
from .axis_norm import BatchNorm, from_keras
from .distributed import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm

__version__ = "0.1.0"

__all__ = ["batch_norm", "BatchNormFunction", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_model",
           "BatchNorm", "from_keras", "SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm"]
