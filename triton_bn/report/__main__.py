"""python -m triton_bn.report: registers, spills, shared memory, access widths, occupancy.

    python -m triton_bn.report                      # every shipped config, sm_90, SASS
    python -m triton_bn.report --kept-only          # only the configs the autotuner keeps here
    python -m triton_bn.report --arch 90,80 --json  # machine-readable, both architectures
    python -m triton_bn.report --kernel normalize --dtype fp16 --layout NHWC
    python -m triton_bn.report --shapes resnet50      # ResNet-50's BN shapes, kept configs, main loops
    python -m triton_bn.report --shapes resnet50 --only 512x7x7 --batch 64 --first-config
    python -m triton_bn.report --kernel cooperative --arch 90,80 --barrier-ptx   # their barrier's PTX
    python -m triton_bn.report --shapes resnet50 --cooperative  # + the launchers with the switch on
    python -m triton_bn.report --shapes resnet50 --masked --first-config  # + masked training launches

Columns: see the README section "Reading the kernel resource report". A cold run compiles
every row (~1 s each, spread over --jobs processes); Triton's cache and the SASS cache make
reruns fast.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import shapes_table
from .launches import DTYPES, LAYOUTS, compile_jobs
from .runner import run_jobs, tools_missing
from .shapes import BATCHES, FORMATS, SHAPE_SETS, case_rows, parse_shape, shape_jobs

KERNEL_ORDER = ["stats_partial", "stats_combine", "normalize", "backward_partial", "backward_dx", "onchip_forward",
                "onchip_backward", "cooperative_forward", "cooperative_backward"]
SMS = {90: 132, 80: 108}  # H100 SXM / H200, A100: the co-resident grid of a cooperative kernel
COLUMNS = [  # (header, row -> text)
    ("kernel", lambda r: r["name"]),
    ("variant", lambda r: r["variant"]),
    ("layout", lambda r: r["layout"]),
    ("dtype", lambda r: r["dtype"]),
    ("sm", lambda r: str(r["arch"])),
    ("config", lambda r: r["config_label"] + ("" if r["autotuned"] else " (fixed)")),
    ("kept", lambda r: "*" if r["kept"] and r["autotuned"] else ""),
    ("regs", lambda r: str(r["regs"])),
    ("spill", lambda r: str(r["spill_bytes"])),
    ("smem", lambda r: str(r["shared"])),
    ("LDG", lambda r: _bits(r["ldg_max"])),
    ("STG", lambda r: _bits(r["stg_max"])),
    ("tile LDG", lambda r: _bits(r["tile_ldg_min"]) if r["tile_lines"] else "-"),
    ("tile STG", lambda r: _bits(r["tile_stg_min"]) if r["tile_lines"] else "-"),
    ("L2 hint", lambda r: r.get("l2_hints") or "-"),
    ("occ", lambda r: f"{r['occupancy']:.2f} ({r['blocks_per_sm']}b, {r['occupancy_limiter']})"),
    ("grid", lambda r: str(co_resident_grid(r)) if r["name"].startswith("cooperative") else "-"),
]


def co_resident_grid(row) -> int:
    """Programs of a cooperative kernel that can be resident at once: blocks per SM x SMs."""
    return row["blocks_per_sm"] * SMS[row["arch"]]


def format_barriers(rows) -> str:
    """The barrier PTX (machine_code.barrier_ptx) of each cooperative kernel compiled."""
    out = []
    for r in sorted((r for r in rows if "barrier_ptx" in r), key=_sort_key):
        out.append(f"\n# {r['name']} {r['variant']} {r['layout']} {r['dtype']} sm_{r['arch']} {r['config_label']}: "
                   "atomics, CTA barriers and the branches around the atomics")
        out += r["barrier_ptx"]
    return "\n".join(out)


def _bits(bits: int) -> str:
    return str(bits) if bits else "-"


def _sort_key(row):
    name = row["name"]
    return (KERNEL_ORDER.index(name) if name in KERNEL_ORDER else len(KERNEL_ORDER), name, row["variant"],
            row["layout"], row["dtype"], row["arch"], -row["num_warps"], [v for _, v in row["config"]])


def format_table(rows, columns=COLUMNS, sort_key=_sort_key) -> str:
    ok = [r for r in rows if "error" not in r]
    cells = [[h for h, _ in columns]] + [[f(r) for _, f in columns] for r in sorted(ok, key=sort_key)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if "error" in r:
            lines.append(f"\nFAILED {r['name']} {r['variant']} {r['layout']} {r['dtype']} sm_{r['arch']} "
                         f"{r['config_label']}:\n{r['error']}")
    return "\n".join(lines)


def _csv(text: str):
    return [t for t in text.split(",") if t]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_bn.report", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities (default 90; 80 also)")
    parser.add_argument("--dtype", default=",".join(DTYPES), help=f"subset of {','.join(DTYPES)}")
    parser.add_argument("--layout", default=",".join(LAYOUTS), help=f"subset of {','.join(LAYOUTS)}")
    parser.add_argument("--kernel", default="", help="comma-separated substrings of kernel names")
    parser.add_argument("--kept-only", action="store_true",
                        help="only the configs the autotuner's pruning keeps for the representative shapes")
    parser.add_argument("--ptx", action="store_true", help="access widths from the PTX (fast) instead of SASS")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    parser.add_argument("--no-cooperative", action="store_true",
                        help="leave out the cooperative kernels (behind TRITON_BN_COOPERATIVE, off by default)")
    parser.add_argument("--masked", action="store_true",
                        help="also the masked training launches (variant train-masked; masked batch norm); "
                             "with --shapes, each case's")
    parser.add_argument("--barrier-ptx", action="store_true",
                        help="after the table, the cooperative kernels' barrier PTX (acquire/release, spin loop)")
    shapes = parser.add_argument_group("real shapes (--shapes)")
    shapes.add_argument("--shapes", choices=sorted(SHAPE_SETS),
                        help="the kernels the launchers run on these shapes (kept configs): adds instructions "
                             "per element of the main loop and division subroutines; NCHW fp32, NHWC fp16/bf16")
    shapes.add_argument("--batch", default=",".join(map(str, BATCHES)), help="with --shapes: batch sizes")
    shapes.add_argument("--only", default="", help="with --shapes: a subset of the shapes, e.g. 512x7x7,64x56x56")
    shapes.add_argument("--first-config", action="store_true",
                        help="with --shapes: only the first kept config of each launch (what pinning runs)")
    shapes.add_argument("--cooperative", action="store_true",
                        help="with --shapes: also record each case with the cooperative switch on (path=cooperative)")
    args = parser.parse_args(argv)
    if args.shapes and args.ptx:
        parser.error("--shapes reads the SASS (main loops); it cannot use --ptx")

    missing = tools_missing()
    if missing:
        print(f"cannot build the report: {missing}", file=sys.stderr)
        return 2
    if args.shapes:
        return _shapes_report(args)
    jobs = compile_jobs(archs=[int(a) for a in _csv(args.arch)], dtypes=_csv(args.dtype),
                        layouts=_csv(args.layout), kernels=_csv(args.kernel), kept_only=args.kept_only,
                        cooperative=not args.no_cooperative, masked=args.masked)
    print(f"compiling {len(jobs)} kernel configs ...", file=sys.stderr)
    rows = run_jobs(jobs, workers=args.jobs, sass=not args.ptx)
    return _emit(rows, args.json, f"widths from {'PTX' if args.ptx else 'SASS'}; kept = the autotuner's pruning "
                 "keeps it for this shape; spill = STACK + LOCAL bytes; grid = a cooperative kernel's co-resident "
                 "programs (blocks/SM x 132 SMs sm_90, 108 sm_80)",
                 lambda: format_table(rows) + (format_barriers(rows) if args.barrier_ptx else ""))


def _emit(rows, as_json: bool, legend: str, tables) -> int:
    """Print ``rows`` as JSON, or the toolchains and ``legend`` then ``tables()``; the exit status."""
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        toolchains = sorted({r["toolchain"] for r in rows if "toolchain" in r})
        print(f"# {'; '.join(toolchains)}; {legend}")
        print(tables())
    return 1 if any("error" in r for r in rows) else 0


def _shapes_report(args) -> int:
    chosen = SHAPE_SETS[args.shapes]
    if args.only:
        wanted = [parse_shape(t) for t in _csv(args.only)]
        unknown = [w for w in wanted if w not in chosen]
        if unknown:
            print(f"not {args.shapes} shapes: {unknown}", file=sys.stderr)
            return 2
        chosen = wanted
    formats = [(d, lay) for d, lay in FORMATS if d in _csv(args.dtype) and lay in _csv(args.layout)]
    jobs, cases = shape_jobs(chosen, [int(b) for b in _csv(args.batch)], formats, [int(a) for a in _csv(args.arch)],
                             _csv(args.kernel), args.first_config, args.cooperative, args.masked)
    print(f"{len(cases)} cases, {sum(len(j) for _, j in cases)} rows, compiling {len(jobs)} distinct kernels ...",
          file=sys.stderr)
    rows = [shapes_table.with_budget(r) for r in case_rows(cases, jobs, run_jobs(jobs, workers=args.jobs))]
    return _emit(rows, args.json, "SASS; kept configs per shape; instr/elem = main-loop (or whole-kernel) SASS "
                 "instructions / elements per thread per pass, '!' over the H200 budget at bandwidth (README: "
                 "Reading the kernel resource report)",
                 lambda: format_table(rows, shapes_table.COLUMNS, shapes_table.sort_key)
                 + "\n\n# worst row per kernel\n"
                 + format_table(shapes_table.summary(rows), shapes_table.SUMMARY_COLUMNS, lambda s: 0))


if __name__ == "__main__":
    sys.exit(main())
