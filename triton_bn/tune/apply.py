"""Using a tuning file: ``triton_bn.use_tuning(path)`` and ``TRITON_BN_TUNING=path``.

Tool layer (triton_bn.tune), imported by ``triton_bn/__init__`` for these two entry points.
Triton's Autotuner looks a call's key up in its ``cache`` dict before benchmarking and uses
what it finds as is; so applying a file writes each entry's winner, matched to one of the
kernel's own candidate ``triton.Config`` objects, into ``cache[key]`` of the kernel named by
the entry, then drops the recorded launch plans (kernels/launch.py), which hold the configs
chosen before. Keys not in the file autotune as before. Everything is checked here, before any
kernel runs: a bad file raises TuningFileError at ``use_tuning`` (or at ``import triton_bn``
for the environment variable), never inside a launch.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from ..kernels.launch import clear_plans
from ..kernels.tuning import autotuned_kernels
from . import machine
from .store import config_matches, config_text, key_from_json, load


class TuningWarning(UserWarning):
    """A tuning file used with a caveat, or partly or wholly not used."""


@dataclass
class TuningReport:
    path: str
    applied: int = 0  # entries written into an autotune cache
    skipped: List[str] = field(default_factory=list)  # why each other entry was not
    ignored: Optional[str] = None  # why the whole file was not used, if it was not


def _warn(message: str):
    warnings.warn(message, TuningWarning, stacklevel=3)


def _entry_target(entry: dict, kernels: dict):
    """(autotuner, key, config) for an entry, or (None, reason) when it cannot be applied."""
    name = entry["kernel"]
    kernel = kernels.get(name)
    if kernel is None:
        return None, f"{name} (no such autotuned kernel)"
    key = key_from_json(entry["key"])
    if key is None:
        return None, f"{name} (its key holds a value JSON cannot carry)"
    if list(kernel.keys) != entry["key_names"]:
        return None, (f"{name} {key} (the kernel's autotune key is now {list(kernel.keys)}, "
                      f"the file's is {entry['key_names']})")
    config = next((c for c in kernel.configs if config_matches(c, entry["winner"])), None)
    if config is None:
        return None, f"{name} {key} (config {config_text(entry['winner'])} is not among its candidates)"
    return (kernel, key, config), None


def use_tuning(path, strict: bool = False) -> TuningReport:
    """Make every (kernel, key) in the tuning file use the file's config, with no benchmarking.

    Raises TuningFileError for a missing, truncated or malformed file. Warns (TuningWarning)
    and carries on when the file was made on another GPU or Triton version; with
    ``strict=True`` such a file is ignored instead (still a warning). A file made by the CPU
    interpreter is never applied on a GPU. Entries whose kernel or config no longer exists
    are named in a warning and skipped; the others are applied.
    """
    data = load(path)
    report = TuningReport(str(path))
    here = machine.describe()
    if data["interpreter"] and not here["interpreter"]:
        report.ignored = (f"tuning file {path} was made by the Triton CPU interpreter (its times are not "
                          f"measurements): not applying it on '{here['device']}'")
        _warn(report.ignored)
        return report
    mismatch = machine.mismatch(data["machine"], here)
    if mismatch and strict:
        report.ignored = f"tuning file {path} {mismatch}: ignoring it (strict)"
        _warn(report.ignored)
        return report
    if mismatch:
        _warn(f"tuning file {path} {mismatch}: using it anyway")
    kernels = autotuned_kernels()
    for entry in data["entries"]:
        target, reason = _entry_target(entry, kernels)
        if target is None:
            report.skipped.append(reason)
            continue
        kernel, key, config = target
        kernel.cache[key] = config
        report.applied += 1
    if report.applied:
        clear_plans()  # recorded launches hold the configs chosen before; re-plan from the caches
    if report.skipped:
        _warn(f"tuning file {path}: skipped {len(report.skipped)} of {len(data['entries'])} entries: "
              + "; ".join(report.skipped))
    return report


def use_tuning_from_env() -> Optional[TuningReport]:
    """Apply $TRITON_BN_TUNING if set ($TRITON_BN_TUNING_STRICT=1 for strict); run by
    ``import triton_bn``, so a bad file fails the import with its TuningFileError."""
    path = os.environ.get("TRITON_BN_TUNING", "")
    if not path:
        return None
    return use_tuning(path, strict=os.environ.get("TRITON_BN_TUNING_STRICT", "0") == "1")
