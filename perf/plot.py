"""CSV -> PNGs. Reads only the CSV, so plots can be redrawn anywhere (no GPU, no triton_bn).

Per dtype, one panel per (op, layout):
  <stem>-bandwidth-<sweep>-<dtype>.png  effective GB/s against the sweep's variable, a line per
                                        implementation, the copy of the same bytes dashed
                                        (masked: against the valid fraction, a line
                                        style per shape; torch = the torch composition)
  <stem>-speedup-resnet50-<dtype>.png   triton_bn's speedup over each torch variant per
                                        ResNet-50 shape, its layer-weighted geomean dashed
  <stem>-speedup-masked-<dtype>.png     triton_bn's speedup over the torch composition (eager,
                                        compiled) against the valid fraction, per shape
  <stem>-roofline-<dtype>.png           achieved GFLOP/s vs FLOPs per unique byte, with the
                                        measured copy bandwidth and the fp32 peak as ceilings
The x ticks are the measured points: ResNet-50 shapes by name (with their layer counts, in
stage order; batch sizes as line styles), sizes, channel and row counts by value.

A CPU-interpreter CSV gets the same files, drawn so that no interpreter time reads as a
measurement: the "bandwidth" figures plot time per call (log axis) instead of GB/s, the
speed-up figures draw grey time ratios marked "not a measurement", and every figure carries
the CPU label in its title and across the plot.
"""
from __future__ import annotations

from pathlib import Path

from .bytes_model import COPY, ELEMENT_SIZE, OPS
from .env import CPU_LABEL
from .results import SPEEDUP_BASELINES, is_cpu_run, meta_float, read_csv
from .summary import geomean

IMPL_STYLE = {"triton_bn": ("tab:red", "o"), "torch": ("tab:blue", "s"), "torch_native": ("tab:green", "^"),
              "torch_compile": ("tab:purple", "D")}
SWEEP_AXIS = {"channels": ("C", "channels C"), "bn1d": ("N", "rows N (BatchNorm1d input N x C)"),
              "resnet50": ("chw", "ResNet-50 BN input C x H x W (layers with that shape)"),
              "masked": ("valid", "valid fraction of the positions (mask; masked BatchNorm1d N x C x L)")}
# Sweeps drawn with a line per value of a column (as line styles): its name and legend label.
LINE_GROUPS = {"resnet50": ("N", "batch {}"), "masked": ("shape", "{}")}
LINEAR_X = ("masked",)  # fractions in (0, 1]: a linear axis
DEFAULT_AXIS = ("input_mb", "input size (MB, one tensor)")
BATCH_STYLES = ("-", "--", ":", "-.")
NOT_A_MEASUREMENT = "not a measurement: interpreted triton_bn vs native torch"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _dims(row: dict) -> list:
    return [int(s) for s in row["shape"].split("x")]


def _x(row: dict, sweep: str):
    field = SWEEP_AXIS.get(sweep, DEFAULT_AXIS)[0]
    if field == "input_mb":
        return row["numel"] * ELEMENT_SIZE[row["dtype"]] / 1e6
    if field == "chw":
        return tuple(_dims(row)[1:])
    return row[field]


def _chw_order(rows) -> list:
    """The (C, H, W) of the rows in stage order: largest spatial size first, then by C."""
    return sorted({tuple(_dims(r)[1:]) for r in rows}, key=lambda chw: (-chw[1] * chw[2], chw[0]))


def _categorical_axis(ax, rows, plt) -> dict:
    """ResNet-50 shapes as named ticks, 'CxHxW (layers)'; returns {(C, H, W): position}."""
    order = _chw_order(rows)
    layers = {tuple(_dims(r)[1:]): r.get("layers") for r in rows}
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{'x'.join(map(str, chw))} ({layers.get(chw) or '?'})" for chw in order],
                       rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(order) - 0.5)
    return {chw: i for i, chw in enumerate(order)}


