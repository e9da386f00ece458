"""Pictures of tuning files: a heatmap of every candidate, the winners' % of copy, two files compared.

Tool layer (triton_bn.tune); needs matplotlib (the ``perf`` extra), imported only here. Plots
are drawn from the file alone, so they can be redrawn anywhere.

* heatmap: one panel per kernel, a row per shape, a column per config; each cell is the
  candidate's time over the fastest candidate of its row (1.00 = best), the chosen config
  boxed, blank where pruning dropped the config.
* copy bars: the winners' GB/s as a % of the measured copy ceiling, per shape and kernel.
* compare: per shape and kernel, time in file A / time in file B of the chosen configs
  (> 1: B is faster), the shape's total as a diamond.

A file made by the interpreter has no times (its benchmarker returns 0): its heatmap shows
the wall time of one interpreted run instead, every title says it is not a measurement, and
it gets no copy bars (there is no copy ceiling to divide by).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .machine import NOT_A_MEASUREMENT
from .store import config_label
from .table import file_title, shape_label, short_kernel

KERNEL_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install -e '.[perf]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _basis(data: dict) -> Tuple[str, str]:
    """(candidate field, what it is): benchmarker medians, or interpreter wall times."""
    if data["measured"]:
        return "ms", "median time (the library's benchmarker)"
    return "wall_ms", f"{NOT_A_MEASUREMENT}: wall time of one interpreted run"


def _config_order(stored: dict):
    kwargs = stored["kwargs"]
    if "BLOCK_R" in kwargs and "BLOCK_K" in kwargs:  # the library's order: big tiles, then narrow BLOCK_K
        return (0, -kwargs["BLOCK_R"] * kwargs["BLOCK_K"], kwargs["BLOCK_K"], stored.get("num_warps") or 0)
    return (1, 0, 0, config_label(stored))


def _kernel_rows(data: dict) -> Dict[str, List[Tuple[str, dict]]]:
    """kernel -> [(row label, entry)] in shape order; a shape with two keys of one kernel
    (e.g. training and eval normalize) gets a row per key."""
    rows: Dict[str, List[Tuple[str, dict]]] = {}
    for record in data["shapes"]:
        per_kernel: Dict[str, List[dict]] = {}
        for index in record["entries"]:
            entry = data["entries"][index]
            per_kernel.setdefault(entry["kernel"], []).append(entry)
        for kernel, entries in per_kernel.items():
            for n, entry in enumerate(entries):
                suffix = f" (key {n + 1})" if len(entries) > 1 else ""
                rows.setdefault(kernel, []).append((shape_label(record) + suffix, entry))
    return rows


def heatmap(data: dict, path) -> Path:
    plt = _pyplot()
    import numpy as np
    from matplotlib.patches import Rectangle

    field, what = _basis(data)
    rows = _kernel_rows(data)
    panels = []
    for kernel, kernel_rows in rows.items():
        configs = {}
        for _, entry in kernel_rows:
            for c in entry["candidates"]:
                configs[config_label(c["config"])] = c["config"]
        columns = sorted(configs, key=lambda label: _config_order(configs[label]))
        values = np.full((len(kernel_rows), len(columns)), np.nan)
        chosen = []
        for r, (_, entry) in enumerate(kernel_rows):
            times = {config_label(c["config"]): c.get(field) for c in entry["candidates"]}
            best = min((t for t in times.values() if t), default=None)
            for label, t in times.items():
                # a lone, unbenchmarked candidate is its row's best by definition
                values[r, columns.index(label)] = 1.0 if len(times) == 1 else (t / best if t and best else np.nan)
            chosen.append(columns.index(config_label(entry["winner"])))
        panels.append((kernel, [label for label, _ in kernel_rows], columns, values, chosen))

    # one panel per kernel, stacked: long shape labels fit on the left, configs below each
    heights = [len(p[1]) + 2.2 for p in panels]
    n_columns = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(3.2 + 0.62 * n_columns, 0.3 * sum(heights) + 1.0),
                             gridspec_kw={"height_ratios": heights}, squeeze=False, layout="constrained")
    finite = [v for p in panels for v in p[3].ravel() if np.isfinite(v)]
    vmax = max(1.5, min(3.0, max(finite, default=1.5)))
    image = None
    for ax, (kernel, labels, columns, values, chosen) in zip(axes[:, 0], panels):
        image = ax.imshow(np.ma.masked_invalid(values), cmap="magma_r", vmin=1.0, vmax=vmax, aspect="auto")
        ax.set_facecolor("#eeeeee")  # pruned: not a candidate for that shape
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(short_kernel(kernel), fontsize=9, loc="left")
        for r, row in enumerate(values):
            for c, v in enumerate(row):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 1 + 0.6 * (vmax - 1) else "black")
            ax.add_patch(Rectangle((chosen[r] - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="tab:cyan", linewidth=2))
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6, pad=0.02,
                 label="time / best time of the row" if data["measured"] else "interpreter wall / best of the row")
    fig.suptitle(f"Autotune candidates per shape: {what},\nrelative to the row's fastest (1.00); "
                 f"box = config chosen\n{file_title(data)}", fontsize=9)
    _watermark(fig, data)
    return _save(fig, plt, path)


def copy_bars(data: dict, path) -> Optional[Path]:
    """The winners' % of the copy ceiling; None (nothing drawn) without a measured ceiling."""
    copy = data.get("copy_gbps")
    if not data["measured"] or not copy:
        return None
    plt = _pyplot()
    rows = _kernel_rows(data)
    shapes = list(dict.fromkeys(label for kernel_rows in rows.values() for label, _ in kernel_rows))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.7 * len(shapes) + 2), 4.8))
    for k, (kernel, kernel_rows) in enumerate(rows.items()):
        xs, ys = [], []
        for label, entry in kernel_rows:
            ms = next((c["ms"] for c in entry["candidates"] if c["config"] == entry["winner"]), None)
            if ms and entry.get("bytes"):
                xs.append(shapes.index(label) + (k - (len(rows) - 1) / 2) * width)
                ys.append(100 * entry["bytes"] / ms / 1e6 / copy)
        ax.bar(xs, ys, width, label=short_kernel(kernel), color=KERNEL_COLORS[k % len(KERNEL_COLORS)])
    ax.axhline(100, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(shapes)), shapes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"% of copy bandwidth ({copy:.0f} GB/s)")
    ax.set_title(f"Chosen configs: GB/s as % of a device copy\n{file_title(data)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def _shape_id(record: dict):
    return (tuple(record["shape"]), record["dtype"], record.get("param_dtype"), record["channels_last"],
            record.get("weight", True), record.get("bias", True))


def _winner_times(data: dict, record: dict, field: str) -> Dict[str, Tuple[Optional[float], str]]:
    """kernel -> (sum over its entries of the chosen config's time, chosen config labels)."""
    out: Dict[str, Tuple[Optional[float], str]] = {}
    for index in record["entries"]:
        entry = data["entries"][index]
        t = next((c.get(field) for c in entry["candidates"] if c["config"] == entry["winner"]), None)
        total, labels = out.get(entry["kernel"], (0.0, ""))
        out[entry["kernel"]] = (None if t is None or total is None else total + t,
                                "/".join(filter(None, [labels, config_label(entry["winner"])])))
    return out


def comparison(a: dict, b: dict) -> List[dict]:
    """Rows (shape, kernel, config and time in each file, speedup a/b), shapes in both files."""
    if a["measured"] != b["measured"]:
        raise ValueError("cannot compare a measured file with one made by the CPU interpreter")
    field, _ = _basis(a)
    b_records = {_shape_id(r): r for r in b["shapes"]}
    rows = []
    for record in a["shapes"]:
        other = b_records.get(_shape_id(record))
        if other is None:
            continue
        times_a, times_b = _winner_times(a, record, field), _winner_times(b, other, field)
        for kernel in [k for k in times_a if k in times_b] + ["total"]:
            if kernel == "total":
                ta = sum(t for t, _ in times_a.values()) if all(t for t, _ in times_a.values()) else None
                tb = sum(t for t, _ in times_b.values()) if all(t for t, _ in times_b.values()) else None
                ca = cb = ""
            else:
                (ta, ca), (tb, cb) = times_a[kernel], times_b[kernel]
            rows.append({"shape": shape_label(record), "kernel": kernel, "config_a": ca, "time_a": ta,
                         "config_b": cb, "time_b": tb, "speedup": ta / tb if ta and tb else None})
    return rows


def compare_plot(a: dict, b: dict, names: Tuple[str, str], path) -> Path:
    plt = _pyplot()
    rows = comparison(a, b)
    if not rows:
        raise ValueError(f"{names[0]} and {names[1]} have no shape in common")
    _, what = _basis(a)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows if r["kernel"] != "total"))
    height = 0.8 / max(1, len(kernels))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shapes) * max(1, len(kernels)) ** 0.5 + 2.6))
    for k, kernel in enumerate(kernels):
        ys, xs = [], []
        for r in rows:
            if r["kernel"] == kernel and r["speedup"]:
                ys.append(shapes.index(r["shape"]) + (k - (len(kernels) - 1) / 2) * height)
                xs.append(r["speedup"])
        ax.barh(ys, [x - 1 for x in xs], height, left=1, label=short_kernel(kernel),
                color=KERNEL_COLORS[k % len(KERNEL_COLORS)])
    totals = [(shapes.index(r["shape"]), r["speedup"]) for r in rows if r["kernel"] == "total" and r["speedup"]]
    if totals:
        ax.scatter([s for _, s in totals], [y for y, _ in totals], marker="D", color="black", zorder=3,
                   label="all tuned kernels")
    ax.axvline(1, color="black", linewidth=1)
    ax.set_xscale("log")
    _speedup_axis(ax.xaxis)
    ax.set_yticks(range(len(shapes)), shapes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"time in {names[0]} / time in {names[1]}  (> 1: {names[1]} faster)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3, which="both")
    _watermark(fig, a, b)
    ax.set_title(f"{names[1]} vs {names[0]}, chosen configs, {what}\nA: {file_title(a)}\nB: {file_title(b)}",
                 fontsize=9)
    return _save(fig, plt, path)


def _watermark(fig, *files: dict):
    """Across the figure, for any file made by the interpreter: these are not measurements."""
    if any(not f["measured"] for f in files):
        fig.text(0.5, 0.5, "CPU interpreter\nnot a measurement", ha="center", va="center", rotation=25,
                 fontsize=30, color="gray", alpha=0.18, zorder=10)


def _speedup_axis(axis):
    from matplotlib.ticker import FixedLocator, FuncFormatter
    axis.set_major_locator(FixedLocator([0.1, 0.2, 0.33, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10]))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
