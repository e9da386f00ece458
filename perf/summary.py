"""CSV -> a short text summary: geomean speedups per (op, dtype, layout), the worst shape, the
share of the copy ceiling, the project's goals, and every error.

Goals (from the issue): every op >= 1.0x torch on every shape; geomean fwd+bwd >= 1.5x torch.
"""
from __future__ import annotations

import math
from collections import defaultdict

from .bytes_model import OPS, best_share_of_copy
from .env import CPU_LABEL
from .results import SPEEDUP_BASELINES, is_cpu_run

ERRORS_LISTED = 12


def geomean(values) -> float:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}%"


def speedup_table(rows) -> list:
    groups = defaultdict(list)
    for r in rows:
        if r["impl"] == "triton_bn" and r["status"] == "ok":
            groups[(r["op"], r["dtype"], r["layout"])].append(r)
    lines = [f"{'op':<14}{'dtype':<10}{'layout':<14}{'shapes':>6}"
             + "".join(f"{'vs ' + b:>18}" for b in SPEEDUP_BASELINES)
             + f"{'% ceiling (med)':>17}{'best 3-pass':>12}   worst shape vs torch"]
    order = {op: i for i, op in enumerate(OPS)}
    for (op, dtype, layout), group in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1:])):
        means = [geomean(r[f"speedup_vs_{b}"] for r in group) for b in SPEEDUP_BASELINES]
        pcts = sorted(r["pct_of_ceiling"] for r in group if r["pct_of_ceiling"] is not None)
        median_pct = pcts[len(pcts) // 2] if pcts else None
        vs_torch = [r for r in group if r["speedup_vs_torch"]]
        worst = min(vs_torch, key=lambda r: r["speedup_vs_torch"]) if vs_torch else None
        worst_text = f"{worst['shape']} ({worst['speedup_vs_torch']:.2f}x)" if worst else "-"
        lines.append(f"{op:<14}{dtype:<10}{layout:<14}{len(group):>6}" + "".join(f"{_fmt(m):>18}" for m in means)
                     + f"{_pct(median_pct):>17}{100 * best_share_of_copy(op):>11.0f}%   {worst_text}")
    return lines


def goal_lines(rows) -> list:
    ours = [r for r in rows if r["impl"] == "triton_bn" and r["status"] == "ok" and r["speedup_vs_torch"]]
    slower = [r for r in ours if r["speedup_vs_torch"] < 1.0]
    lines = [f"goal: every op >= 1.0x torch on every shape: {len(ours) - len(slower)} of {len(ours)} "
             f"(op, shape) rows meet it" + (" -- MET" if ours and not slower else "")]
    for r in sorted(slower, key=lambda r: r["speedup_vs_torch"])[:ERRORS_LISTED]:
        lines.append(f"    below: {r['op']} {r['sweep']} {r['shape']} {r['dtype']} {r['layout']}: "
                     f"{r['speedup_vs_torch']:.2f}x")
    fb = geomean(r["speedup_vs_torch"] for r in ours if r["op"] == "fwd+bwd")
    lines.append(f"goal: geomean fwd+bwd >= 1.5x torch: {_fmt(fb)}x"
                 + (" -- MET" if fb == fb and fb >= 1.5 else ""))
    return lines


def problem_lines(rows) -> list:
    errors = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    lines = [f"errors: {len(errors)} rows (wrong results or failures; never timed)"]
    for r in errors[:ERRORS_LISTED]:
        lines.append(f"    {r['impl']} {r['op']} {r['sweep']} {r['shape']} {r['dtype']} {r['layout']}: {r['detail']}")
    if len(errors) > ERRORS_LISTED:
        lines.append(f"    ... and {len(errors) - ERRORS_LISTED} more (see the CSV's detail column)")
    reasons = sorted({f"{r['impl']}: {r['detail']}" for r in skipped})
    lines.append(f"skipped: {len(skipped)} rows" + ("".join(f"\n    {x}" for x in reasons)))
    return lines


def summarize(meta: dict, rows: list) -> str:
    banner = [f"*** {CPU_LABEL} ***"] if is_cpu_run(meta) else []
    lines = banner + [
        f"triton_bn perf summary: suite {meta.get('suite')} on {meta.get('device')} "
        f"(driver {meta.get('driver')}, torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('date')})",
        f"copy ceiling: {meta.get('copy_ceiling_gbps') or '?'} GB/s; speedup = torch variant's median time / "
        f"triton_bn's; '% ceiling' = effective GB/s / copy ceiling; 'best 3-pass' = that share at copy speed",
        "", "geomean speedup of triton_bn:", *speedup_table(rows), ""]
    if is_cpu_run(meta):
        lines.append("(interpreter times: the goals below are evaluated only to exercise the code)")
    lines += [*goal_lines(rows), "", *problem_lines(rows)]
    return "\n".join(lines + banner) + "\n"
