"""How ``--shapes`` rows are printed: one row per (case, kernel, config), then a summary of
the worst row per (path, kernel, variant, dtype, layout) against the issue budget."""
from __future__ import annotations

from typing import Dict, List

from .budget import budget

KERNEL_ORDER = ["stats_partial", "stats_combine", "normalize", "backward_partial", "backward_dx"]


def with_budget(row: dict) -> dict:
    """The row plus ``bytes_tensors`` (tile tensors read + written per element) and ``budget``
    (instructions per element at full bandwidth, budget.py); ``over_budget`` when the
    instructions per element exceed it."""
    if "error" in row:
        return row
    moved = row.get("tile_load_tensors", 0) + row.get("tile_store_tensors", 0)
    limit = budget(row["dtype"], moved)
    ipe = row.get("instructions_per_element")
    return dict(row, tensors_moved=moved, budget=limit,
                over_budget=bool(limit is not None and ipe is not None and ipe > limit))


def _ipe(row) -> str:
    ipe = row.get("instructions_per_element")
    if ipe is None:
        return "-" if row.get("loop") == "none" else "?"
    return f"{ipe:.1f}" + (" !" if row.get("over_budget") else "")


def _region(row) -> str:
    if row.get("loop") == "loop":
        return "loop" + (f" x{row['loop_count']}" if row["loop_count"] > 1 else "")
    note = row.get("loop_note")
    return row.get("loop", "-") + (f" ({note})" if note else "")


def _div(row) -> str:
    calls = [c.split("__cuda_")[-1] for c in row.get("loop_calls", []) if "div" in c or "rem" in c]
    return ",".join(calls) if row.get("loop_div") else "-"


def _bits(bits: int) -> str:
    return str(bits) if bits else "-"


COLUMNS = [
    ("path", lambda r: r["path"]),
    ("shape", lambda r: r["shape"]),
    ("dtype", lambda r: r["dtype"]),
    ("layout", lambda r: r["layout"]),
    ("kernel", lambda r: r["name"]),
    ("variant", lambda r: r["variant"]),
    ("config", lambda r: r["config_label"] + ("" if r["autotuned"] else " (fixed)")),
    ("regs", lambda r: str(r["regs"])),
    ("spill", lambda r: str(r["spill_bytes"])),
    ("occ", lambda r: f"{r['occupancy']:.2f}"),
    ("tile LDG", lambda r: _bits(r["tile_ldg_min"]) if r["tile_lines"] else "-"),
    ("tile STG", lambda r: _bits(r["tile_stg_min"]) if r["tile_lines"] else "-"),
    ("L2 hint", lambda r: r.get("l2_hints") or "-"),
    ("instr/elem", _ipe),
    ("budget", lambda r: "-" if r.get("budget") is None else f"{r['budget']:.1f}"),
    ("region", _region),
    ("div call", _div),
]


def sort_key(row):
    name = row["name"]
    return (row["path"], KERNEL_ORDER.index(name) if name in KERNEL_ORDER else len(KERNEL_ORDER), name,
            row["variant"], row["layout"], row["dtype"], row["C"], row["H"], row["N"], -row["num_warps"],
            [v for _, v in row["config"]])


def summary(rows: List[dict]) -> List[dict]:
    """Per (path, kernel, variant, dtype, layout): the best and worst instructions per element
    (and where the worst is), its budget, the largest spill, whether any row calls a division subroutine in its
    main loop, the narrowest tile accesses, and how many rows are over budget / spill."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["path"], row["name"], row["variant"], row["dtype"], row["layout"]), []).append(row)
    out = []
    for (path, name, variant, dtype, layout), members in groups.items():
        counted = [r for r in members if r.get("instructions_per_element") is not None]
        worst = max(counted, key=lambda r: r["instructions_per_element"], default=None)
        best = min(counted, key=lambda r: r["instructions_per_element"], default=None)
        out.append(dict(
            path=path, name=name, variant=variant, dtype=dtype, layout=layout, rows=len(members),
            best_ipe=best and best["instructions_per_element"],
            worst_ipe=worst and worst["instructions_per_element"], worst_at=worst and
            f"{worst['shape']} {worst['config_label']}", budget=worst and worst.get("budget"),
            over_budget=sum(bool(r.get("over_budget")) for r in members),
            max_spill=max(r["spill_bytes"] for r in members), spilling=sum(r["spill_bytes"] > 0 for r in members),
            max_regs=max(r["regs"] for r in members), loop_div=sum(bool(r.get("loop_div")) for r in members),
            tile_ldg=sorted({r["tile_ldg_min"] for r in members if r["tile_lines"] and r["tile_ldg_min"]}),
            tile_stg=sorted({r["tile_stg_min"] for r in members if r["tile_lines"] and r["tile_stg_min"]}),
            unknown=sum(r.get("instructions_per_element") is None and r.get("loop") != "none" for r in members),
        ))
    return sorted(out, key=lambda s: (s["path"], KERNEL_ORDER.index(s["name"]) if s["name"] in KERNEL_ORDER
                                      else len(KERNEL_ORDER), s["variant"], s["layout"], s["dtype"]))


SUMMARY_COLUMNS = [
    ("path", lambda s: s["path"]),
    ("kernel", lambda s: s["name"]),
    ("variant", lambda s: s["variant"]),
    ("dtype", lambda s: s["dtype"]),
    ("layout", lambda s: s["layout"]),
    ("rows", lambda s: str(s["rows"])),
    ("best instr/elem", lambda s: "-" if s["best_ipe"] is None else f"{s['best_ipe']:.1f}"),
    ("worst instr/elem", lambda s: "-" if s["worst_ipe"] is None else f"{s['worst_ipe']:.1f}"),
    ("budget", lambda s: "-" if s["budget"] is None else f"{s['budget']:.1f}"),
    ("at", lambda s: s["worst_at"] or "-"),
    ("over", lambda s: str(s["over_budget"])),
    ("spilling", lambda s: f"{s['spilling']} (max {s['max_spill']} B)" if s["spilling"] else "0"),
    ("max regs", lambda s: str(s["max_regs"])),
    ("div in loop", lambda s: str(s["loop_div"])),
    ("tile LDG", lambda s: "/".join(map(str, s["tile_ldg"])) or "-"),
    ("tile STG", lambda s: "/".join(map(str, s["tile_stg"])) or "-"),
    ("unknown", lambda s: str(s["unknown"])),
]
