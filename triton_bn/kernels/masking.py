"""@triton.jit building blocks of masked batch norm (docs/design.md, "Masked batch norm"): which
positions of a tile the mask counts, where the statistics take their pivot, and 1 / M_c from
the merged counts to the dx kernels. The mask is bool, seen through view.mask_view: an
[N, Q, K] tensor in the input's orientation with stride 0 along the channel axis.
"""
import triton
import triton.language as tl

from .helpers import _row_offsets, _tile_offsets, _wide


# Positions _first_counted looks at before it settles for position 0: the pivot only has to be
# near the data (accuracy, not correctness), and a mask rarely opens with this many padded ones.
_PIVOT_SCAN = tl.constexpr(16384)


@triton.jit
def _first_counted(mask_ptr, N, Q, K, m_n_stride, m_q_stride, m_k_stride, x_n_stride, x_q_stride, x_k_stride,
                   CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr):
    """The offset in x, channel 0, of the first position (in (n, s) order) the mask counts: where
    the masked statistics take their pivot. Padding (often zeros, whatever the data's mean) is no
    pivot: shifted by it, the sums of |mean| >> std data would lose their digits. The mask has no
    channel axis, so every program of every channel finds the same position and the pivots of a
    channel's splits still agree (combine.py). A bounded scan (_PIVOT_SCAN; no valid position in
    it: position 0), 128 positions of the mask per step, from L2, usually one step."""
    if CHANNELS_LAST:  # rows (n, q) are the positions; the mask's stride along K (channels) is 0
        S = Q
        m_s_stride = m_q_stride
        x_s_stride = x_q_stride
    else:
        S = K
        m_s_stride = m_k_stride
        x_s_stride = x_k_stride
    total = _wide(N, INDEX_64) * S
    first = total
    start = total * 0
    while (start < tl.minimum(total, _PIVOT_SCAN)) & (first == total):
        idx = start + tl.arange(0, 128)
        counted = tl.load(mask_ptr + (idx // S) * m_n_stride + (idx % S) * m_s_stride, mask=idx < total, other=0)
        first = tl.min(tl.where(counted != 0, idx, total), 0)
        start += 128
    first = tl.where(first == total, 0, first)
    return (first // S) * x_n_stride + (first % S) * x_s_stride


@triton.jit
def _counted(mask_ptr, rows, cols, channel, Q, n_stride, q_stride, k_stride, valid, row_valid,
             ROW_VECTOR: tl.constexpr, ROWS_ARE_NQ: tl.constexpr, FLAT: tl.constexpr, DENSE_ROWS: tl.constexpr,
             INDEX_64: tl.constexpr, MASKED: tl.constexpr):
    """``valid`` narrowed to the positions the mask counts (MASKED) in a [rows, cols] tile, the
    mask's [N, Q, K] strides given (0 along the channel axis: view.mask_view). ROW_VECTOR (a
    channels-last tile, whose mask varies along the rows only): one load per row (``row_valid``
    its bound) broadcast over the BLOCK_K channels: in the elementwise dx it saves ~11 of the
    ~14 instructions per element a masked tile load adds (sm_90, `python -m triton_bn.report
    --masked`), but in the statistics loop the broadcast costs more than the loads it saves
    (19 against 11 instructions per element, fp16 NHWC), so the reductions load the tile.
    Else the tile's (sample or (n, q) row, position) offsets, as _tile_offsets forms them
    (ROWS_ARE_NQ); FLAT: ``rows`` holds the flat offsets (_flat_tile)."""
    counted = valid
    if MASKED:
        if FLAT:
            counted = valid & (tl.load(mask_ptr + rows, mask=valid, other=0) != 0)
        elif ROW_VECTOR:
            offsets = _row_offsets(rows, channel, Q, n_stride, q_stride, True, DENSE_ROWS, INDEX_64)
            counted = valid & (tl.load(mask_ptr + offsets, mask=row_valid, other=0) != 0)[:, None]
        else:
            offsets = _tile_offsets(rows, cols, channel, Q, n_stride, q_stride, k_stride, ROWS_ARE_NQ, DENSE_ROWS,
                                    INDEX_64)
            counted = valid & (tl.load(mask_ptr + offsets, mask=valid, other=0) != 0)
    return counted


@triton.jit
def _store_inv_counts(inv_counts_ptr, count, channels, channel_mask):
    """Store 1 / M_c of a masked forward's per-channel counts as float32 (hi, lo) pairs,
    [C, 2]: computed in float64 exactly as split_float does on the host for an unmasked call, so
    an all-True mask gives the unmasked call's bits. Here, once per channel where the count is
    merged, not in the dx kernel: a float64 division is a subroutine call (~100 instructions)
    that would run in every dx program. M_c = 0: 0 (no position takes the projection)."""
    count = count.to(tl.float64)
    inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
    hi = inv.to(tl.float32)
    tl.store(inv_counts_ptr + 2 * channels, hi, mask=channel_mask)
    tl.store(inv_counts_ptr + 2 * channels + 1, (inv - hi.to(tl.float64)).to(tl.float32), mask=channel_mask)


@triton.jit
def _inv_count_parts(inv_counts_ptr, channels, channel_mask):
    """(hi, lo), hi + lo = 1 / M_c, from the [C, 2] pairs _store_inv_counts wrote."""
    hi = tl.load(inv_counts_ptr + 2 * channels, mask=channel_mask, other=0.0)
    return hi, tl.load(inv_counts_ptr + 2 * channels + 1, mask=channel_mask, other=0.0)
