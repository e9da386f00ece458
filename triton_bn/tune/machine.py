"""Which machine a tuning file was made on, and whether it is this one.

Tool layer (triton_bn.tune): above the kernels, reads only ``triton_bn.kernels.tuning``.
A file records the device (GPU name, or the Triton CPU interpreter), its SM count, and the
triton / torch / triton_bn versions. Configs chosen on one GPU or by one Triton version are
not evidence for another, so a mismatch is named in a warning (docs/tuning.md).
"""
from __future__ import annotations

import datetime
import platform
from typing import Optional

import torch
import triton

from ..kernels.tuning import interpreting

INTERPRETER_DEVICE = "Triton CPU interpreter"
NO_KERNELS_DEVICE = "CPU without Triton kernels (torch fallback)"
# Every table header, plot title and file made under the interpreter carries this.
NOT_A_MEASUREMENT = "CPU interpreter \N{EM DASH} not a measurement"


def on_gpu() -> bool:
    """The kernels run on a GPU (CUDA present and the interpreter not chosen)."""
    return torch.cuda.is_available() and not interpreting()


def describe() -> dict:
    """This machine as a tuning file records it."""
    import triton_bn  # at call time: the package may still be importing when TRITON_BN_TUNING is read

    sm_count = None
    if on_gpu():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device, sm_count = props.name, props.multi_processor_count
    elif interpreting():
        device = INTERPRETER_DEVICE
    else:
        device = NO_KERNELS_DEVICE
    return {"device": device, "sm_count": sm_count, "interpreter": interpreting(),
            "triton": triton.__version__, "torch": torch.__version__,
            "triton_bn": getattr(triton_bn, "__version__", "unknown"), "python": platform.python_version()}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _where(machine: dict, with_sms: bool) -> str:
    sms = f" ({machine.get('sm_count')} SMs)" if with_sms else ""
    return f"'{machine.get('device')}'{sms} with triton {machine.get('triton')}"


def mismatch(made: dict, here: dict) -> Optional[str]:
    """"was made on X; this is Y" when device, SM count or triton version differ, else None.

    The SM count is named only when the device names agree (e.g. two MIG slices of one GPU):
    the reduction split, hence the best tile, depends on it."""
    same_name = made.get("device") == here.get("device")
    same_sms = made.get("sm_count") == here.get("sm_count")
    if same_name and same_sms and made.get("triton") == here.get("triton"):
        return None
    with_sms = same_name and not same_sms
    return f"was made on {_where(made, with_sms)}; this is {_where(here, with_sms)}"
