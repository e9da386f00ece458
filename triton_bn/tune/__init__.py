"""triton_bn.tune: autotuning as a workflow (tune once, keep the file, load it, look at it).

A tool layer above the kernels: it drives the launchers of ``triton_bn.kernels`` and reads
and fills the autotuners registered in ``triton_bn.kernels.tuning``; the library never
depends on it, except that ``triton_bn`` re-exports ``use_tuning`` and applies
``$TRITON_BN_TUNING`` at import. Importing this package is light (no matplotlib, no perf/).

Modules, one idea each: store (the versioned JSON file and its checks), machine (which
GPU / Triton made a file), apply (use_tuning: pre-filling the autotune caches), shapes
(--shapes, --model resnet50, --from-model), record (watching the autotuners benchmark),
bench (running the launchers on each shape), progress (the one-line display), table (text),
plots (PNGs), __main__ (the command line). The workflow and the format: docs/tuning.md.
"""
from .apply import TuningReport, TuningWarning, use_tuning, use_tuning_from_env
from .store import FORMAT, VERSION, TuningFileError, load

__all__ = ["use_tuning", "use_tuning_from_env", "TuningFileError", "TuningWarning", "TuningReport", "load",
           "FORMAT", "VERSION"]