def _tick_text(v: float) -> str:
    """3, 1024, 0.033, $10^{6}$, $3{\\times}10^{5}$: plain up to 5 digits, powers of ten above."""
    if v >= 1e5:
        mantissa, exponent = f"{v:.1e}".split("e")
        power = f"10^{{{int(exponent)}}}"
        return f"${power}$" if float(mantissa) == 1 else f"${float(mantissa):g}{{\\times}}{power}$"
    return str(int(v)) if v == int(v) else f"{v:.3g}"


def _numeric_axis(ax, xs, plt, log: bool = True) -> None:
    """A log (or linear) axis whose ticks are exactly the measured values, written plainly (3, 64, 4096)."""
    ticker = plt.matplotlib.ticker
    if log:
        ax.set_xscale("log")
    values = sorted(set(xs))
    ax.xaxis.set_major_locator(ticker.FixedLocator(values))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([_tick_text(v) for v in values]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    if len(values) > 6:
        ax.tick_params(axis="x", labelrotation=45)
    if len(values) == 1:
        ax.set_xlim(values[0] / 2, values[0] * 2)
    elif not log:
        margin = 0.05 * (values[-1] - values[0])
        ax.set_xlim(values[0] - margin, values[-1] + margin)


def _y_scale(ax, values, cpu: bool) -> None:
    """CPU: interpreter times on a log axis (they span 4 decades); GPU: GB/s linear from 0 to
    just above the largest value, the copy ceiling included."""
    values = [v for v in values if v]
    if cpu:
        ax.set_yscale("log")
    elif values:
        ax.set_ylim(0, 1.08 * max(values))


def _legend(fig, plt, entries: list, styles: list) -> None:
    """One legend for the figure, below the panels: a line per series (colour and marker),
    then the line styles' labels (batch sizes, shapes) when there are several."""
    line = plt.matplotlib.lines.Line2D
    handles = [line([], [], **style, label=label) for label, style in entries]
    if len(styles) > 1:
        handles += [line([], [], color="0.4", ls=BATCH_STYLES[i % len(BATCH_STYLES)], label=label)
                    for i, label in enumerate(styles)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)


def _batches(rows) -> list:
    return sorted({r["N"] for r in rows})


def _finish(fig, path: Path, meta: dict, what: str, dtype: str, plt) -> Path:
    """Title (device, dtype, suite; the CPU label in red), PNG metadata, save, close. The figures
    use constrained layout, which leaves the multi-line title its room."""
    title = f"{what}\n{meta.get('device', '?')} \N{EM DASH} {dtype} \N{EM DASH} suite {meta.get('suite', '?')}"
    cpu = is_cpu_run(meta)
    if cpu:
        title += f"\n{CPU_LABEL}"
        fig.text(0.5, 0.45, CPU_LABEL, ha="center", va="center", rotation=15, fontsize=22,
                 color="red", alpha=0.25, wrap=True)
    fig.suptitle(title, color="red" if cpu else "black")
    label = CPU_LABEL if cpu else f"GPU measurement on {meta.get('device')}"
    fig.savefig(path, dpi=110, metadata={"Title": title, "Description": label})
    plt.close(fig)
    return path


def _grid(plt, ops, layouts, width: float):
    """{(op, layout): axes}: rows = ops, columns = layouts; a single layout's ops two by two
    (one column would be too narrow for the title)."""
    cells = [(op, layout) for op in ops for layout in layouts]
    columns = len(layouts) if len(layouts) > 1 else min(2, len(ops))
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, 3.2 * rows + 1.8), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(cells):]:
        ax.set_visible(False)
    return fig, dict(zip(cells, flat))


def _panel_width(sweep: str, rows) -> float:
    return max(4.8, 0.42 * len(_chw_order(rows)) + 1.8) if sweep == "resnet50" else 5.2


