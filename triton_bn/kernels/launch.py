"""Launch plans: a kernel launch cached by everything it depends on, then launched directly.

Triton's own launch path re-binds every argument, recomputes the specialization key, and
(for autotuned kernels) looks the key up in the autotuner, at every call: tens of
microseconds of host time, more than the GPU needs for a small layer. A ``Launch`` does that
work once per *plan key*, which its caller builds from what the launch depends on:

    the [N, Q, K] geometry (shape, strides, orientation) and split -> every int argument
    each tensor's dtype and 16-byte alignment (or None)            -> Triton's specialization
    the constexpr flags and float arguments                        -> the compiled variant, the rest

The first call of a key goes through Triton as usual (autotuning on a new key, compiling,
``TRITON_BN_PIN_CONFIG``, a tuning file), then records a ``_Plan``: the compiled kernel, the
config the autotuner chose, the grid it implies, the argument list with the tensors' slots
and the constexpr tail. Later calls (``Launch.run``) compute only the key, then pass the
call's tensors straight to the compiled kernel's C launcher. Under the interpreter a plan
calls the interpreted kernel with the recorded config, so the same bookkeeping runs (and is
tested) on the CPU.

Triton's path is taken every time while a Triton launch hook is installed (profilers such as
proton read launch metadata that only Triton's path builds), and while the resource report
records launches (``direct = False``). replay.py builds on the plans: a whole launcher call
replayed from its recorded plans.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, Optional

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

from ..compat import C_LAUNCH_LAYOUT
from .tuning import interpreting

_ALL_LAUNCHES: list = []
_CLEAR_HOOKS: list = []
# Plans per kernel: past this many the kernel starts again (a new key re-plans through Triton's
# path, whose caches keep the compiled kernel and the tuned config: no recompiling, no tuning).
MAX_PLANS = 1024


def current_device():
    """The device Triton launches on; None under the interpreter, or with no GPU driver at
    all (the resource report records launches on meta tensors on a CPU-only machine)."""
    if interpreting():
        return None
    try:
        return driver.active.get_current_device()
    except RuntimeError:
        return None


def current_stream(device):
    return 0 if device is None else driver.active.get_current_stream(device)


def launch_hooks() -> bool:
    """Whether a Triton launch hook is installed (Triton >= 3.5 keeps an empty HookChain):
    profilers such as proton read launch metadata that only Triton's own launch path builds."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


# What a launcher call launched, while replay.py records one (None otherwise). One thread
# records at a time; launches of other threads (nn.DataParallel) are not its own.
recording: Optional["_Recording"] = None
_NOT_REPLAYABLE = object()


class _Recording:
    def __init__(self, arguments: list, positions: list = (), names: list = ()):
        self.arguments = arguments  # the call's tensor arguments, in order
        self.positions, self.names = positions, names  # where they are: args indices, then kwargs names
        self.fresh: list = []  # tensors the launcher allocated, in order
        self.scratch: list = []  # (tensor, how to get the current stream's one)
        self.steps: list = []  # (plan, tensors)
        self.complete = True
        self.thread = threading.get_ident()


def _recording() -> Optional[_Recording]:
    return recording if recording is not None and recording.thread == threading.get_ident() else None


def fresh(tensor: torch.Tensor) -> torch.Tensor:
    """Mark ``tensor`` as newly allocated by the launcher (its contents written by kernels)."""
    if recording is not None and _recording():
        recording.fresh.append(tensor)
    return tensor


