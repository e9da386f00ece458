"""python -m triton_bn.tune: tune a model's batch-norm shapes once, keep the result, look at it.

    python -m triton_bn.tune --model resnet50 --batch 64 --out tuning.json   # tune -> tables + file
    TRITON_BN_TUNING=tuning.json python train.py                              # use it: no autotuning
    python -m triton_bn.tune --plot tuning.json                               # heatmap + copy bars

Shapes come from --model resnet50 (with --batch, --image-size, --dtype, --channels-last),
--shapes "N,C,H,W;N,C,L" or --from-model module:function (with --input-shape). Progress is a
plain one-line display on stderr (no tqdm), the per-shape tables go to stdout.
--compare a.json b.json plots per-shape speed changes between two files. Without CUDA the
kernels run through the Triton interpreter (this command re-runs itself with
TRITON_INTERPRET=1): the workflow works, its times are not measurements. docs/tuning.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from ..kernels.tuning import interpreting
from .machine import NOT_A_MEASUREMENT
from .shapes import ShapeSourceError, parse_dims, parse_dtype, parse_shapes, resnet50_shapes, shapes_from_model
from .store import TuningFileError, load

MODELS = ("resnet50",)


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m triton_bn.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=MODELS, help="a model of the perf package (run from the repository root)")
    source.add_argument("--shapes", help='input shapes "N,C,H,W;N,C,L;..." (channel axis at 1)')
    source.add_argument("--from-model", metavar="MODULE:FUNCTION",
                        help="a function building your model; its BatchNorm inputs are recorded in one forward")
    source.add_argument("--plot", metavar="FILE", type=Path, help="draw a tuning file's heatmap and copy bars")
    source.add_argument("--compare", nargs=2, metavar=("A", "B"), type=Path,
                        help="plot B's speed change over A per shape")
    source.add_argument("--show", metavar="FILE", type=Path, help="print a tuning file's tables")
    parser.add_argument("--batch", type=int, default=32, help="--model: batch size (default 32)")
    parser.add_argument("--image-size", type=int, default=224, help="--model: image height = width (default 224)")
    parser.add_argument("--input-shape", default="2,3,224,224",
                        help="--from-model: the model's input N,C,H,W (default 2,3,224,224)")
    parser.add_argument("--dtype", default=None,
                        help="input dtype: float32 (default), float16, bfloat16, float64; with --from-model it "
                             "replaces the recorded dtype (e.g. float16 for a model run under autocast)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last inputs")
    parser.add_argument("--ops", default="forward,eval,backward",
                        help="which launches to tune: forward (training), eval, backward (default: all three)")
    parser.add_argument("--gpu-pruning", action="store_true",
                        help="under the interpreter, keep the candidates a GPU keeps (several per key) "
                             "instead of the largest tiles only")
    parser.add_argument("--out", type=Path, default=Path("tuning.json"), help="the tuning file (default tuning.json)")
    parser.add_argument("--plot-dir", type=Path, default=Path("plots"), help="where PNGs go (default plots/)")
    parser.add_argument("--quiet", action="store_true", help="no progress line and no tables")
    args = parser.parse_args(argv)
    if not (args.model or args.shapes or args.from_model or args.plot or args.compare or args.show):
        parser.error("give a source of shapes (--model, --shapes, --from-model) or --plot / --compare / --show")
    return args


def _shapes(args):
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if args.model:
        return resnet50_shapes(args.batch, args.image_size, dtype or torch.float32, args.channels_last), \
            f"ResNet-50, batch {args.batch}, {args.image_size}x{args.image_size}"
    if args.shapes:
        return parse_shapes(args.shapes, dtype or torch.float32, args.channels_last), "--shapes"
    shapes, where = shapes_from_model(args.from_model, parse_dims(args.input_shape, "--input-shape"), dtype,
                                      args.channels_last)
    return shapes, f"{args.from_model} (forward on {where})"


def run_tune(args, out=None, command=None) -> dict:
    out = out or sys.stdout
    from .bench import tune
    from .progress import Progress
    from .store import write
    from .table import file_title, shape_table

    shapes, source = _shapes(args)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    progress = Progress(len(shapes) * len(ops), enabled=not args.quiet)

    def show(data, record):
        # the file after every shape: an interrupted run (a timeout) keeps the shapes done
        write(data, args.out)
        if not args.quiet:
            progress.clear()
            print(shape_table(data, record) + "\n", file=out, flush=True)

    previous = os.environ.get("TRITON_BN_INTERPRET_GPU_PRUNING")
    if args.gpu_pruning:
        os.environ["TRITON_BN_INTERPRET_GPU_PRUNING"] = "1"  # read by the pruning at each new key
    try:
        if not args.quiet:
            print(f"tuning {len(shapes)} shapes x {len(ops)} ops of {source}", file=out, flush=True)
        data = tune(shapes, ops, progress=progress, command=command, on_shape=show)
    finally:
        if args.gpu_pruning:
            os.environ.pop("TRITON_BN_INTERPRET_GPU_PRUNING", None)
            if previous is not None:
                os.environ["TRITON_BN_INTERPRET_GPU_PRUNING"] = previous
    progress.done(f"tuned {len(data['entries'])} (kernel, key) pairs")
    write(data, args.out)
    print(f"{file_title(data)}\nwrote {args.out}: use it with TRITON_BN_TUNING={args.out} "
          f"or triton_bn.use_tuning({str(args.out)!r})", file=out)
    return data


def run_plot(path: Path, plot_dir: Path, out=None):
    out = out or sys.stdout
    from . import plots

    data = load(path)
    drawn = [plots.heatmap(data, plot_dir / f"{path.stem}-heatmap.png")]
    bars = plots.copy_bars(data, plot_dir / f"{path.stem}-copy.png")
    for p in drawn + ([bars] if bars else []):
        print(f"wrote {p}", file=out)
    if bars is None:
        print(f"no copy bars for {path}: {NOT_A_MEASUREMENT}, no copy ceiling", file=out)
    return drawn + ([bars] if bars else [])


def run_compare(a: Path, b: Path, plot_dir: Path, out=None):
    out = out or sys.stdout
    from . import plots

    data_a, data_b = load(a), load(b)
    for row in plots.comparison(data_a, data_b):
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] else "n/a"
        print(f"{row['shape']:<28} {row['kernel']:<28} {row['config_a']:>12} -> {row['config_b']:<12} {speedup}",
              file=out)
    path = plots.compare_plot(data_a, data_b, (a.stem, b.stem), plot_dir / f"compare-{a.stem}-vs-{b.stem}.png")
    print(f"wrote {path}", file=out)
    return path


def main(argv=None, out=None) -> int:
    out = out or sys.stdout
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    try:
        if args.plot:
            run_plot(args.plot, args.plot_dir, out)
        elif args.compare:
            run_compare(args.compare[0], args.compare[1], args.plot_dir, out)
        elif args.show:
            from .table import file_tables, file_title
            data = load(args.show)
            print(file_title(data) + "\n\n" + "\n\n".join(file_tables(data)), file=out)
        else:
            run_tune(args, out, command=" ".join(["python -m triton_bn.tune"] + [shlex.quote(a) for a in argv]))
    except (ShapeSourceError, TuningFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _kernels_must_run(argv) -> None:
    """Without CUDA, re-run this command under the interpreter: TRITON_INTERPRET must be set
    before triton is imported, and importing triton_bn (to get here) has imported it."""
    tuning = not any(a in argv for a in ("--plot", "--compare", "--show", "-h", "--help"))
    if tuning and not torch.cuda.is_available() and not interpreting():
        print("no CUDA: running through the Triton interpreter (TRITON_INTERPRET=1); "
              "its times are not measurements", file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "triton_bn.tune", *argv],
                  dict(os.environ, TRITON_INTERPRET="1"))


if __name__ == "__main__":
    _kernels_must_run(sys.argv[1:])
    sys.exit(main())
