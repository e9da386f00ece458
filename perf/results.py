"""The CSV: one row per (op, impl, shape, dtype, layout[, valid fraction of a masked case]),
metadata in '# key: value' header lines.

Measuring writes it; plotting and the summary only read it, so both can be redone from a
committed CSV on a machine without a GPU.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

COLUMNS = ("suite", "sweep", "op", "impl", "status", "shape", "N", "C", "spatial", "numel", "dtype",
           "layout", "layers", "valid", "unique_bytes", "time_ms", "time_p20_ms", "time_p80_ms", "gbps",
           "pct_of_ceiling", "gflops", "intensity", "speedup_vs_torch", "speedup_vs_torch_native",
           "speedup_vs_torch_compile", "config", "detail")
INT_COLUMNS = ("N", "C", "spatial", "numel", "layers", "unique_bytes")
# Added after the first CSVs were written; read as empty when absent.
OPTIONAL_COLUMNS = ("layers", "valid")
FLOAT_COLUMNS = ("valid", "time_ms", "time_p20_ms", "time_p80_ms", "gbps", "pct_of_ceiling", "gflops", "intensity",
                 "speedup_vs_torch", "speedup_vs_torch_native", "speedup_vs_torch_compile")
HEADER_KEYS = ("label", "mode", "device", "driver", "torch", "triton", "cuda", "python", "date", "suite",
               "copy_ceiling_gbps", "peak_fp32_gflops", "peak_source")
STATUSES = ("ok", "error", "skipped")
SPEEDUP_BASELINES = ("torch", "torch_native", "torch_compile")


def add_speedups(rows: list) -> None:
    """speedup_vs_<b> = time of baseline b / time of this row, within each (case, op)."""
    groups = {}
    for row in rows:
        groups.setdefault(_case_op_key(row), []).append(row)
    for group in groups.values():
        times = {r["impl"]: r["time_ms"] for r in group if r["status"] == "ok" and r.get("time_ms")}
        for row in group:
            for baseline in SPEEDUP_BASELINES:
                ok = row["status"] == "ok" and baseline in times and row.get("time_ms")
                row[f"speedup_vs_{baseline}"] = times[baseline] / row["time_ms"] if ok else None


def _case_op_key(row: dict) -> tuple:
    return (row["sweep"], row["shape"], row["dtype"], row["layout"], row.get("valid"), row["op"])


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, meta: dict, rows: list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        for key in HEADER_KEYS:
            f.write(f"# {key}: {meta.get(key, '')}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _format(row.get(c)) for c in COLUMNS})
    return path


def write_commented_csv(path: Path, meta: dict, columns, rows: list, float_format: str) -> Path:
    """A CSV whose ``# key: value`` header lines hold ``meta`` (the other perf tools' files:
    host cost, whole-model runs); floats formatted with ``float_format`` (e.g. ".4g")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: (format(row[c], float_format) if isinstance(row.get(c), float) else row.get(c, ""))
                             for c in columns})
    return path


def _parse(column: str, text: str):
    if column in INT_COLUMNS:
        return int(text) if text else None
    if column in FLOAT_COLUMNS:
        return float(text) if text else None
    return text


def read_csv(path: Path) -> tuple:
    """(meta dict, rows with numbers parsed; empty cells -> None)."""
    meta, lines = {}, []
    with Path(path).open(newline="") as f:
        for line in f:
            if line.startswith("# ") and not lines:
                key, _, value = line[2:].rstrip("\n").partition(": ")
                meta[key] = value
            else:
                lines.append(line)
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ()) and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ValueError(f"{path}: not a perf CSV, missing columns {missing}")
    rows = [{c: _parse(c, row.get(c) or "") for c in COLUMNS} for row in reader]
    return meta, rows


def meta_float(meta: dict, key: str) -> Optional[float]:
    try:
        return float(meta.get(key) or "")
    except ValueError:
        return None


def is_cpu_run(meta: dict) -> bool:
    return meta.get("mode") != "gpu"
