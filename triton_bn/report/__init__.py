"""Machine-code report: registers, spills, shared memory and global access width of every
kernel and every autotune config, compiled for a GPU target on the CPU (no GPU needed).

    python -m triton_bn.report [--arch 90,80] [--json] [--kernel normalize] [--jobs 4]
    python -m triton_bn.report --shapes resnet50 [--batch 64] [--only 512x7x7] [--json]

How it works, one file per step:

* ``launches``: runs the real launchers (``bn_forward_train``, ``bn_backward``, ...) on
  ``meta`` tensors of representative shapes with every kernel replaced by a recorder, so the
  argument order, the constexprs and Triton's specialization of the arguments (ints equal
  to 1 become constants, multiples of 16 get ``tt.divisibility=16``) are exactly the
  launchers'. Each recorded launch times each config it can be launched with is a job.
* ``worker``: compiles a job with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
  in a subprocess where ``TRITON_INTERPRET`` is unset.
* ``machine_code``: reads the cubin with the ``cuobjdump``/``nvdisasm`` shipped in the triton wheel:
  REG/STACK/LOCAL/SHARED, every LDG/STG with its width and source line (so the loads of the
  ``[N, Q, K]`` tiles are told apart from per-channel vector loads), and an occupancy estimate.
* ``sass_loops``: finds the main loop in the SASS (the innermost loop around the tile loads,
  or the whole kernel for the elementwise ones): instructions per element and whether it
  calls a division subroutine; ``budget``: what an H200 allows per element at bandwidth.
* ``shapes`` (``--shapes resnet50``): the same recording over ResNet-50's 12 BN shapes at batch
  64 and 256, the kept configs only, with and without the on-chip path when it exists;
  ``shapes_table``: its rows and per-kernel summary.
* ``runner``: fans jobs out to worker subprocesses; ``__main__``: the table and ``--json``.
"""
from .launches import CompileJob, compile_jobs
from .runner import run_jobs, tools_missing

__all__ = ["CompileJob", "compile_jobs", "run_jobs", "tools_missing"]