def plot_bandwidth(meta, rows, sweep: str, dtype: str, path: Path, plt) -> Path:
    sel = [r for r in rows if r["sweep"] == sweep and r["dtype"] == dtype and r["status"] == "ok"]
    layouts = sorted({r["layout"] for r in sel})
    ops = [op for op in OPS if any(r["op"] == op for r in sel)]
    impls = [i for i in IMPL_STYLE if any(r["impl"] == i for r in sel)]
    if not ops:
        return None  # only the copy (or nothing) succeeded: no curve to draw
    cpu = is_cpu_run(meta)
    value = (lambda r: r["time_ms"]) if cpu else (lambda r: r["gbps"])
    ceiling = None if cpu else meta_float(meta, "copy_ceiling_gbps")
    group_key, group_label = LINE_GROUPS.get(sweep, (None, ""))
    groups = sorted({r[group_key] for r in sel}) if group_key else [None]
    series = {impl: dict(color=IMPL_STYLE[impl][0], marker=IMPL_STYLE[impl][1], ms=4) for impl in impls}
    series[COPY] = dict(color="black", lw=1, alpha=0.7)
    series["ceiling"] = dict(color="gray", ls=":", lw=1)
    fig, axes = _grid(plt, ops, layouts, _panel_width(sweep, sel))
    for layout in layouts:
        for op in ops:
            ax = axes[(op, layout)]
            here = [r for r in sel if r["layout"] == layout and r["op"] in (op, COPY)]
            position = _categorical_axis(ax, here, plt) if sweep == "resnet50" else None
            place = (lambda r: position[_x(r, sweep)]) if position else (lambda r: _x(r, sweep))
            plotted = []
            for gi, group in enumerate(groups):
                style = BATCH_STYLES[gi % len(BATCH_STYLES)]
                mine = [r for r in here if group is None or r[group_key] == group]
                for impl in impls + [COPY]:
                    pts = sorted((place(r), value(r)) for r in mine
                                 if r["impl"] == impl and r["op"] == (COPY if impl == COPY else op))
                    if pts:
                        plotted += [v for _, v in pts]
                        ax.plot(*zip(*pts), ls=style, **series[impl])
            if position is None:
                _numeric_axis(ax, [_x(r, sweep) for r in here], plt, log=sweep not in LINEAR_X)
            if ceiling:
                ax.axhline(ceiling, **series["ceiling"])
                plotted.append(ceiling)
            _y_scale(ax, plotted, cpu)
            ax.set_title(f"{op}, {layout}", fontsize=10)
            ax.set_xlabel(SWEEP_AXIS.get(sweep, DEFAULT_AXIS)[1], fontsize=8)
            ax.set_ylabel("interpreter time per call (ms)" if cpu else "GB/s (unique bytes / median time)",
                          fontsize=8)
            ax.grid(alpha=0.3, which="both" if cpu else "major")
    labels = {COPY: "copy of the same bytes" + (" (native)" if cpu else ""),
              "ceiling": f"copy ceiling {ceiling or 0:.4g} GB/s"}
    _legend(fig, plt, [(labels.get(k, k), {k2: v for k2, v in style.items() if k2 != "ls"})
                       for k, style in series.items() if k in impls + [COPY] or (k == "ceiling" and ceiling)],
            [group_label.format(g) for g in groups if g is not None])
    what = (f"Time per call, {sweep} sweep (interpreter: not bandwidth)" if cpu
            else f"Effective bandwidth, {sweep} sweep")
    return _finish(fig, path, meta, what, dtype, plt)


