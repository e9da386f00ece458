"""Layer 0: the torch and Triton versions triton_bn runs on, and the internals of theirs it
reads, each behind one name here (imported by the other layers; imports no triton_bn module).

Supported: torch 2.9 - 2.15 with the Triton each pins (3.5 - 3.9), Python 3.10 - 3.13;
.ci/versions.sh tests the floor pair (torch 2.9.1, Triton 3.5.1) and the newest (2.15.0, 3.9.0).
Below Triton 3.5 the import fails here, naming the version (kernels use
``triton.constexpr_function``, new in 3.5); so does an interpreted run (TRITON_INTERPRET=1) with
Triton 3.5 or 3.6 and numpy >= 2.4, whose interpreter converts a 1-element array with int()
(a TypeError since numpy 2.4; Triton 3.7 squeezes it first).

    internal                                    read by                 without it
    torch._C._len_torch_dispatch_stack          function.traced         the mode stack of torch.utils._python_dispatch
    torch._C._are_functorch_transforms_active   function, eager         "active": Function.apply's path (slower, correct)
    the C launch function of Triton's           kernels/launch.py       Triton's own launch (kernel.run), for any
      CudaLauncher (C_LAUNCH_LAYOUTS)                                   Triton not listed
    knobs.runtime.launch_enter_hook, driver,    kernels/, tune/,        tests/test_versions.py checks each on the
      Autotuner .fn .configs .cache             report/                 installed Triton and names the version
      .best_config, JITFunction .arg_names
    OpOverload.py_impl(DispatchKey.            decompose.py            none (import fails): present on torch 2.9-2.15;
      CompositeImplicitAutograd)                                        the version matrix imports it on each pair,
                                                                        tests/test_onnx.py exercises it
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional

import torch
import triton


def version_tuple(text: str) -> tuple:
    """'2.9.1+cu128' -> (2, 9, 1); '3.6.0' -> (3, 6, 0); missing parts are 0."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part or 0) for part in match.groups())


TORCH = version_tuple(torch.__version__)
TRITON = version_tuple(triton.__version__)
MIN_TORCH = (2, 9)
MIN_TRITON = (3, 5)

if TRITON[:2] < MIN_TRITON:
    raise ImportError(f"triton_bn needs Triton >= {'.'.join(map(str, MIN_TRITON))} (it uses "
                      f"triton.constexpr_function); this Python has Triton {triton.__version__}. "
                      f"Install torch >= {'.'.join(map(str, MIN_TORCH))}, which brings a Triton that fits.")


def _check_interpreter_numpy() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or TRITON[:2] >= (3, 7):
        return
    import numpy
    if version_tuple(numpy.__version__)[:2] >= (2, 4):
        raise ImportError(f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with numpy >= 2.4 "
                          f"(this Python has numpy {numpy.__version__}): pip install 'numpy<2.4', or Triton >= 3.7 "
                          "(torch >= 2.12)")


_check_interpreter_numpy()

# The C launch function of Triton's CudaLauncher (triton/backends/nvidia/driver.py), by version.
#   "varargs" (3.5, 3.6): each kernel's own compiled launcher module:
#       launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch,
#              packed_metadata, launch_metadata, enter_hook, exit_hook, *args)
#   "packed" (3.7 - 3.9): driver.c's one launch function, the arguments in one tuple:
#       launch(gx, gy, gz, stream, function, cooperative, pdl, packed_metadata, launch_metadata,
#              enter_hook, exit_hook, global_scratch, profile_scratch, arg_annotations,
#              kernel_signature, args)
# A Triton not listed launches through its own Python path until its signature is read and added.
C_LAUNCH_LAYOUTS = {(3, 5): "varargs", (3, 6): "varargs", (3, 7): "packed", (3, 8): "packed", (3, 9): "packed"}
C_LAUNCH_LAYOUT: Optional[str] = C_LAUNCH_LAYOUTS.get(TRITON[:2])


def _pick_len_dispatch_stack(torch_c, python_dispatch) -> Callable[[], int]:
    """How many torch dispatch modes are active: torch._C's counter, else the Python mode stack."""
    counter = getattr(torch_c, "_len_torch_dispatch_stack", None)
    if counter is not None:
        return counter
    stack = getattr(python_dispatch, "_get_current_dispatch_mode_stack", None)
    if stack is not None:
        return lambda: len(stack())
    raise ImportError(f"torch {torch.__version__} has neither torch._C._len_torch_dispatch_stack nor "
                      "torch.utils._python_dispatch._get_current_dispatch_mode_stack: triton_bn cannot tell "
                      "traced calls from eager ones")


def _pick_functorch_active(torch_c) -> Callable[[], bool]:
    """Whether a torch.func transform is active; without torch's query, always (the slower
    Function.apply path, right under transforms and outside them)."""
    query = getattr(torch_c, "_are_functorch_transforms_active", None)
    return query if query is not None else (lambda: True)


def _python_dispatch():
    import torch.utils._python_dispatch as module
    return module


len_dispatch_stack: Callable[[], int] = _pick_len_dispatch_stack(torch._C, _python_dispatch())
functorch_transforms_active: Callable[[], bool] = _pick_functorch_active(torch._C)
