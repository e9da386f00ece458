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

import functools
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


def _spatial_size(shape) -> int:
    """S, the product of the spatial sizes of an (N, C, *spatial) shape (1 when there are none)."""
    S = 1
    for size in shape[2:]:
        S *= size
    return S


def _merged_stride(shape, stride) -> Optional[int]:
    """Stride of the merged spatial axis of (shape, stride), or None when the spatial dims do
    not merge."""
    dims = [(size, st) for size, st in zip(shape[2:], stride[2:]) if size != 1]
    if not dims:
        return 1
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_stride * inner_size:
            return None
    return dims[-1][1]


def _merged_spatial_stride(x: torch.Tensor) -> Optional[int]:
    return _merged_stride(x.shape, x.stride())


def _orientation(shape, stride, s_stride: int) -> bool:
    if _spatial_size(shape) == 1:
        return True  # (N, C): rows are samples, the channel axis is the only inner one
    if shape[1] == 1:
        return False
    # Vectorize along whichever of C and S has the smaller stride (unit stride in practice).
    return stride[1] < s_stride


def choose_channels_last(x: torch.Tensor) -> Optional[bool]:
    """True/False for the orientation the kernels should use, None if x needs a copy."""
    s_stride = _merged_spatial_stride(x)
    return None if s_stride is None else _orientation(x.shape, x.stride(), s_stride)


def mergeable(x: torch.Tensor) -> torch.Tensor:
    """x itself when its spatial dims merge, else one contiguous copy.

    Only exotic views (e.g. spatial dims permuted or sliced in both directions) take the copy;
    channels-first, channels-last, expanded and channel-sliced tensors never do.
    """
    return x if _merged_spatial_stride(x) is not None else x.contiguous()


@functools.lru_cache(maxsize=4096)
def _geometry(shape: tuple, stride: tuple, channels_last: Optional[bool]):
    """(N, Q, K, n_stride, q_stride, k_stride, channels_last) of a tensor of this shape and
    stride, in the given orientation (None: the one it prefers); None if it does not merge.
    Cached: a layer sees the same few shapes every step."""
    s_stride = _merged_stride(shape, stride)
    if s_stride is None:
        return None
    if channels_last is None:
        channels_last = _orientation(shape, stride, s_stride)
    N, C, S = shape[0], shape[1], _spatial_size(shape)
    if channels_last:
        return N, S, C, stride[0], s_stride, stride[1], True
    return N, C, S, stride[0], stride[1], s_stride, False


def nqk_view(x: torch.Tensor, channels_last: Optional[bool] = None) -> NQKView:
    """The [N, Q, K] view of ``x`` (N, C, *spatial, with mergeable spatial dims).

    Tensors sharing x's shape but not its strides (y, dy, dx) are viewed in the orientation
    chosen for x; any strides are correct, only the unit-stride axis is faster.
    """
    geometry = _geometry(tuple(x.shape), x.stride(), channels_last)
    if geometry is None:
        raise ValueError("spatial dimensions of the tensor do not merge into one strided axis")
    return NQKView(x, *geometry)


def mask_view(view: NQKView, mask: torch.Tensor) -> NQKView:
    """The kernels' view of a batch-norm mask: ``mask`` is bool (N, *spatial) for the view's
    (N, C, *spatial) input, seen as an [N, Q, K] tensor in the input's orientation with stride 0
    along the channel axis, so the kernels address it with the input's own index arithmetic. Its
    spatial dims must merge (the caller copies a mask whose do not)."""
    x = view.tensor
    geometry = _geometry((mask.shape[0], x.shape[1], *mask.shape[1:]), (mask.stride(0), 0, *mask.stride()[1:]),
                         view.channels_last)
    if geometry is None:
        raise ValueError("batch_norm: the mask's spatial dimensions do not merge into one strided axis")
    return NQKView(mask, *geometry)


