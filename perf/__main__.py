"""Command line of the perf harness.

    python -m perf [run] [options]            measure a suite -> CSV, summary, PNGs (options below)
    python -m perf plot CSV [--out DIR]       redraw the PNGs of a CSV (no GPU needed)
    python -m perf summary CSV                print the summary of a CSV
    python -m perf host [options]             triton_bn's host cost per call against torch's, with
                                              the GPU launch stubbed (no GPU needed; host --help)
    python -m perf model [options]            ResNet-50 training step: eager, convert_model,
                                              fuse_model, torch.compile (CPU: pipeline check)

run (the default) measures a suite into ``<out>/<suite>-<gpu>.csv``, then writes the summary
(``...-summary.txt``, also printed) and the PNGs from that CSV. Without CUDA it runs the ``tiny``
suite through the Triton interpreter and every output name contains 'cpu-interpreter'.
Exit status 1 when any row is an error (a wrong result or a failure), after writing everything.
``--sweeps`` runs some of the suite's sweeps, e.g. ``python -m perf --sweeps masked`` the masked
batch norm cases (issue 20) against the torch composition a user writes today.
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

def _csv_list(text: str):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def run_parser() -> argparse.ArgumentParser:
    """The top-level parser is run's, so ``python -m perf --help`` lists run's options."""
    run = argparse.ArgumentParser(prog="python -m perf [run]", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--suite", choices=tuple(SUITES), default=None,
                     help="default: 'default' on a GPU, 'tiny' under the CPU interpreter")
    run.add_argument("--out", default="plots", help="output folder (default: plots)")
    run.add_argument("--impls", type=_csv_list, default=None,
                     help="comma list of triton_bn,torch,torch_native,torch_compile (default: all)")
    run.add_argument("--ops", type=_csv_list, default=None, help=f"comma list of {','.join(OPS)}")
    run.add_argument("--dtypes", type=_csv_list, default=None, help="comma list of float32,float16,bfloat16")
    run.add_argument("--layouts", type=_csv_list, default=None, help="comma list of nchw,channels_last,nc")
    run.add_argument("--sweeps", type=_csv_list, default=None,
                     help="comma list of the suite's sweeps to run (resnet50,size,channels,bn1d,masked; default: all)")
    run.add_argument("--warmup-ms", type=int, default=10, help="do_bench warm-up per timing (GPU)")
    run.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time per timing (GPU)")
    run.add_argument("--no-plots", action="store_true", help="CSV and summary only")
    run.add_argument("--list", action="store_true", help="print the suite's cases and exit")
    return run


def csv_parser(command: str, text: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m perf {command}", description=text)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's)")
    return parser


def parse(argv):
    """run, plot or summary arguments, with ``command`` set (host parses its own: perf.host)."""
    argv = list(argv)
    if argv and argv[0] in ("plot", "summary"):
        text = {"plot": "redraw the PNGs of a CSV", "summary": "print the summary of a CSV"}[argv[0]]
        args = csv_parser(argv[0], text).parse_args(argv[1:])
        args.command = argv[0]
        return args
    args = run_parser().parse_args(argv[1:] if argv[:1] == ["run"] else argv)
    args.command = "run"
    return args


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
    try:
        cases = suite_cases(suite, args.dtypes, args.layouts, args.sweeps)
    except KeyError as error:
        raise SystemExit(error.args[0]) from None
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["host"]:
        from .host import main as command_host  # a process of its own (perf/host.py says why)
        return command_host(argv[1:])
    if argv[:1] == ["model"]:
        from .model import main as command_model
        return command_model(argv[1:])
    args = parse(argv)
    return {"run": command_run, "plot": command_plot, "summary": command_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
