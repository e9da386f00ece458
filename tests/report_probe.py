"""Probe kernels for tests/test_report.py: a loop that divides by a runtime int, in 64 bits
(ptxas calls its division subroutine inside the loop) and in 32 bits (inlined, no call).

Compiled by the report's worker (a subprocess without TRITON_INTERPRET), never launched. The
``x_ptr`` / ``x_k_stride`` pair makes the load a tile access for the report's line matching.
"""
import triton
import triton.language as tl


@triton.jit
def divide_in_loop_kernel(x_ptr, y_ptr, n, q, x_k_stride, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros([BLOCK_R * BLOCK_K], x_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK_R * BLOCK_K):
        offsets = start + tl.arange(0, BLOCK_R * BLOCK_K)
        x = tl.load(x_ptr + offsets * x_k_stride, mask=offsets < n, other=1)
        acc += x // q  # the element type sets the division's width: i64 -> a CALL, i32 -> inline
    tl.store(y_ptr + tl.arange(0, BLOCK_R * BLOCK_K), acc)
