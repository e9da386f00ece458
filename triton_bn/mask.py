"""Layer 2b: the ``mask`` argument of masked batch norm (issue 20): its checks and the helper
that builds one from sequence lengths (over layer 1, kernels/).

A mask is a bool tensor of the input's shape without the feature axis, or broadcastable to it:
(N, L) for an (N, C, L) input, (N, H, W) for (N, C, H, W), (N, L) for a channels-last (N, L, C)
with ``axis=-1``; True where a position counts. In training each channel's mean and variance
are over the counted positions only (M_c of them), the running statistics move by those
(unbiased by M_c / (M_c - 1)), and the output is computed at every position (Keras 3's rule):
the model masks downstream as it likes. In eval the mask changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels.view import mergeable


def lengths_to_mask(lengths: torch.Tensor, max_len: Optional[int] = None) -> torch.Tensor:
    """The (N, max_len) mask of N right-padded sequences: position t of sample n counts when
    t < lengths[n]. ``max_len`` defaults to ``lengths.max()``, which reads the lengths on the
    host (a sync when they live on a GPU): pass the padded length to stay CUDA-graph safe."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths_to_mask: lengths must be 1-D (N,), got shape {tuple(lengths.shape)}")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def check_mask(input: torch.Tensor, mask) -> torch.Tensor:
    """The mask of a batch norm of ``input`` (N, C, *spatial), checked before any kernel runs:
    a bool tensor on the input's device whose shape broadcasts to (N, *spatial) (torch's
    broadcasting rules and error). Returns it expanded to that shape, as a view when its
    spatial dims merge into one strided axis (the kernels read it in place), else one copy."""
    if input.dim() < 2:
        raise ValueError(f"batch_norm: a mask needs an input with a feature axis and positions (at least 2-D), got "
                         f"a {input.dim()}-D input")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"batch_norm: mask must be a bool Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise RuntimeError(f"batch_norm: mask must be a bool tensor (True where a position counts), got "
                           f"dtype {mask.dtype}")
    if mask.device != input.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but mask is on {mask.device} and "
                           f"input is on {input.device}")
    shape = (input.shape[0], *input.shape[2:])
    try:
        target = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError as error:
        raise RuntimeError(f"batch_norm: the mask's shape {tuple(mask.shape)} does not broadcast to the input's "
                           f"shape without the feature axis {tuple(shape)}: {error}") from None
    if tuple(target) != shape:
        raise RuntimeError(f"batch_norm: the mask's shape {tuple(mask.shape)} broadcasts to {tuple(target)}, "
                           f"not to the input's shape without the feature axis {tuple(shape)}")
    return mergeable(mask.expand(shape).unsqueeze(1)).squeeze(1)
