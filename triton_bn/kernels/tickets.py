"""Layer 1 (kernels): the int32 ticket counters of the folded combines, and how long they live.

A launch that folds a combine into its reduction (stats.py, backward.py) or counts a step
(stats.py, onchip.py) takes tickets: each program atomically increments its channel
(block)'s counter, and the one that draws the last ticket combines and sets the counter back
to zero (helpers._last_of_channel, _count_step). So a buffer is zero before and after every
launch that ran to completion, and no memset runs between calls. Who may share a buffer:

* Eager launches on one (device, stream) share that stream's buffer: they run in stream
  order, so each finds it zero. Launches on two streams may overlap: a buffer per stream.
* A buffer handed out is never freed, so an address a launch was given never comes to hold
  anything else (a graph captured by code that bypassed the rule below, a kernel still
  queued). A larger request (the first layer with more channel blocks) allocates a buffer at
  least twice as large and keeps the old one (``_RETIRED``): sizes double, so a stream's
  retired buffers together are smaller than its current one.
* A launch made while the current stream captures a CUDA graph
  (``torch.cuda.is_current_stream_capturing()``) gets a buffer of its own, ``torch.zeros``
  inside the capture. The zeroing is a node of the graph, so every replay starts from zero
  whatever ran before it; the memory comes from the graph's private pool, which torch keeps
  for the graph as long as the graph can be replayed (the pool is the registry; freed during
  capture, the block is reused only later in the same capture, in stream order, or by a
  capture that shares the pool). A replay may assume its counters are zero when each launch
  starts; two replays running at once share no ticket memory, with each other or with eager
  calls (graphs sharing a pool must be replayed one at a time, torch's rule for every tensor
  of theirs). The cost: one small fill node per ticket-taking launch in the graph. A buffer
  per capture would need the capture's id, which torch does not give to Python.
* Replays of recorded launcher calls (replay.py) fetch the buffer through ``for_stream`` at
  every call, so a call replayed during a capture gets a private buffer too.
* A launch stopped midway leaves counters non-zero, and every later launch on that buffer
  would combine too early. Only the interpreter stops a launch midway (a GPU kernel runs to
  completion or poisons the context); ``zero_after_error``, run by replay.py when a launcher
  raises, zeroes the current stream's buffers.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Tuple

import torch
from triton.runtime import driver

from .launch import stream_scratch

_EAGER: Dict[Tuple[torch.device, int], torch.Tensor] = {}
_RETIRED: List[torch.Tensor] = []  # replaced buffers, never freed (see the module docstring)
_GROWTH = threading.Lock()
MIN_COUNTERS = 1024


def _capturing(device: torch.device) -> bool:
    """Whether launches on ``device`` now are captured into a CUDA graph (the tests patch this)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream(device: torch.device) -> int:
    return driver.active.get_current_stream(device.index) if device.type == "cuda" else 0


def tickets(device: torch.device, programs: int) -> torch.Tensor:
    """``programs`` zeroed int32 counters for a launch on the current stream (at least that
    many), marked for replay.py as per-stream scratch."""
    return stream_scratch(for_stream(device, programs, _stream(device)), for_stream, device, programs)


def for_stream(device: torch.device, programs: int, stream: int) -> torch.Tensor:
    """The counters a launch on ``stream`` gets: a private zeroed buffer while capturing, else
    the stream's eager buffer, grown (the old one kept) when too small."""
    if _capturing(device):
        return torch.zeros(programs, dtype=torch.int32, device=device)
    buffer = _EAGER.get((device, stream))
    if buffer is not None and buffer.numel() >= programs:
        return buffer
    with _GROWTH:
        buffer = _EAGER.get((device, stream))
        if buffer is None or buffer.numel() < programs:
            size = max(programs, MIN_COUNTERS, 0 if buffer is None else 2 * buffer.numel())
            if buffer is not None:
                _RETIRED.append(buffer)
            buffer = _EAGER[(device, stream)] = torch.zeros(size, dtype=torch.int32, device=device)
    return buffer


def zero_after_error() -> None:
    """Zero the eager buffers of every device's current stream, after a launcher raised: a
    launch it made may have stopped midway (the interpreter) with counters taken. Harmless
    otherwise (a launch that completed left them zero; the fill is queued behind it). Nothing
    is queued while capturing: the capture has failed anyway, and its buffers are private."""
    for (device, stream), buffer in list(_EAGER.items()):
        if not _capturing(device) and stream == _stream(device):
            buffer.zero_()
