"""Reading a tuning file as text: one table per shape, every candidate, the winner marked.

Tool layer (triton_bn.tune). Columns: kernel, config (BLOCK_R x BLOCK_K, warps), median time,
GB/s (the kernel's bytes / time), % of the measured copy ceiling, and ``*`` on the config the
autotuner chose. A file made by the interpreter has no time, GB/s or % (its benchmarker
returns 0); its header says so, and its last column is the wall time of one interpreted run.
"""
from __future__ import annotations

from typing import List, Optional

from .machine import NOT_A_MEASUREMENT
from .store import config_label

SHORT_KERNEL = {"_bn_stats_partial_kernel": "stats partial", "_bn_normalize_kernel": "normalize",
                "_bn_backward_partial_kernel": "backward partial", "_bn_backward_dx_kernel": "backward dx"}


SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def short_kernel(name: str) -> str:
    return SHORT_KERNEL.get(name, name)


def shape_label(record: dict) -> str:
    dtype = SHORT_DTYPE.get(record["dtype"], record["dtype"])
    layout = record.get("layout") or ("channels-last" if record["channels_last"] else "channels-first")
    missing = [name for name in ("weight", "bias") if not record.get(name, True)]
    return f"{'x'.join(map(str, record['shape']))} {dtype} {layout}{' no ' + '/'.join(missing) if missing else ''}"


def gbps(entry: dict, ms: Optional[float]) -> Optional[float]:
    if not ms or entry.get("bytes") is None:
        return None
    return entry["bytes"] / ms / 1e6


def file_title(data: dict) -> str:
    machine = data["machine"]
    where = f"{machine['device']}, triton {machine['triton']}, triton_bn {machine.get('triton_bn', '?')}"
    if not data["measured"]:
        return f"{where} \N{EM DASH} {NOT_A_MEASUREMENT}"
    copy = data.get("copy_gbps")
    return f"{where}, copy ceiling {copy:.0f} GB/s" if copy else where


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def shape_table(data: dict, record: dict) -> str:
    measured = data["measured"]
    copy = data.get("copy_gbps")
    layers = record.get("layers") or []
    shown = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
    used_by = f"  ({len(layers)} layer{'s' * (len(layers) != 1)}: {shown})" if layers else ""
    lines = [f"{shape_label(record)}{used_by}"]
    if not measured:
        lines.append(f"  {NOT_A_MEASUREMENT}: times are not measurements; 'wall ms' is one interpreted run")
    last = "wall ms" if not measured else "% copy"
    lines.append(f"  {'kernel':<18} {'':1} {'config':<11} {'ms':>9} {'GB/s':>8} {last:>8}")
    for index in record["entries"]:
        entry = data["entries"][index]
        for i, candidate in enumerate(entry["candidates"]):
            chosen = "*" if candidate["config"] == entry["winner"] else ""
            kernel = short_kernel(entry["kernel"]) if i == 0 else ""
            ms = candidate.get("ms") if measured else None
            rate = gbps(entry, ms)
            if measured:
                tail = _fmt(rate and copy and 100 * rate / copy, ".1f")
            else:
                tail = _fmt(candidate.get("wall_ms"), ".1f")
            note = "  (only candidate: not benchmarked)" if candidate.get("note") else ""
            lines.append(f"  {kernel:<18} {chosen:1} {config_label(candidate['config']):<11} "
                         f"{_fmt(ms, '.4f'):>9} {_fmt(rate, '.0f'):>8} {tail:>8}{note}")
    return "\n".join(lines)


def file_tables(data: dict) -> List[str]:
    return [shape_table(data, record) for record in data["shapes"]]
