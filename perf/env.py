"""Where the harness runs and what it runs on: mode, device name, versions, ceilings, labels.

Two modes. ``gpu``: CUDA tensors, real timings. ``cpu-interpreter``: CPU tensors through
Triton's interpreter; the pipeline (correctness check, CSV, plots) runs end to end, but its
times are interpreter times and every output says so.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from typing import Optional

import torch

GPU = "gpu"
CPU_INTERPRETER = "cpu-interpreter"
CPU_LABEL = "CPU interpreter \N{EM DASH} pipeline check, not a bandwidth measurement"

# Plain fp32 (non-tensor-core) peak, GFLOP/s, by datasheet: the kernels compute in fp32.
# Leads, not readings; a GPU not listed gets an estimate from its multiprocessor count.
PEAK_FP32_GFLOPS = {"h200": 66900.0, "h100": 66900.0, "gh200": 66900.0, "a100": 19500.0,
                    "l40s": 91600.0, "l4": 30300.0, "a10": 31200.0, "rtx 4090": 82600.0}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mode() -> str:
    return GPU if torch.cuda.is_available() and not interpreting() else CPU_INTERPRETER


def device() -> torch.device:
    return torch.device("cuda") if mode() == GPU else torch.device("cpu")


def device_name() -> str:
    if mode() == GPU:
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"


def slug(name: str) -> str:
    """A file-name part for a device: 'NVIDIA H200' -> 'h200'; the interpreter -> 'cpu-interpreter'."""
    if mode() == CPU_INTERPRETER:
        return CPU_INTERPRETER
    return file_slug(re.sub(r"\bnvidia\b", "", name.lower())) or "gpu"


def file_slug(name: str) -> str:
    """A file-name part for any processor name: 'AMD EPYC 7B13 64-Core Processor' -> 'amd-epyc-7b13'."""
    name = re.sub(r"\((r|tm)\)|\b(cpu|processor|\d+-core)\b|@.*$", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def driver_version() -> str:
    if mode() != GPU:
        return "n/a (no GPU)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_fp32_gflops(name: str) -> tuple[Optional[float], str]:
    """(GFLOP/s, where the number comes from); (None, reason) without a GPU."""
    if mode() != GPU:
        return None, "none: no GPU"
    lowered = name.lower()
    for key in sorted(PEAK_FP32_GFLOPS, key=len, reverse=True):
        if key in lowered:
            return PEAK_FP32_GFLOPS[key], "datasheet fp32 (non-tensor) peak"
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    # 128 fp32 lanes per SM (Ampere and later), an FMA = 2 FLOPs, ~1.7 GHz boost: an estimate.
    return sms * 128 * 2 * 1.7, "estimate: SMs x 128 lanes x 2 x 1.7 GHz"


def versions() -> dict:
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda), "python": platform.python_version()}


def header(suite: str) -> dict:
    """The metadata written at the top of every CSV."""
    name = device_name()
    meta = {"label": CPU_LABEL if mode() == CPU_INTERPRETER else "GPU measurement",
            "mode": mode(), "device": name, "driver": driver_version(), **versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "suite": suite}
    peak, source = peak_fp32_gflops(name)
    meta["peak_fp32_gflops"] = "" if peak is None else f"{peak:.0f}"
    meta["peak_source"] = source
    return meta
