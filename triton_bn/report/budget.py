"""The instruction budget per element that an H200 allows at full memory bandwidth.

A kernel keeps up with memory only if its instructions issue at least as fast as its data
arrives. Per element (thread-instructions, as ``sass_loops`` counts them):

    issue rate     = SMs x schedulers per SM x 1 warp-instruction per clock x 32 threads x clock
                   = 132 x 4 x 32 x 1.98e9       = 3.35e13 thread-instructions/s
    elements/s     = achievable bandwidth / bytes per element
                   = 0.9 x 4.8e12 B/s / B         (90 % of the datasheet's HBM3e peak, 4.32 TB/s,
                                                   about the 4.3 TB/s copy measured on one)
    budget         = issue rate / elements per s  = 7.74 x B instructions per element

B is the bytes the kernel moves per element: element size x (tile tensors read + written),
read off the machine code (distinct tile load/store source lines). The budget is a ceiling:
it assumes every scheduler issues every clock, which memory latency and dependent
instructions never allow; a kernel near it is issue-bound, one at half of it has slack.
"""
from __future__ import annotations

from typing import Optional

H200_SMS = 132
SCHEDULERS_PER_SM = 4  # each issues one warp-instruction per clock
BOOST_CLOCK_HZ = 1.98e9  # the SM clock read under load on an H200 here (KINDS.md: 1980 MHz)
PEAK_BANDWIDTH = 4.8e12  # HBM3e, datasheet, bytes/s
ACHIEVABLE = 0.9  # of the peak; the measured device-to-device copy is ~4.3e12 (~90 %)
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}

ISSUE_RATE = H200_SMS * SCHEDULERS_PER_SM * 32 * BOOST_CLOCK_HZ  # thread-instructions per second


def instructions_per_byte() -> float:
    """Thread-instructions an H200 can issue per byte moved at achievable bandwidth (~7.74)."""
    return ISSUE_RATE / (ACHIEVABLE * PEAK_BANDWIDTH)


def budget(dtype: str, tensors_moved: int) -> Optional[float]:
    """Instructions per element at bandwidth for a kernel that reads and writes
    ``tensors_moved`` tiles of ``dtype`` per element (None when it moves none)."""
    if not tensors_moved or dtype not in ELEMENT_BYTES:
        return None
    return instructions_per_byte() * ELEMENT_BYTES[dtype] * tensors_moved
