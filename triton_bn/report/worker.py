"""Compile jobs for a GPU target and read their machine code (run in a subprocess).

    python -m triton_bn.report.worker JOBS.json RESULTS.json [sass|ptx]

Must run with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` yields
interpreted functions, which cannot be compiled. ``runner`` starts it that way.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .launches import CompileJob
from .sass_loops import main_loop
from .machine_code import (barrier_ptx, disassemble, integer_divisions, l2_hints, occupancy, ptx_accesses,
                           resource_usage, sass_accesses, summarize_accesses, tile_access_lines)


def _decode_constexpr(value):
    return tl.dtype(value[1]) if isinstance(value, tuple) and value[:1] == ("tl",) else value


def _jit_function(qualname: str):
    module, attr = qualname.split(":")
    kernel = getattr(importlib.import_module(module), attr)
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def toolchain(arch: int) -> str:
    """"triton X, ptxas Y" as used for ``arch`` (spills and register counts depend on it)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch)
        return f"triton {triton.__version__}, {os.path.basename(ptxas.path)} {ptxas.version}"
    except Exception:  # older triton: no get_ptxas / knobs
        return f"triton {triton.__version__}"


def compile_job(job: CompileJob, tmpdir: str, sass: bool = True) -> dict:
    """Compile one job for its GPU target; resources from cuobjdump, access widths from the
    SASS (``sass``) or the PTX."""
    jit = _jit_function(job.kernel)
    index = {name: (i,) for i, name in enumerate(jit.arg_names)}
    constexprs = {index[k]: _decode_constexpr(v) for k, v in (*job.constexprs, *job.config)}
    attrs = {index[p]: [["tt.divisibility", 16]] for p in job.divisible}
    source = ASTSource(jit, dict(job.signature), constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32),
                              options=dict(num_warps=job.num_warps, num_stages=job.num_stages, **dict(job.options)))
    cubin = os.path.join(tmpdir, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = resource_usage(cubin)
    sass_text = disassemble(compiled.asm["cubin"], cubin) if sass else None
    accesses = sass_accesses(sass_text, compiled.asm["ptx"]) if sass else ptx_accesses(compiled.asm["ptx"])
    tile_file, tile_lines = tile_access_lines(jit.fn)
    shared = usage["shared"] + int(getattr(compiled.metadata, "shared", 0) or 0)
    occ, blocks, limiter = occupancy(usage["regs"], job.num_warps, shared, job.arch)
    return dict(
        job.to_json(), config_label=job.config_label, regs=usage["regs"], stack=usage["stack"],
        local=usage["local"], spill_bytes=usage["stack"] + usage["local"], shared=shared,
        **summarize_accesses(accesses, tile_file, tile_lines), widths_from="sass" if sass else "ptx",
        tile_lines=len(tile_lines), occupancy=occ, blocks_per_sm=blocks, occupancy_limiter=limiter,
        toolchain=toolchain(job.arch), int_divisions=integer_divisions(compiled.asm["ptx"]),
        l2_hints=l2_hints(compiled.asm["ptx"]),
        **({"barrier_ptx": barrier_ptx(compiled.asm["ptx"])} if job.name.startswith("cooperative") else {}),
        **(main_loop(sass_text, compiled.asm["ptx"], tile_file, tile_lines, dict(job.config), job.num_warps)
           if sass else {}),
    )


def main(jobs_path: str, results_path: str, sass: str = "sass") -> None:
    with open(jobs_path) as f:
        jobs = [CompileJob.from_json(d) for d in json.load(f)]
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for job in jobs:
            try:
                results.append(compile_job(job, tmpdir, sass == "sass"))
            except Exception:  # one failed compile is a row of the report, not a crash
                results.append(dict(job.to_json(), config_label=job.config_label,
                                    error=traceback.format_exc(limit=3)))
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
