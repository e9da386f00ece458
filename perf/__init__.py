"""perf: the benchmark harness comparing triton_bn with torch's batch norm (not imported by the library).

    python -m perf [--suite tiny|quick|default|full] [--out plots]   measure -> CSV -> PNGs + summary
    python -m perf plot plots/<suite>-<gpu>.csv                      CSV -> PNGs (no GPU needed)
    python -m perf summary plots/<suite>-<gpu>.csv                   CSV -> text summary
    python -m perf host                                              host cost per call (no GPU needed)
    python -m perf model                                             ResNet-50 training step per configuration

Modules, one idea each: env (where we run, versions, labels), bytes_model (bytes and FLOPs per
op), resnet50_layers (ResNet-50's BN layers and their shapes: the goal's weights), suites (named
sweeps of shapes), impls (the implementations side by side), masked (masked batch norm's cases,
the torch composition a user writes, the masked implementations), check (float64 reference; a wrong
result is an error, never a number), timing (do_bench / copy ceiling), harness (cases -> rows),
results (CSV schema), plot (CSV -> PNGs), summary (CSV -> text), host (host cost per call) over
host_driver + libcuda_stub.c (Triton's CUDA driver with the launch stubbed). resnet50 is a
ResNet-50 model for the tools above the library; model (``python -m perf model``) times its
training step per configuration (eager, convert_model, fuse_model, torch.compile), and saved
counts the bytes autograd holds for backward.
"""
import os

import torch

# Without CUDA the Triton kernels run through the interpreter, which must be chosen before
# triton is first imported (triton_bn imports it), hence here, at the package's import. Not in
# the host benchmark's process (TRITON_BN_CPU_KERNELS=1): there a stub driver takes CPU
# pointers, and asking torch for CUDA could load a real libcuda before the stub.
if os.environ.get("TRITON_BN_CPU_KERNELS") != "1" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