def plot_speedup(meta, rows, dtype: str, path: Path, plt) -> Path:
    """triton_bn's speedup per ResNet-50 shape: a line per (baseline, batch), 1.0 marked, each
    baseline's geomean over layers (every batch) as a thick pale line."""
    sel = [r for r in rows if r["sweep"] == "resnet50" and r["dtype"] == dtype and r["impl"] == "triton_bn"
           and r["status"] == "ok"]
    layouts = sorted({r["layout"] for r in sel})
    ops = [op for op in OPS if any(r["op"] == op for r in sel)]
    baselines = [b for b in SPEEDUP_BASELINES if any(r.get(f"speedup_vs_{b}") for r in sel)]
    batches = _batches(sel)
    cpu = is_cpu_run(meta)
    # Interpreter ratios in grey, told apart by marker only: nothing reads as a result.
    series = {b: dict(color="0.55", marker="os^D"[k], ms=4) if cpu else dict(color=IMPL_STYLE[b][0], marker="o", ms=4)
              for k, b in enumerate(baselines)}
    fig, axes = _grid(plt, ops, layouts, _panel_width("resnet50", sel))
    for layout in layouts:
        for op in ops:
            ax = axes[(op, layout)]
            here = [r for r in sel if r["op"] == op and r["layout"] == layout]
            position = _categorical_axis(ax, here, plt)
            for baseline in baselines:
                key = f"speedup_vs_{baseline}"
                for bi, batch in enumerate(batches):
                    pts = sorted((position[_x(r, "resnet50")], r[key]) for r in here if r["N"] == batch and r[key])
                    if pts:
                        ax.plot(*zip(*pts), ls=BATCH_STYLES[bi % len(BATCH_STYLES)], **series[baseline])
                if not cpu and any(r[key] for r in here):
                    mean = geomean([r[key] for r in here], [r.get("layers") or 1 for r in here])
                    ax.axhline(mean, color=series[baseline]["color"], lw=3, alpha=0.3)
            ax.axhline(1.0, color="black", lw=1)
            if cpu:
                ax.set_yscale("log")
                ax.text(0.5, 0.5, NOT_A_MEASUREMENT, transform=ax.transAxes, ha="center", va="center",
                        fontsize=9, color="0.3", bbox=dict(facecolor="white", edgecolor="0.6", alpha=0.8))
            ax.set_title(f"{op}, {layout}", fontsize=10)
            ax.set_ylabel("time ratio torch / triton_bn" if cpu else "speedup of triton_bn (x)", fontsize=8)
            ax.set_xlabel(SWEEP_AXIS["resnet50"][1], fontsize=8)
            ax.grid(alpha=0.3)
    entries = [(f"vs {b}" + (" (time ratio, not a measurement)" if cpu else ""), series[b]) for b in baselines]
    if not cpu:
        entries.append(("geomean over layers (thick)", dict(color="0.5", lw=3, alpha=0.3)))
    _legend(fig, plt, entries, [f"batch {b}" for b in batches])
    what = ("Time ratios on ResNet-50 stand-ins: NOT speed-ups (interpreter)" if cpu else
            "triton_bn speedup on ResNet-50 BatchNorm shapes (>1: faster than the baseline)")
    return _finish(fig, path, meta, what, dtype, plt)


def plot_masked_speedup(meta, rows, dtype: str, path: Path, plt) -> Path:
    """triton_bn's speedup over the torch composition (eager and compiled) against the valid
    fraction: a line per (baseline, shape), 1.0 marked. Not drawn from a CPU run (time ratios
    of the interpreter mean nothing; the summary says what that run checked)."""
    sel = [r for r in rows if r["sweep"] == "masked" and r["dtype"] == dtype and r["impl"] == "triton_bn"
           and r["status"] == "ok"]
    layouts = sorted({r["layout"] for r in sel})
    ops = [op for op in OPS if any(r["op"] == op for r in sel)]
    baselines = [b for b in SPEEDUP_BASELINES if any(r.get(f"speedup_vs_{b}") for r in sel)]
    shapes = sorted({r["shape"] for r in sel})
    if not baselines:
        return None
    series = {b: dict(color=IMPL_STYLE[b][0], marker="o", ms=4) for b in baselines}
    fig, axes = _grid(plt, ops, layouts, 5.2)
    for layout in layouts:
        for op in ops:
            ax = axes[(op, layout)]
            here = [r for r in sel if r["op"] == op and r["layout"] == layout]
            for baseline in baselines:
                for si, shape in enumerate(shapes):
                    pts = sorted((r["valid"], r[f"speedup_vs_{baseline}"]) for r in here
                                 if r["shape"] == shape and r[f"speedup_vs_{baseline}"])
                    if pts:
                        ax.plot(*zip(*pts), ls=BATCH_STYLES[si % len(BATCH_STYLES)], **series[baseline])
            _numeric_axis(ax, [r["valid"] for r in here], plt, log=False)
            ax.axhline(1.0, color="black", lw=1)
            ax.set_title(f"{op}, {layout}", fontsize=10)
            ax.set_ylabel("speedup of triton_bn (x)", fontsize=8)
            ax.set_xlabel(SWEEP_AXIS["masked"][1], fontsize=8)
            ax.grid(alpha=0.3)
    _legend(fig, plt, [(f"vs {b} (the torch composition)", series[b]) for b in baselines], shapes)
    return _finish(fig, path, meta, "triton_bn speedup on masked batch norm over the torch composition "
                   "(>1: faster)", dtype, plt)


