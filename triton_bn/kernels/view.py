"""How the kernels see a tensor: a strided ``[N, Q, K]`` view with K the unit-stride axis.

A batch-norm input ``(N, C, *spatial)`` is first seen as ``[N, C, S]`` (S = product of the
spatial sizes, 1 when there are none). The kernels then pick the orientation in which the
innermost axis ``K`` is the one with unit stride, so tiles vectorize along it:

* channels-first (NCHW contiguous, ``(N, C, L)``): ``Q = C``, ``K = S``; channel = q.
* channels-last (``channels_last``, ``channels_last_3d``, 2-D ``(N, C)``): ``Q = S``,
  ``K = C``; channel = k, and the tensor is an ``[N*S, C]`` matrix.

Element ``(n, q, k)`` lives at ``n*n_stride + q*q_stride + k*k_stride``; any strides work,
only the spatial dims must merge into one axis with a single stride (otherwise the caller
copies once).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class NQKView(NamedTuple):
    tensor: torch.Tensor
    N: int
    Q: int
    K: int
    n_stride: int
    q_stride: int
    k_stride: int
    channels_last: bool

    @property
    def strides(self):
        return self.n_stride, self.q_stride, self.k_stride

    @property
    def C(self) -> int:
        return self.K if self.channels_last else self.Q

    @property
    def per_channel(self) -> int:
        """M, the number of elements of each channel."""
        return self.N * (self.Q if self.channels_last else self.K)


def _spatial_size(x: torch.Tensor) -> int:
    """S, the product of the spatial sizes (1 when there are none)."""
    S = 1
    for size in x.shape[2:]:
        S *= size
    return S


def _merged_spatial_stride(x: torch.Tensor) -> Optional[int]:
    """Stride of the merged spatial axis, or None when the spatial dims do not merge."""
    dims = [(size, stride) for size, stride in zip(x.shape[2:], x.stride()[2:]) if size != 1]
    if not dims:
        return 1
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_stride * inner_size:
            return None
    return dims[-1][1]


def choose_channels_last(x: torch.Tensor) -> Optional[bool]:
    """True/False for the orientation the kernels should use, None if x needs a copy."""
    s_stride = _merged_spatial_stride(x)
    if s_stride is None:
        return None
    C = x.shape[1]
    S = _spatial_size(x)
    c_stride = x.stride(1)
    if S == 1:
        return True  # (N, C): rows are samples, the channel axis is the only inner one
    if C == 1:
        return False
    # Vectorize along whichever of C and S has the smaller stride (unit stride in practice).
    return c_stride < s_stride


def mergeable(x: torch.Tensor) -> torch.Tensor:
    """x itself when its spatial dims merge, else one contiguous copy.

    Only exotic views (e.g. spatial dims permuted or sliced in both directions) take the copy;
    channels-first, channels-last, expanded and channel-sliced tensors never do.
    """
    return x if _merged_spatial_stride(x) is not None else x.contiguous()


def nqk_view(x: torch.Tensor, channels_last: bool) -> NQKView:
    """The [N, Q, K] view of ``x`` (N, C, *spatial, with mergeable spatial dims).

    Tensors sharing x's shape but not its strides (y, dy, dx) are viewed in the orientation
    chosen for x; any strides are correct, only the unit-stride axis is faster.
    """
    s_stride = _merged_spatial_stride(x)
    if s_stride is None:
        raise ValueError("spatial dimensions of the tensor do not merge into one strided axis")
    N, C, S = x.shape[0], x.shape[1], _spatial_size(x)
    n_stride, c_stride = x.stride(0), x.stride(1)
    if channels_last:
        return NQKView(x, N, S, C, n_stride, s_stride, c_stride, True)
    return NQKView(x, N, C, S, n_stride, c_stride, s_stride, False)


def empty_output(view: NQKView) -> torch.Tensor:
    """An uninitialized tensor of the view's shape for an output (y, dx) that the kernels can
    address: ``empty_like`` (the input's memory format) when its spatial dims merge, else a
    dense tensor in the view's orientation. empty_like of a non-dense input (expanded,
    permuted) picks strides of its own, which need not merge even where the input's do."""
    x = view.tensor
    out = torch.empty_like(x)
    if _merged_spatial_stride(out) is not None:
        return out
    if view.channels_last:
        return torch.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=x.dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def output_for(x: torch.Tensor) -> torch.Tensor:
    """The uninitialized output (y, dx) the launchers allocate for input ``x``; metadata only,
    so the ops' fake implementations use it to give the same strides."""
    x = mergeable(x)
    return empty_output(nqk_view(x, choose_channels_last(x)))
