"""CSV -> PNGs. Reads only the CSV, so plots can be redrawn anywhere (no GPU, no triton_bn).

Per dtype:
  <stem>-bandwidth-<sweep>-<dtype>.png  effective GB/s vs the sweep's variable, one panel per
                                        (layout, op), a line per implementation, the copy of the
                                        same bytes dashed (the ceiling at that size)
  <stem>-speedup-resnet50-<dtype>.png   triton_bn's speedup over each torch variant on the
                                        ResNet-50 shapes, bars per shape, 1.0 marked
  <stem>-roofline-<dtype>.png           achieved GFLOP/s vs FLOPs per unique byte, with the
                                        measured copy bandwidth and the fp32 peak as ceilings
Every figure of a CPU-interpreter CSV carries that label in its title and across the plot.
"""
from __future__ import annotations

from pathlib import Path

from .bytes_model import COPY, ELEMENT_SIZE, OPS
from .env import CPU_LABEL
from .results import is_cpu_run, meta_float, read_csv

IMPL_STYLE = {"triton_bn": ("tab:red", "o"), "torch": ("tab:blue", "s"), "torch_native": ("tab:green", "^"),
              "torch_compile": ("tab:purple", "D")}
SWEEP_AXIS = {"channels": ("C", "channels C", None), "bn1d": ("N", "rows N (BatchNorm1d input N x C)", None)}
DEFAULT_AXIS = ("input_mb", "input size (MB, one tensor)", None)


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