def mask_strides(mask: Optional[NQKView]) -> tuple:
    """A mask view's (n, q, k) strides as kernel arguments; zeros where there is no mask."""
    return (0, 0, 0) if mask is None else mask.strides


def empty_output(view: NQKView) -> torch.Tensor:
    """An uninitialized tensor of the view's shape for an output (y, dx) that the kernels can
    address: ``empty_like`` (the input's memory format) when its spatial dims merge, else a
    dense tensor in the view's orientation. empty_like of a non-dense input (expanded,
    permuted) picks strides of its own, which need not merge even where the input's do."""
    return _empty_output(view.tensor, view.channels_last)


def dense(x: torch.Tensor) -> bool:
    """Contiguous in the default or the channels-last memory format: ``empty_like`` then gives
    exactly x's strides (so an output's [N, Q, K] view is the input's)."""
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


def _empty_output(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    if dense(x):  # empty_like kept x's strides, which merge
        return out
    if _merged_spatial_stride(out) is not None:
        return out
    if channels_last:
        return torch.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=x.dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def output_geometry(view: NQKView, y: torch.Tensor, allocated: bool = True) -> tuple:
    """The [N, Q, K] geometry (an NQKView[1:]) of an output ``y`` of the view's shape: the
    input's own when ``y`` came from ``empty_output`` (``allocated``) of a dense input, whose
    strides empty_like keeps; otherwise y's own (a given ``out=``, or a non-dense input)."""
    if allocated and dense(view.tensor):
        return view[1:]
    return nqk_view(y, view.channels_last)[1:]


def output_for(x: torch.Tensor) -> torch.Tensor:
    """The uninitialized output (y, dx) the launchers allocate for input ``x``. Metadata only
    and uncached (shapes may be symbolic), so the ops' fake implementations use it to give
    exactly the launchers' strides."""
    x = mergeable(x)
    return _empty_output(x, choose_channels_last(x))


_INT32_SPAN = 2**31 - 1
# The indices a kernel forms run past the extents they cover by up to a tile (BLOCK_R, BLOCK_K,
# a flat block, an on-chip slab: at most 8192) plus a loop step: int32 only with this headroom.
_INDEX_SLACK = 2**14


def fits_int32(*extents: int) -> bool:
    """Whether indices up to these extents (plus a tile of padding) stay below 2^31."""
    return all(extent + _INDEX_SLACK <= _INT32_SPAN for extent in extents)


def addressing(*views: Optional[NQKView]) -> dict:
    """The addressing constexprs of a kernel over these views (None ones skipped): DENSE_ROWS
    when every view's rows are evenly spaced (n_stride == Q * q_stride: row r starts at
    r * q_stride, no division); INDEX_64 when some view spans 2^31 elements or more (element
    offsets) or has N*Q*K that many elements (row indices and counts N*Q, flat offsets: a view
    with stride-0 dims has more elements than its span)."""
    return _addressing(tuple(v[1:] for v in views if v is not None))


def split_addressing(flags: dict, split, C: int, fields: int) -> dict:
    """The addressing ``flags`` of a split reduction's views (stats.py, backward.py), with
    INDEX_64 also when the ranges of ``split`` (tuning.Splits; the last ends past N*Q or K) or
    its [fields, P, C] partial buffer reach 2^31."""
    if flags["INDEX_64"] or fits_int32(*split.extents(C, fields)):
        return flags
    return dict(flags, INDEX_64=True)


@functools.lru_cache(maxsize=4096)
def _addressing(geometries: tuple) -> dict:
    dense = all(n_stride == Q * q_stride for N, Q, K, n_stride, q_stride, k_stride, _ in geometries)
    span = max((N - 1) * abs(n_stride) + (Q - 1) * abs(q_stride) + (K - 1) * abs(k_stride)
               for N, Q, K, n_stride, q_stride, k_stride, _ in geometries)
    numel = max(N * Q * K for N, Q, K, *_ in geometries)
    return {"DENSE_ROWS": dense, "INDEX_64": span >= _INT32_SPAN or not fits_int32(numel)}
