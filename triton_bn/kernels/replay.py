"""Op-level replay: a whole launcher call (its allocations and launches) recorded once per
argument signature, then replayed with none of the launcher's Python in between.

A launcher such as ``bn_backward`` builds views, splits, keys and argument lists for each of
its stages: ~10 us of host time per stage on a small layer, more than the GPU needs for it
(``python -m perf host``). All of it is a function of the *signature* of the call: every
tensor argument's shape, strides, dtype, device and 16-byte alignment, and every other
argument's value. ``@replayable`` records the first call of a signature:

    each stage launch   its Launch plan (launch.py) and where each of its tensors came from:
                        an argument of the call, an output allocated by the launcher
                        (``fresh``), or the ticket buffer (``stream_scratch``), fetched again
                        at every call (tickets.py: the current stream's, or a private one
                        while a CUDA graph is being captured)
    the return value    which of those tensors it is made of

and later calls of the signature allocate the same tensors (``empty_strided``) and launch the
recorded plans in order. A call is only recorded when everything it launched is accounted
for: a tensor of any other origin (e.g. a contiguous copy of a strided running statistic,
which must be copied back) leaves the signature to the launcher, call after call; so does
every call while a Triton launch hook is installed. Plans, hence replays, exist under the
interpreter too, so the tests run this path.
The key also holds the launchers' global switches (``tuning.onchip_enabled()``, ``l2_hints_enabled()``,
``cooperative_enabled()``).
``clear_plans`` forgets the recordings with the plans.
"""
from __future__ import annotations

import functools
import operator
from typing import Callable, Dict

import torch

from . import launch
from .tickets import zero_after_error
from .tuning import cooperative_enabled, l2_hints_enabled, onchip_enabled
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
    """The recorded call: allocations, launches with their tensors' sources, the result.

    A replay works on one *table*: the call's tensor arguments, then the fresh tensors, then
    the scratch buffers. Each launch's argument list (tensors and recorded scalars; the plan
    adds the constexpr tail) is one ``itemgetter`` over the table followed by the plan's
    constants."""

    def __init__(self, recording: _Recording, result):
        # The call's tensor arguments: positional ones by position, keyword ones by name (the
        # key fixes both: which arguments are tensors, and the keywords' names and order).
        self.positions, self.names = _getter(recording.positions), recording.names
        self.allocs = [(t.shape, t.stride(), t.dtype, t.device) for t in recording.fresh]
        # The fresh tensors as the first argument's new_empty_strided (its device; its dtype
        # unless another is named): a torch.device argument costs ~1 us of parsing per allocation.
        first = recording.arguments[0] if recording.arguments else None
        self.like = None
        if first is not None and all(t.device == first.device for t in recording.fresh):
            self.like = [(t.shape, t.stride(), None if t.dtype == first.dtype else t.dtype) for t in recording.fresh]
        self.scratch = [get for _, get in recording.scratch]
        table = [*recording.arguments, *recording.fresh, *(t for t, _ in recording.scratch)]
        # Every step's recorded scalars, and None (a None result), are appended to the table
        # once per call: each launch's argument list is then one itemgetter over the table.
        self.constants, self.steps = [None], []
        for plan, tensors in recording.steps:
            sources = iter([_index(table, t) for t in tensors])
            picks = []
            for i, value in enumerate(plan.template):
                if i in plan.slots:
                    picks.append(next(sources))
                else:
                    picks.append(len(table) + len(self.constants))
                    self.constants.append(value)
            self.steps.append((plan, _getter(picks)))
        self.tuple_result = isinstance(result, tuple)
        self.result = _getter([len(table) if t is None else _index(table, t)
                               for t in (result if self.tuple_result else (result,))])

    def __call__(self, args: tuple, kwargs: dict, device):
        table = list(self.positions(args))
        if self.names:
            table += [kwargs[name] for name in self.names]
        if self.like is not None and type(table[0]) is torch.Tensor:  # the key fixes its dtype and device
            new = table[0].new_empty_strided
            for shape, stride, dtype in self.like:
                table.append(new(shape, stride) if dtype is None else new(shape, stride, dtype=dtype))
        else:
            for shape, stride, dtype, dev in self.allocs:
                table.append(torch.empty_strided(shape, stride, dtype=dtype, device=dev))
        stream = current_stream(device)
        for get in self.scratch:
            table.append(get(stream))
        table += self.constants
        for plan, pick in self.steps:
            plan.launch(stream, pick(table))
        result = self.result(table)
        return result if self.tuple_result else result[0]


