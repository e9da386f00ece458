"""Launch plans: a kernel launch cached by everything it depends on, then launched directly.

Triton's own launch path re-binds every argument, recomputes the specialization key, and
(for autotuned kernels) looks the key up in the autotuner, at every call: tens of
microseconds of host time, more than the GPU needs for a small layer. A ``Launch`` does that
work once per *plan key*, which its caller builds from what the launch depends on:

    the [N, Q, K] geometry (shape, strides, orientation) and split -> every int argument
    each tensor's dtype and 16-byte alignment (or None)            -> Triton's specialization
    the constexpr flags                                            -> the compiled variant

The first call of a key goes through Triton as usual (autotuning on a new key, compiling,
``TRITON_BN_PIN_CONFIG``, a tuning file), then records the compiled kernel, the config the
autotuner chose, the grid it implies and the constexpr tail of the argument list. Later calls
pass the runtime arguments straight to the compiled kernel's launcher.

The direct path is skipped (Triton's path taken every time) under the interpreter, where
there is no compiled kernel, and while a Triton launch hook is installed (profilers such as
proton read launch metadata that only Triton's path builds).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

from .tuning import interpreting

_ALL_LAUNCHES: list = []


def tensor_key(*tensors: Optional[torch.Tensor]) -> tuple:
    """What Triton specializes a pointer on: presence, dtype and 16-byte alignment."""
    return tuple(None if t is None else (t.dtype, t.data_ptr() & 15 == 0) for t in tensors)


class Launch:
    """One kernel (plain or autotuned) with its compiled variants by plan key."""

    def __init__(self, fn):
        self.fn = fn
        self.jit = fn.fn if isinstance(fn, Autotuner) else fn
        self.names = self.jit.arg_names
        self.plans: Dict[tuple, Tuple] = {}
        self.seen: set = set()  # keys already tuned on scratch arguments
        # Compiled kernels exist to be launched directly unless the interpreter runs them (the
        # resource report also turns it off while it records launches).
        self.direct = not interpreting()
        _ALL_LAUNCHES.append(self)

    def __call__(self, key: tuple, grid, args: tuple, constexprs: dict, scratch: tuple = ()) -> None:
        """Launch with positional runtime ``args`` (the kernel's leading parameters) and keyword
        ``constexprs`` (the rest but the autotuned ones); ``grid`` as Triton takes it.

        ``scratch``: indices of arguments the kernel updates in place (running statistics).
        The first call of a key runs once on clones of them, so that an autotuner, which runs
        every candidate several times, only ever moves the clones; then once for real."""
        if scratch and key not in self.seen:
            self.seen.add(key)
            self.fn[grid](*(a.clone() if i in scratch else a for i, a in enumerate(args)), **constexprs)
        if not self.direct:
            self.fn[grid](*args, **constexprs)
            return
        device = driver.active.get_current_device()  # Triton launches on the current device
        key = (device, key)
        plan = self.plans.get(key)
        if plan is not None and not _launch_hooks():
            kernel, grid3, tail = plan
            kernel.run(grid3[0], grid3[1], grid3[2], driver.active.get_current_stream(device), kernel.function,
                       kernel.packed_metadata, None, None, None, *args, *tail)
            return
        kernel = self.fn[grid](*args, **constexprs)
        if kernel is None or not hasattr(kernel, "packed_metadata"):
            return
        meta = dict(constexprs)
        if isinstance(self.fn, Autotuner):
            meta.update(self.fn.best_config.all_kwargs())
        grid3 = tuple(grid(meta)) if callable(grid) else tuple(grid)
        grid3 = grid3 + (1,) * (3 - len(grid3))
        tail = tuple(meta[name] for name in self.names[len(args):])
        self.plans[key] = (kernel, grid3, tail)


def _launch_hooks() -> bool:
    """Whether a Triton launch hook is installed (Triton >= 3.5 keeps an empty HookChain)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def all_launches() -> list:
    return list(_ALL_LAUNCHES)


def clear_plans() -> None:
    """Forget every recorded launch (e.g. after a tuning file changed the chosen configs)."""
    for launch in _ALL_LAUNCHES:
        launch.plans.clear()
        launch.seen.clear()


