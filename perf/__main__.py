"""Command line: ``python -m perf [run] ...``, ``python -m perf plot CSV``, ``python -m perf summary CSV``.

run (the default) measures a suite into ``<out>/<suite>-<gpu>.csv``, then writes the summary
(``...-summary.txt``, also printed) and the PNGs from that CSV. Without CUDA it runs the ``tiny``
suite through the Triton interpreter and every output name contains 'cpu-interpreter'.
Exit status 1 when any row is an error (a wrong result or a failure), after writing everything.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

from . import env  # noqa: F401  (perf/__init__ has chosen the interpreter if needed)
from .bytes_model import OPS
from .suites import SUITES, suite_cases

COMMANDS = ("run", "plot", "summary")


def _csv_list(text: str):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parse(argv):
    argv = list(argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "run")
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure a suite -> CSV, summary, PNGs (the default command)")
    run.add_argument("--suite", choices=tuple(SUITES), default=None,
                     help="default: 'default' on a GPU, 'tiny' under the CPU interpreter")
    run.add_argument("--out", default="plots", help="output folder (default: plots)")
    run.add_argument("--impls", type=_csv_list, default=None,
                     help="comma list of triton_bn,torch,torch_native,torch_compile (default: all)")
    run.add_argument("--ops", type=_csv_list, default=None, help=f"comma list of {','.join(OPS)}")
    run.add_argument("--dtypes", type=_csv_list, default=None, help="comma list of float32,float16,bfloat16")
    run.add_argument("--layouts", type=_csv_list, default=None, help="comma list of nchw,channels_last,nc")
    run.add_argument("--warmup-ms", type=int, default=10, help="do_bench warm-up per timing (GPU)")
    run.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time per timing (GPU)")
    run.add_argument("--no-plots", action="store_true", help="CSV and summary only")
    run.add_argument("--list", action="store_true", help="print the suite's cases and exit")
    for name, text in (("plot", "redraw the PNGs of a CSV"), ("summary", "print the summary of a CSV")):
        p = sub.add_parser(name, help=text)
        p.add_argument("csv", type=Path)
        p.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's)")
    return parser.parse_args(argv)


def resolve_suite(requested):
    if env.mode() == env.GPU:
        return requested or "default"
    if requested not in (None, "tiny"):
        print(f"no CUDA: running the 'tiny' suite through the Triton interpreter instead of {requested!r} "
              "(pipeline check only)")
    return "tiny"


def command_run(args) -> int:
    from .harness import run_cases
    from .impls import make_impls
    from .results import write_csv
    from .summary import summarize
    from .timing import bench, copy_ceiling_gbps

    suite = resolve_suite(args.suite)
    cases = suite_cases(suite, args.dtypes, args.layouts)
    ops = tuple(args.ops or OPS)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; known: {', '.join(OPS)}")
    try:
        impls = make_impls(args.impls)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.list:
        for case in cases:
            print(case)
        return 0
    meta = env.header(suite)
    print(f"triton_bn perf: suite {suite}, {len(cases)} cases x {len(impls)} implementations x {len(ops)} ops "
          f"on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})")
    if env.mode() == env.CPU_INTERPRETER:
        print(f"*** {env.CPU_LABEL} ***")
    ceiling = copy_ceiling_gbps(env.device())
    meta["copy_ceiling_gbps"] = f"{ceiling:.1f}"
    print(f"copy ceiling (large device-to-device copy, read + write): {ceiling:.1f} GB/s")
    start = time.perf_counter()
    timer = functools.partial(bench, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    stem = f"{suite}-{env.slug(meta['device'])}"
    csv_path = Path(args.out) / f"{stem}.csv"
    rows = run_cases(suite, cases, impls, ops, ceiling, timer,
                     on_case=lambda rows_so_far: write_csv(csv_path, meta, rows_so_far))
    write_csv(csv_path, meta, rows)
    print(f"\nwrote {csv_path} ({len(rows)} rows) in {time.perf_counter() - start:.0f} s")
    text = summarize(meta, rows)
    (Path(args.out) / f"{stem}-summary.txt").write_text(text)
    print(text)
    if not args.no_plots:
        from .plot import plot_csv
        for path in plot_csv(csv_path, args.out):
            print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def command_plot(args) -> int:
    from .plot import available, plot_csv
    paths = plot_csv(args.csv, args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0 if paths or not available() else 1


def command_summary(args) -> int:
    from .results import read_csv
    from .summary import summarize
    print(summarize(*read_csv(args.csv)))
    return 0


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    return {"run": command_run, "plot": command_plot, "summary": command_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