def _getter(indices) -> Callable[[list], tuple]:
    """``lambda seq: tuple(seq[i] for i in indices)`` in one C call (itemgetter returns a bare
    item for one index)."""
    indices = list(indices)
    if len(indices) == 1:
        return lambda seq, i=indices[0]: (seq[i],)
    return operator.itemgetter(*indices) if indices else (lambda seq: ())


def _index(table: list, tensor) -> int:
    for i, known in enumerate(table):
        if known is tensor:
            return i
    raise LookupError  # a tensor of unknown origin


_REPLAYS: Dict[tuple, object] = {}
MAX_REPLAYS = 4096


def replayable(launcher=None, *, by_arguments: bool = True):
    """Record the first call of each signature of ``launcher`` and replay later ones.

    The wrapper's ``keyed(key, *args, **kwargs)`` takes the signature from its caller instead:
    ``key`` must fix everything ``_meta`` reads from the arguments (eager.py's call signature
    does, having read it for its own checks). ``by_arguments=False``: plain calls are not
    replayed (a launcher whose own key costs more than the Python it skips), keyed calls are."""
    if launcher is None:
        return functools.partial(replayable, by_arguments=by_arguments)

    # Both wrappers zero the ticket counters when the launcher raises: a launch it made may
    # have stopped midway with tickets taken (tickets.zero_after_error).
    @functools.wraps(launcher)
    def call(*args, **kwargs):
        try:
            if not by_arguments or launch.recording is not None or launch_hooks():
                return launcher(*args, **kwargs)  # a nested launcher, or a profiler watching
            try:
                key = (tuple(map(_meta, args)), tuple((k, _meta(v)) for k, v in kwargs.items()))
                return _replay(launcher, key, args, kwargs)
            except _Unhashable:  # an unhashable argument: nothing to key on
                return launcher(*args, **kwargs)
        except BaseException:
            zero_after_error()
            raise

    def keyed(key, *args, **kwargs):
        try:
            if launch.recording is not None or launch_hooks():
                return launcher(*args, **kwargs)
            return _replay(launcher, ("keyed", key), args, kwargs)
        except BaseException:
            zero_after_error()
            raise

    call.keyed = keyed
    return call


class _Unhashable(Exception):
    pass


def _replay(launcher, key: tuple, args: tuple, kwargs: dict):
    device = current_device()
    key = (launcher, device, (onchip_enabled.on, l2_hints_enabled.on, cooperative_enabled.on), key)
    try:
        replay = _REPLAYS.get(key)
    except TypeError:
        raise _Unhashable from None
    if replay is not None and replay is not _NOT_REPLAYABLE:
        return replay(args, kwargs, device)
    if replay is _NOT_REPLAYABLE:
        return launcher(*args, **kwargs)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    launch.recording = recording = _Recording([args[i] for i in positions] + [kwargs[k] for k in names],
                                              positions, names)
    try:
        result = launcher(*args, **kwargs)
    finally:
        launch.recording = None
    if len(_REPLAYS) >= MAX_REPLAYS:  # signatures hold float arguments by value (a momentum schedule)
        _REPLAYS.clear()
    _REPLAYS[key] = _build(recording, result)
    return result


def _build(recording: _Recording, result):
    if not recording.complete or not recording.steps:
        return _NOT_REPLAYABLE
    try:
        return _Replay(recording, result)
    except LookupError:
        return _NOT_REPLAYABLE


launch.on_clear(_REPLAYS.clear)  # the recordings hold plans
