"""Op-level replay: a whole launcher call (its allocations and launches) recorded once per
argument signature, then replayed with none of the launcher's Python in between.

A launcher such as ``bn_backward`` builds views, splits, keys and argument lists for each of
its stages: ~10 us of host time per stage on a small layer, more than the GPU needs for it
(``python -m perf host``). All of it is a function of the *signature* of the call: every
tensor argument's shape, strides, dtype, device and 16-byte alignment, and every other
argument's value. ``@replayable`` records the first call of a signature:

    each stage launch   its Launch plan (launch.py) and where each of its tensors came from:
                        an argument of the call, an output allocated by the launcher
                        (``fresh``), or the current stream's ticket buffer (``stream_scratch``)
    the return value    which of those tensors it is made of

and later calls of the signature allocate the same tensors (``empty_strided``) and launch the
recorded plans in order. A call is only recorded when everything it launched is accounted
for: a tensor of any other origin (e.g. a contiguous copy of a strided running statistic,
which must be copied back) leaves the signature to the launcher, call after call; so does
every call while a Triton launch hook is installed. Plans, hence replays, exist under the
interpreter too, so the tests run this path.
The key also holds the launchers' one global switch (``tuning.onchip_enabled()``).
``clear_plans`` forgets the recordings with the plans.
"""
from __future__ import annotations

import functools
from typing import Dict

import torch

from . import launch
from .tuning import onchip_enabled
from .launch import _NOT_REPLAYABLE, _Recording, current_device, current_stream, launch_hooks


def _meta(value):
    """What a launcher's decisions depend on: a tensor's shape, strides, dtype, device and
    16-byte alignment; for a per-channel vector (1-D; its length is the input's C) dtype,
    alignment and contiguity (a strided running statistic takes the copy path)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 1:
            return value.dtype, value.data_ptr() & 15, value.is_contiguous()
        return value.shape, value.stride(), value.dtype, value.device, value.data_ptr() & 15
    return value


class _Replay:
    """The recorded call: allocations, launches with their tensors' sources, the result."""

    def __init__(self, recording: _Recording, result):
        self.allocs = [(t.shape, t.stride(), t.dtype, t.device) for t in recording.fresh]
        self.scratch = [get for _, get in recording.scratch]
        self.steps = [(plan, tuple(self._source(recording, t) for t in tensors))
                      for plan, tensors in recording.steps]
        self.tuple_result = isinstance(result, tuple)
        self.result = tuple(None if t is None else self._source(recording, t)
                            for t in (result if self.tuple_result else (result,)))

    @staticmethod
    def _source(recording: _Recording, tensor) -> int:
        """Index into the replay's tensor table: arguments, then fresh tensors, then scratch."""
        for table_offset, table in ((0, recording.arguments),
                                    (len(recording.arguments), recording.fresh),
                                    (len(recording.arguments) + len(recording.fresh),
                                     [t for t, _ in recording.scratch])):
            for i, known in enumerate(table):
                if known is tensor:
                    return table_offset + i
        raise LookupError

    def __call__(self, arguments: list, device):
        table = arguments + [torch.empty_strided(shape, stride, dtype=dtype, device=dev)
                             for shape, stride, dtype, dev in self.allocs]
        table += [get() for get in self.scratch]
        stream = current_stream(device)
        for plan, sources in self.steps:
            plan.launch_tensors(stream, [table[i] for i in sources])
        result = tuple(None if i is None else table[i] for i in self.result)
        return result if self.tuple_result else result[0]


_REPLAYS: Dict[tuple, object] = {}


def replayable(launcher):
    """Record the first call of each signature of ``launcher`` and replay later ones."""
    @functools.wraps(launcher)
    def call(*args, **kwargs):
        if launch.recording is not None or launch_hooks():  # nested launcher, or a profiler watching
            return launcher(*args, **kwargs)
        device = current_device()
        try:
            key = (launcher, device, onchip_enabled(), tuple(map(_meta, args)),
                   tuple((k, _meta(v)) for k, v in kwargs.items()))
            replay = _REPLAYS.get(key)
        except TypeError:  # an unhashable argument: nothing to key on
            return launcher(*args, **kwargs)
        if replay is _NOT_REPLAYABLE:
            return launcher(*args, **kwargs)
        arguments = [a for a in args if isinstance(a, torch.Tensor)]
        arguments += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        if replay is not None:
            return replay(arguments, device)
        launch.recording = recording = _Recording(arguments)
        try:
            result = launcher(*args, **kwargs)
        finally:
            launch.recording = None
        _REPLAYS[key] = _build(recording, result)
        return result
    return call


def _build(recording: _Recording, result):
    if not recording.complete or not recording.steps:
        return _NOT_REPLAYABLE
    try:
        return _Replay(recording, result)
    except LookupError:  # a tensor of unknown origin
        return _NOT_REPLAYABLE


launch.on_clear(_REPLAYS.clear)  # the recordings hold plans