def _plain_ticks(axis, plt) -> None:
    """Log-axis ticks as plain numbers (3, 64, 4096), not 3x10^0; minor ticks labelled only
    where the axis spans too few decades to show major ones (matplotlib's thresholds)."""
    ticker = plt.matplotlib.ticker

    class PlainLogFormatter(ticker.LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _x(row: dict, sweep: str) -> float:
    field = SWEEP_AXIS.get(sweep, DEFAULT_AXIS)[0]
    if field == "input_mb":
        return row["numel"] * ELEMENT_SIZE[row["dtype"]] / 1e6
    return row[field]


def _finish(fig, path: Path, meta: dict, what: str, dtype: str, plt) -> Path:
    """Title (device, dtype, suite; the CPU label in red), PNG metadata, save, close."""
    title = f"{what}\n{meta.get('device', '?')} \N{EM DASH} {dtype} \N{EM DASH} suite {meta.get('suite', '?')}"
    cpu = is_cpu_run(meta)
    if cpu:
        title += f"\n{CPU_LABEL}"
        fig.text(0.5, 0.45, CPU_LABEL, ha="center", va="center", rotation=15, fontsize=22,
                 color="red", alpha=0.25, wrap=True)
    fig.suptitle(title, color="red" if cpu else "black")
    fig.tight_layout()
    label = CPU_LABEL if cpu else f"GPU measurement on {meta.get('device')}"
    fig.savefig(path, dpi=110, metadata={"Title": title, "Description": label})
    plt.close(fig)
    return path


def plot_bandwidth(meta, rows, sweep: str, dtype: str, path: Path, plt) -> Path:
    sel = [r for r in rows if r["sweep"] == sweep and r["dtype"] == dtype and r["status"] == "ok"]
    layouts = sorted({r["layout"] for r in sel})
    ops = [op for op in OPS if any(r["op"] == op for r in sel)]
    impls = [i for i in IMPL_STYLE if any(r["impl"] == i for r in sel)]
    if not ops:
        return None  # only the copy (or nothing) succeeded: no curve to draw
    ceiling = meta_float(meta, "copy_ceiling_gbps")
    fig, axes = plt.subplots(len(layouts), len(ops), figsize=(4.3 * len(ops), 3.3 * len(layouts) + 1.6),
                             squeeze=False)
    for li, layout in enumerate(layouts):
        copies = sorted((_x(r, sweep), r["gbps"]) for r in sel if r["op"] == COPY and r["layout"] == layout)
        for oi, op in enumerate(ops):
            ax = axes[li][oi]
            for impl in impls:
                pts = sorted((_x(r, sweep), r["gbps"]) for r in sel
                             if r["op"] == op and r["layout"] == layout and r["impl"] == impl)
                if pts:
                    color, marker = IMPL_STYLE[impl]
                    ax.plot(*zip(*pts), marker=marker, color=color, label=impl, ms=4)
            if copies:
                ax.plot(*zip(*copies), "k--", label="copy of same bytes", lw=1)
            if ceiling:
                ax.axhline(ceiling, color="gray", ls=":", lw=1, label=f"copy ceiling {ceiling:.4g} GB/s")
            ax.set_xscale("log")
            _plain_ticks(ax.xaxis, plt)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op}, {layout}", fontsize=10)
            ax.set_xlabel(SWEEP_AXIS.get(sweep, DEFAULT_AXIS)[1], fontsize=8)
            ax.set_ylabel("GB/s (unique bytes / median time)", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _finish(fig, path, meta, f"Effective bandwidth, {sweep} sweep", dtype, plt)


def plot_speedup(meta, rows, dtype: str, path: Path, plt) -> Path:
    sel = [r for r in rows if r["sweep"] == "resnet50" and r["dtype"] == dtype and r["impl"] == "triton_bn"
           and r["status"] == "ok"]
    layouts = sorted({r["layout"] for r in sel})
    ops = [op for op in OPS if any(r["op"] == op for r in sel)]
    baselines = [b for b in ("torch", "torch_native", "torch_compile")
                 if any(r.get(f"speedup_vs_{b}") for r in sel)]
    shapes = list(dict.fromkeys(r["shape"] for r in sel))
    fig, axes = plt.subplots(len(layouts), len(ops), figsize=(max(4.3, 0.45 * len(shapes) + 1.5) * len(ops),
                                                              3.6 * len(layouts) + 1.6), squeeze=False)
    width = 0.8 / max(1, len(baselines))
    for li, layout in enumerate(layouts):
        for oi, op in enumerate(ops):
            ax = axes[li][oi]
            by_shape = {r["shape"]: r for r in sel if r["op"] == op and r["layout"] == layout}
            for bi, baseline in enumerate(baselines):
                values = [(by_shape.get(s) or {}).get(f"speedup_vs_{baseline}") or 0.0 for s in shapes]
                ax.bar([i + (bi - (len(baselines) - 1) / 2) * width for i in range(len(shapes))], values,
                       width, label=f"vs {baseline}", color=IMPL_STYLE[baseline][0])
            ax.axhline(1.0, color="black", lw=1)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{op}, {layout}", fontsize=10)
            ax.set_ylabel("speedup of triton_bn (x)", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    what = "triton_bn speedup on ResNet-50 BatchNorm shapes (>1: faster than torch)"
    return _finish(fig, path, meta, what, dtype, plt)


def plot_roofline(meta, rows, dtype: str, path: Path, plt) -> Path:
    """One panel per op (their intensities nearly coincide), both ceilings in each."""
    sel = [r for r in rows if r["dtype"] == dtype and r["status"] == "ok" and r["op"] != COPY and r["gflops"]]
    ceiling = meta_float(meta, "copy_ceiling_gbps")
    peak = meta_float(meta, "peak_fp32_gflops")
    ops = [op for op in OPS if any(r["op"] == op for r in sel)]
    intensities = [r["intensity"] for r in sel]
    ridge = peak / ceiling if peak and ceiling else None
    lo, hi = min(intensities) / 4, max(max(intensities) * 4, 2 * ridge if ridge else 0)
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 4.6), sharey=True, squeeze=False)
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
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("FLOPs per unique byte", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("achieved GFLOP/s (median, min-max over shapes)", fontsize=8)
    axes[0][0].legend(fontsize=7)
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
        if any(r["op"] != COPY and r["dtype"] == dtype for r in ok):
            written.append(plot_roofline(meta, rows, dtype, out_dir / f"{stem}-roofline-{dtype}.png", plt))
    return [p for p in written if p is not None]
