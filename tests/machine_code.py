"""``compile_asm(jobs, tmp_path)``: the TTIR and PTX of the report's CompileJobs, compiled for
their GPU target on the CPU, for the tests that read machine code (test_ticket_barriers.py,
test_l2_hints.py). As the report's worker does, in a subprocess without TRITON_INTERPRET (under
the interpreter ``@triton.jit`` yields no compiler)."""
import json
import subprocess
import sys

from triton_bn.report.runner import _worker_env

# TTIR and PTX of CompileJobs (JSON in argv[1]) -> argv[2].
_DUMP_ASM = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_bn.report.launches import CompileJob
from triton_bn.report.worker import _decode_constexpr, _jit_function
out = []
for job in map(CompileJob.from_json, json.load(open(sys.argv[1]))):
    jit = _jit_function(job.kernel)
    index = {name: (i,) for i, name in enumerate(jit.arg_names)}
    constexprs = {index[k]: _decode_constexpr(v) for k, v in (*job.constexprs, *job.config)}
    attrs = {index[p]: [["tt.divisibility", 16]] for p in job.divisible}
    compiled = triton.compile(ASTSource(jit, dict(job.signature), constexprs, attrs),
                              target=GPUTarget("cuda", job.arch, 32),
                              options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
    out.append({"ttir": compiled.asm["ttir"], "ptx": compiled.asm["ptx"]})
json.dump(out, open(sys.argv[2], "w"))
"""


def compile_asm(jobs, tmp_path) -> list:
    """[{"ttir": ..., "ptx": ...}] of ``jobs``, in order."""
    with open(tmp_path / "jobs.json", "w") as f:
        json.dump([j.to_json() for j in jobs], f)
    out = subprocess.run([sys.executable, "-c", _DUMP_ASM, str(tmp_path / "jobs.json"), str(tmp_path / "asm.json")],
                         env=_worker_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "asm.json") as f:
        return json.load(f)
