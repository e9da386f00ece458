"""CSV -> a short text summary: the ResNet-50 goals, then every sweep's speedups apart.

Goals (from the issues), on ResNet-50's BatchNorm shapes only:
  1. every op >= 1.0x torch on every ResNet-50 shape;
  2. geomean fwd+bwd >= 1.5x torch over the network's 53 BN layers: each shape's speedup
     weighs as many times as layers have that shape (resnet50_layers; the CSV's ``layers``).
The size, channel and BatchNorm1d sweeps are reported each in its own table, never mixed into
the goal: C = 3 with a huge spatial extent is where torch is weakest, and would flatter it.
The masked sweep (issue 20) has no torch kernel to beat: its 'torch' and 'torch_compile' rows
are the torch composition a user writes (perf/masked.py), and a table of its own gives
triton_bn's speedup over it per valid fraction.
"""
from __future__ import annotations

import math
from collections import defaultdict

from .bytes_model import OPS, best_share_of_copy
from .env import CPU_LABEL
from .resnet50_layers import LAYERS, SHAPES
from .results import SPEEDUP_BASELINES, is_cpu_run

ERRORS_LISTED = 12
GOAL_SWEEP = "resnet50"
MASKED_SWEEP = "masked"
SWEEP_ORDER = (GOAL_SWEEP, "size", "channels", "bn1d", MASKED_SWEEP)


def geomean(values, weights=None) -> float:
    """Weighted geometric mean; pairs whose value is missing (None, 0) are left out."""
    weights = [1.0] * len(values) if weights is None else weights
    pairs = [(v, w) for v, w in zip(values, weights) if v and w]
    total = sum(w for _, w in pairs)
    return math.exp(sum(w * math.log(v) for v, w in pairs) / total) if pairs else float("nan")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _weight(row: dict, weighted: bool) -> float:
    return (row.get("layers") or 0) if weighted else 1.0


def _ours(rows, sweep=None) -> list:
    return [r for r in rows if r["impl"] == "triton_bn" and r["status"] == "ok"
            and (sweep is None or r["sweep"] == sweep)]


def speedup_table(rows, weighted: bool = False) -> list:
    """One line per (op, dtype, layout) of triton_bn's ok rows: geomean speedup over each
    baseline (weighted by ``layers`` when ``weighted``), median % of ceiling, worst shape."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["dtype"], r["layout"])].append(r)
    lines = [f"{'op':<14}{'dtype':<10}{'layout':<14}{'shapes':>6}"
             + "".join(f"{'vs ' + b:>18}" for b in SPEEDUP_BASELINES)
             + f"{'% ceiling (med)':>17}{'best 3-pass':>12}   worst shape vs torch"]
    order = {op: i for i, op in enumerate(OPS)}
    for (op, dtype, layout), group in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1:])):
        weights = [_weight(r, weighted) for r in group]
        means = [geomean([r[f"speedup_vs_{b}"] for r in group], weights) for b in SPEEDUP_BASELINES]
        pcts = sorted(r["pct_of_ceiling"] for r in group if r["pct_of_ceiling"] is not None)
        median_pct = pcts[len(pcts) // 2] if pcts else None
        vs_torch = [r for r in group if r["speedup_vs_torch"]]
        worst = min(vs_torch, key=lambda r: r["speedup_vs_torch"]) if vs_torch else None
        valid = f" {worst['valid']:.0%} valid" if worst and worst.get("valid") is not None else ""
        worst_text = f"{worst['shape']}{valid} ({worst['speedup_vs_torch']:.2f}x)" if worst else "-"
        lines.append(f"{op:<14}{dtype:<10}{layout:<14}{len(group):>6}" + "".join(f"{_fmt(m):>18}" for m in means)
                     + f"{_pct(median_pct):>17}{100 * best_share_of_copy(op):>11.0f}%   {worst_text}")
    return lines


def coverage(rows) -> tuple:
    """(distinct ResNet-50 shapes, layers they account for) among triton_bn's goal rows."""
    shapes = {}
    for r in _ours(rows, GOAL_SWEEP):
        if r.get("layers"):
            shapes[(r["C"], r["spatial"])] = r["layers"]
    return len(shapes), sum(shapes.values())


def goal_lines(rows) -> list:
    ours = [r for r in _ours(rows, GOAL_SWEEP) if r["speedup_vs_torch"] and r.get("layers")]
    if not ours:
        return ["goals: no ResNet-50 rows with a torch baseline in this CSV; not evaluated"]
    n_shapes, n_layers = coverage(rows)
    lines = [f"goals on ResNet-50 shapes only ({n_shapes} of {len(SHAPES)} shapes, {n_layers} of {len(LAYERS)} "
             f"BN layers in this suite; the other sweeps are not counted)"]
    slower = [r for r in ours if r["speedup_vs_torch"] < 1.0]
    lines.append(f"goal: every op >= 1.0x torch on every ResNet-50 shape: {len(ours) - len(slower)} of {len(ours)} "
                 f"(op, shape) rows meet it" + (" -- MET" if not slower else ""))
    for r in sorted(slower, key=lambda r: r["speedup_vs_torch"])[:ERRORS_LISTED]:
        lines.append(f"    below: {r['op']} {r['shape']} {r['dtype']} {r['layout']} ({r['layers']} layers): "
                     f"{r['speedup_vs_torch']:.2f}x")
    fb = [r for r in ours if r["op"] == "fwd+bwd"]
    overall = geomean([r["speedup_vs_torch"] for r in fb], [r["layers"] for r in fb])
    lines.append(f"goal: geomean fwd+bwd >= 1.5x torch, over layers (each shape weighted by its layer count): "
                 f"{_fmt(overall)}x" + (" -- MET" if overall == overall and overall >= 1.5 else ""))
    parts = defaultdict(list)
    for r in fb:
        parts[(r["dtype"], r["layout"], r["N"])].append(r)
    for (dtype, layout, batch), group in sorted(parts.items()):
        mean = geomean([r["speedup_vs_torch"] for r in group], [r["layers"] for r in group])
        lines.append(f"    {dtype} {layout} batch {batch}: {_fmt(mean)}x over {sum(r['layers'] for r in group)} layers")
    return lines


