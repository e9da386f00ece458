"""python -m triton_bn.report: registers, spills, shared memory, access widths, occupancy.

    python -m triton_bn.report                      # every shipped config, sm_90, SASS
    python -m triton_bn.report --kept-only          # only the configs the autotuner keeps here
    python -m triton_bn.report --arch 90,80 --json  # machine-readable, both architectures
    python -m triton_bn.report --kernel normalize --dtype fp16 --layout NHWC

Columns: see the README section "Reading the kernel resource report". A cold run compiles
every row (~1 s each, spread over --jobs processes); Triton's cache and the SASS cache make
reruns fast.
"""
from __future__ import annotations

import argparse
import json
import sys

from .launches import DTYPES, LAYOUTS, compile_jobs
from .runner import run_jobs, tools_missing

KERNEL_ORDER = ["stats_partial", "stats_combine", "normalize", "backward_partial", "backward_dx", "onchip_forward",
                "onchip_backward"]
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
    ("occ", lambda r: f"{r['occupancy']:.2f} ({r['blocks_per_sm']}b, {r['occupancy_limiter']})"),
]


def _bits(bits: int) -> str:
    return str(bits) if bits else "-"


def _sort_key(row):
    name = row["name"]
    return (KERNEL_ORDER.index(name) if name in KERNEL_ORDER else len(KERNEL_ORDER), name, row["variant"],
            row["layout"], row["dtype"], row["arch"], -row["num_warps"], [v for _, v in row["config"]])


def format_table(rows) -> str:
    ok = [r for r in rows if "error" not in r]
    cells = [[h for h, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in sorted(ok, key=_sort_key)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
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
    args = parser.parse_args(argv)

    missing = tools_missing()
    if missing:
        print(f"cannot build the report: {missing}", file=sys.stderr)
        return 2
    jobs = compile_jobs(archs=[int(a) for a in _csv(args.arch)], dtypes=_csv(args.dtype),
                        layouts=_csv(args.layout), kernels=_csv(args.kernel), kept_only=args.kept_only)
    print(f"compiling {len(jobs)} kernel configs ...", file=sys.stderr)
    rows = run_jobs(jobs, workers=args.jobs, sass=not args.ptx)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        toolchains = sorted({r["toolchain"] for r in rows if "toolchain" in r})
        print(f"# {'; '.join(toolchains)}; widths from {'PTX' if args.ptx else 'SASS'}; "
              "kept = the autotuner's pruning keeps it for this shape; spill = STACK + LOCAL bytes")
        print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
