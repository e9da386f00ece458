"""perf: the benchmark harness comparing triton_bn with torch's batch norm (not imported by the library).

    python -m perf [--suite tiny|quick|default|full] [--out plots]   measure -> CSV -> PNGs + summary
    python -m perf plot plots/quick-h200.csv                         CSV -> PNGs (no GPU needed)
    python -m perf summary plots/quick-h200.csv                      CSV -> text summary

Modules, one idea each: env (where we run, versions, labels), bytes_model (bytes and FLOPs per
op), suites (named sweeps of shapes), impls (the implementations side by side), check (float64
reference; a wrong result is an error, never a number), timing (do_bench / copy ceiling),
harness (cases -> rows), results (CSV schema), plot (CSV -> PNGs), summary (CSV -> text).
"""
import os

import torch

# Without CUDA the Triton kernels run through the interpreter, which must be chosen before
# triton is first imported (triton_bn imports it), hence here, at the package's import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