def sweep_lines(rows) -> list:
    """Every sweep's own table: the goal sweep weighted by layers, the others plainly."""
    lines = []
    sweeps = sorted({r["sweep"] for r in _ours(rows)}, key=lambda s: (SWEEP_ORDER + (s,)).index(s))
    for sweep in sweeps:
        # A CSV without layer counts (written before they existed) gets plain geomeans.
        weighted = sweep == GOAL_SWEEP and any(r.get("layers") for r in _ours(rows, sweep))
        how = "geomean over layers (shapes weighted by layer count)" if weighted else "plain geomean over shapes"
        against = "; vs torch / torch_compile: the torch composition" if sweep == MASKED_SWEEP else ""
        lines += [f"sweep {sweep}: triton_bn's speedup, {how}"
                  + ("" if weighted else f" (not in the goals{against})"),
                  *speedup_table(_ours(rows, sweep), weighted), ""]
    return lines


def masked_lines(rows) -> list:
    """triton_bn's speedup over the torch composition per valid fraction, 'eager / compiled':
    the geomean over the masked shapes of the composition's time / triton_bn's."""
    ours = _ours(rows, MASKED_SWEEP)
    fractions = sorted({r["valid"] for r in ours if r.get("valid") is not None})
    if not fractions:
        return []
    groups = defaultdict(list)
    for r in ours:
        groups[(r["op"], r["dtype"], r["layout"])].append(r)
    order = {op: i for i, op in enumerate(OPS)}
    lines = ["masked: triton_bn's speedup over the torch composition per valid fraction, eager / torch.compile "
             "(geomean over shapes)",
             f"{'op':<14}{'dtype':<10}{'layout':<14}" + "".join(f"{f'{v:.0%} valid':>16}" for v in fractions)]
    for (op, dtype, layout), group in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1:])):
        cells = []
        for v in fractions:
            at = [r for r in group if r.get("valid") == v]
            eager, compiled = (geomean([r[f"speedup_vs_{b}"] for r in at]) for b in ("torch", "torch_compile"))
            cells.append(f"{_fmt(eager)} / {_fmt(compiled)}" if at else "")
        lines.append(f"{op:<14}{dtype:<10}{layout:<14}" + "".join(f"{c:>16}" for c in cells))
    return lines + [""]


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
    cpu = is_cpu_run(meta)
    banner = [f"*** {CPU_LABEL} ***"] if cpu else []
    lines = banner + [
        f"triton_bn perf summary: suite {meta.get('suite')} on {meta.get('device')} "
        f"(driver {meta.get('driver')}, torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('date')})",
        f"copy ceiling: {meta.get('copy_ceiling_gbps') or '?'} GB/s; speedup = torch variant's median time / "
        f"triton_bn's; '% ceiling' = effective GB/s / copy ceiling; 'best 3-pass' = that share at copy speed", ""]
    scored = cpu_check_lines(rows) if cpu else [*goal_lines(rows), "", *sweep_lines(rows), *masked_lines(rows)]
    lines += [*scored, *problem_lines(rows)]
    return "\n".join(lines + banner) + "\n"


def cpu_check_lines(rows) -> list:
    """What a CPU-interpreter run checked, in place of goals and speed-ups: interpreter times
    against native torch are not a measurement of anything the goals are about, and a table
    of 0.00x ratios reads as a failure."""
    ours = _ours(rows)
    cases = {(r["op"], r["shape"], r["dtype"], r["layout"], r.get("valid")) for r in ours}
    baselines = sorted({r["impl"] for r in rows if r["status"] == "ok" and r["impl"] not in ("triton_bn", "copy")})
    return [
        "what this CPU run checked (no speed is scored here):",
        f"    triton_bn: {len(cases)} (op, shape, dtype, layout) cases ran through Triton's interpreter and matched "
        f"the float64 reference within tolerance (failures are the error rows below)",
        f"    baselines that ran beside it: {', '.join(baselines) or 'none'}",
        "    the CSV, this summary and the plots were written; times are interpreter times, not bandwidth",
        "    the goals (every op >= 1.0x torch on every ResNet-50 shape, fwd+bwd geomean >= 1.5x) are evaluated "
        "only from a GPU run (perf/gpu_check.sh)", ""]