def stream_scratch(tensor: torch.Tensor, get: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """Mark ``tensor`` as a per-stream scratch buffer; a replay calls ``get(*args, stream)``
    (``stream``: current_stream's value) at every call, for the buffer that call must use (the
    current stream's, or one of its own while a CUDA graph is captured: tickets.for_stream).
    ``get`` marks nothing."""
    if recording is not None and _recording():
        recording.scratch.append((tensor, functools.partial(get, *args)))
    return tensor


def record_launch(plan, tensors: tuple) -> None:
    """``plan`` (None: one no replay can repeat) launched with ``tensors``."""
    if recording is not None and _recording():
        if plan is None:
            recording.complete = False
        else:
            recording.steps.append((plan, tensors))


def tensor_key(*tensors: Optional[torch.Tensor]) -> tuple:
    """What Triton specializes a pointer on: presence, dtype and 16-byte alignment."""
    return tuple([None if t is None else (t.dtype, t.data_ptr() & 15 == 0) for t in tensors])


class _Plan:
    """A recorded launch: the kernel, its grid, the argument list with the tensors' positions
    (``slots``) left to fill per call, and the constexpr tail."""

    __slots__ = ("owner", "grid", "template", "slots", "tail", "go")

    def __init__(self, owner, kernel, jit, grid3, args, tail, tail_names):
        self.owner = owner  # the Launch it belongs to
        self.grid, self.tail = grid3, tail
        self.slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        self.template = [None if i in self.slots else a for i, a in enumerate(args)]  # holds no tensor
        if kernel is None:  # the interpreter: the Python kernel with the recorded config
            constexprs = dict(zip(tail_names, tail))
            self.go = lambda stream, args: jit[grid3](*args[:len(args) - len(tail)], **constexprs)
        else:
            self.go = _c_launcher(kernel, grid3) or _triton_launcher(kernel, grid3)

    def launch(self, stream, args) -> None:
        """Launch with the full positional argument list (the constexpr tail excluded)."""
        self.go(stream, (*args, *self.tail))

    def launch_tensors(self, stream, tensors) -> None:
        """Launch with this call's tensors in the recorded slots; every other argument as
        recorded (the plan key fixes them)."""
        args = self.template.copy()
        for slot, tensor in zip(self.slots, tensors):
            args[slot] = tensor
        self.go(stream, (*args, *self.tail))


def _triton_launcher(kernel, grid3):
    """Triton's own launch of this kernel (``kernel.run``, its CudaLauncher), the same on every
    Triton in range: scratch allocation, GSan and the launch hooks' arguments in Python."""
    x, y, z = grid3

    def go(stream, args):
        kernel.run(x, y, z, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)
    go.path = "triton"
    return go


# What the CudaLauncher must have, per C launch layout (compat.C_LAUNCH_LAYOUTS).
_C_LAUNCH_NEEDS = {
    "varargs": ("launch", "global_scratch_size", "profile_scratch_size", "launch_cooperative_grid", "launch_pdl"),
    "packed": ("launch", "global_scratch_size", "profile_scratch_size", "launch_cooperative_grid", "launch_pdl",
               "arg_annotations", "kernel_signature"),
}


def _c_launcher(kernel, grid3, layout: Optional[str] = C_LAUNCH_LAYOUT):
    """Triton's C launch function bound to this kernel, or None (then ``kernel.run``).

    ``kernel.run`` (the CudaLauncher) is a Python function that allocates global and profile
    scratch and handles GSan on every call, then calls its C ``launch``; for a kernel that needs
    neither scratch nor GSan that wrapper is ~1.4 us of host time per launch (stub-driver
    benchmark), half of the launch. The C function's signature is Triton-internal and differs
    between versions (``layout``, compat.C_LAUNCH_LAYOUTS): a Triton whose signature is not
    listed, or whose launcher lacks an expected attribute, keeps Triton's own path."""
    run = getattr(kernel, "run", None)
    needed = _C_LAUNCH_NEEDS.get(layout)
    if run is None or needed is None or not all(hasattr(run, name) for name in needed):
        return None
    if run.global_scratch_size or run.profile_scratch_size or getattr(run, "gsan_enabled", False):
        return None
    c_launch, function, metadata = run.launch, kernel.function, kernel.packed_metadata
    cooperative, pdl = run.launch_cooperative_grid, run.launch_pdl
    x, y, z = grid3
    if layout == "packed":
        annotations, signature = run.arg_annotations, run.kernel_signature

        def go(stream, args):
            c_launch(x, y, z, stream, function, cooperative, pdl, metadata, None, None, None, None, None,
                     annotations, signature, args)
    else:
        def go(stream, args):
            c_launch(x, y, z, stream, function, cooperative, pdl, None, None, metadata, None, None, None, *args)
    go.path = f"c:{layout}"
    return go


class Launch:
    """One kernel (plain or autotuned) with its plans by key."""

    def __init__(self, fn):
        self.fn = fn
        self.jit = fn.fn if isinstance(fn, Autotuner) else fn
        self.names = self.jit.arg_names
        self.plans: Dict[tuple, _Plan] = {}
        self.seen: set = set()  # keys already tuned on scratch arguments
        self.direct = True  # plans are recorded and used (the resource report turns it off)
        _ALL_LAUNCHES.append(self)

    def run(self, key: tuple, tensors: tuple, build) -> None:
        """The launchers' path: when ``key`` has a plan, launch it with ``tensors`` (the
        launch's tensor arguments, in order, None ones left out) and nothing else computed;
        otherwise ``build()`` -> (grid, args, constexprs, scratch) and launch as ``__call__``.
        The key must fix every non-tensor argument."""
        plan, stream = self._ready(key)
        if plan is not None:
            plan.launch_tensors(stream, tensors)
            record_launch(plan, tensors)
            return
        grid, args, constexprs, scratch = build()
        record_launch(self._first(key, grid, args, constexprs, scratch), tensors)

    def __call__(self, key: tuple, grid, args: tuple, constexprs: dict, scratch: tuple = ()) -> None:
        """Launch with positional runtime ``args`` (the kernel's leading parameters) and keyword
        ``constexprs`` (the rest but the autotuned ones); ``grid`` as Triton takes it.

        ``scratch``: indices of arguments the kernel updates in place (running statistics).
        The first call of a key runs once on clones of them, so that an autotuner, which runs
        every candidate several times, only ever moves the clones; then once for real."""
        record_launch(None, ())  # a launch no replay (replay.py) repeats
        plan, stream = self._ready(key)
        if plan is not None:
            plan.launch(stream, args)
            return
        self._first(key, grid, args, constexprs, scratch)

    def _ready(self, key: tuple):
        """(the key's plan on the current device, the current stream), or (None, None) when
        Triton's own path must run (no plan yet, plans off, a launch hook installed)."""
        if not self.direct or launch_hooks():
            return None, None
        device = current_device()
        plan = self.plans.get((device, key))
        return (plan, current_stream(device)) if plan is not None else (None, None)

    def _first(self, key, grid, args, constexprs, scratch) -> Optional[_Plan]:
        """Triton's own launch (tuning, compiling); records and returns the plan (direct mode)."""
        if scratch and key not in self.seen:
            self.seen.add(key)
            self.fn[grid](*(a.clone() if i in scratch else a for i, a in enumerate(args)), **constexprs)
        kernel = self.fn[grid](*args, **constexprs)
        if not self.direct:
            return None
        if not interpreting() and (kernel is None or not hasattr(kernel, "packed_metadata")):
            return None
        meta = dict(constexprs)
        if isinstance(self.fn, Autotuner):
            meta.update(self.fn.best_config.all_kwargs())
        grid3 = tuple(grid(meta)) if callable(grid) else tuple(grid)
        grid3 = grid3 + (1,) * (3 - len(grid3))
        tail_names = self.names[len(args):]
        plan = _Plan(self, None if interpreting() else kernel, self.jit, grid3, args,
                     tuple(meta[name] for name in tail_names), tail_names)
        if len(self.plans) >= MAX_PLANS:  # keys hold float arguments by value (a momentum schedule)
            self.plans.clear()
        self.plans[(current_device(), key)] = plan
        return plan


def all_launches() -> list:
    return list(_ALL_LAUNCHES)


def clear_plans() -> None:
    """Forget every recorded launch (e.g. after a tuning file changed the chosen configs)."""
    for launch in _ALL_LAUNCHES:
        launch.plans.clear()
        launch.seen.clear()
    for hook in _CLEAR_HOOKS:
        hook()


def on_clear(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever the plans are cleared (replay.py's recordings hold plans)."""
    _CLEAR_HOOKS.append(hook)