def plot_roofline(meta, rows, dtype: str, path: Path, plt) -> Path:
    """One panel per op (their intensities nearly coincide), both ceilings in each."""
    sel = [r for r in rows if r["dtype"] == dtype and r["status"] == "ok" and r["op"] != COPY and r["gflops"]]
    ceiling = meta_float(meta, "copy_ceiling_gbps")
    peak = meta_float(meta, "peak_fp32_gflops")
    ops = [op for op in OPS if any(r["op"] == op for r in sel)]
    intensities = [r["intensity"] for r in sel]
    ridge = peak / ceiling if peak and ceiling else None
    lo, hi = min(intensities) / 4, max(max(intensities) * 4, 2 * ridge if ridge else 0)
    ticker = plt.matplotlib.ticker
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 4.6), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, op in zip(axes[0], ops):
        if ceiling:
            knee = min(ridge, hi) if ridge else hi
            ax.plot([lo, knee], [ceiling * lo, ceiling * knee], "k--", lw=1, label=f"copy {ceiling:.4g} GB/s")
        if peak:
            ax.plot([ridge or lo, hi], [peak, peak], "k-", lw=1, label=f"fp32 peak {peak:,.0f} GFLOP/s")
        # Implementations are dodged sideways around the op's one intensity, for legibility:
        # a marker is the median over the shapes, its bar spans min to max.
        for k, (impl, (color, marker)) in enumerate(IMPL_STYLE.items()):
            values = sorted(r["gflops"] for r in sel if r["impl"] == impl and r["op"] == op)
            if not values:
                continue
            x = next(r["intensity"] for r in sel if r["op"] == op) * (1.0 + 0.08 * (k - 1.5))
            median = values[len(values) // 2]
            ax.errorbar([x], [median], yerr=[[median - values[0]], [values[-1] - median]], fmt=marker,
                        color=color, ms=6, capsize=3, label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        # 1-2-5 ticks written plainly: matplotlib's minor labels (2x10^-1 ...) of a short span collide.
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("FLOPs per unique byte", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("achieved GFLOP/s (median, min-max over shapes)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    return _finish(fig, path, meta, "Roofline: achieved GFLOP/s vs arithmetic intensity", dtype, plt)


def plot_csv(csv_path, out_dir=None) -> list:
    """Write every figure the CSV supports; [] (and a message) when matplotlib is missing."""
    if not available():
        print("matplotlib is not installed: CSV and summary only, no PNGs")
        return []
    plt = _pyplot()
    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    meta, rows = read_csv(csv_path)
    stem = csv_path.stem
    ok = [r for r in rows if r["status"] == "ok"]
    written = []
    for dtype in dict.fromkeys(r["dtype"] for r in ok):
        for sweep in dict.fromkeys(r["sweep"] for r in ok if r["dtype"] == dtype):
            path = out_dir / f"{stem}-bandwidth-{sweep}-{dtype}.png"
            written.append(plot_bandwidth(meta, rows, sweep, dtype, path, plt))
        if any(r["sweep"] == "resnet50" and r["impl"] == "triton_bn" and r["dtype"] == dtype for r in ok):
            written.append(plot_speedup(meta, rows, dtype, out_dir / f"{stem}-speedup-resnet50-{dtype}.png", plt))
        if not is_cpu_run(meta) and any(r["sweep"] == "masked" and r["dtype"] == dtype for r in ok):
            written.append(plot_masked_speedup(meta, rows, dtype, out_dir / f"{stem}-speedup-masked-{dtype}.png", plt))
        if any(r["op"] != COPY and r["dtype"] == dtype for r in ok):
            written.append(plot_roofline(meta, rows, dtype, out_dir / f"{stem}-roofline-{dtype}.png", plt))
    return [p for p in written if p is not None]
