"""Layer 3: ``BatchNorm1d/2d/3d`` as subclasses of torch.nn's own classes, and ``convert_model``.

Subclassing keeps everything a model relies on — constructor, parameters, buffers,
state_dict keys, ``reset_parameters``, ``_check_input_dim``, ``isinstance`` — and only the
forward changes, to the Triton kernels. momentum=None (cumulative moving average) reads
``num_batches_tracked`` on the device, so the forward never synchronizes with the host.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import _batch_norm


class _TritonBatchNorm:
    """The forward shared by the BatchNorm*d classes; the rest comes from torch.nn."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        # The step counter moves only once the arguments have passed their checks.
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        # Batch statistics in training, and in eval when no running statistics exist.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight, self.bias, bn_training, momentum, self.eps,
            num_batches_tracked=self.num_batches_tracked if counting else None,
            cumulative_average=self.momentum is None,
        )


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: (N, C) or (N, C, L) input."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: (N, C, H, W) input, NCHW or channels_last."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: (N, C, D, H, W) input, NCDHW or channels_last_3d."""


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _converted(module: nn.Module) -> nn.Module:
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is None:
        return module
    new = replacement.__new__(replacement)
    # Share the very same parameters and buffers (optimizers holding them keep working);
    # copy the containers so the two modules don't alias each other's dicts.
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


def convert_model(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` (itself included) by the
    triton_bn class, keeping parameters, buffers, device, dtype, hooks and train/eval state.

    Other subclasses (``SyncBatchNorm``, user subclasses, lazy modules) are left alone.
    Returns the converted module; children are replaced in place.
    """
    root = _converted(module)
    for name, child in list(root.named_children()):
        setattr(root, name, convert_model(child))
    return root
