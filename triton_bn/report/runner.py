"""Fan compile jobs out to worker subprocesses (TRITON_INTERPRET unset there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import List, Optional

from .launches import CompileJob
from .machine_code import tool_path


def tools_missing() -> Optional[str]:
    """None when triton's NVIDIA backend and its ptxas/cuobjdump/nvdisasm are present, else why not."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        return f"the triton wheel has no NVIDIA backend ({e})"
    for name in ("ptxas", "cuobjdump", "nvdisasm"):
        try:
            path = tool_path(name)
        except Exception as e:  # a knob that fails to resolve is as good as missing
            return f"cannot locate {name} in the triton wheel ({e})"
        if not (path and os.access(path, os.X_OK)):
            return f"{name} not found at {path!r} (triton wheel without the NVIDIA tools?)"
    return None


def _worker_env() -> dict:
    """No interpreter, line info on, and the same triton_bn as this process imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DISABLE_LINE_INFO")}
    import triton_bn
    root = os.path.dirname(os.path.dirname(os.path.abspath(triton_bn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated (silences 3.9's warning)
    return env


def run_jobs(jobs: List[CompileJob], workers: Optional[int] = None, sass: bool = True) -> List[dict]:
    """One result dict per job (job fields + resources, or ``error``), in the jobs' order.
    ``sass``: access widths from the disassembly (slow) rather than the PTX."""
    if not jobs:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    chunks = [list(range(i, len(jobs), workers)) for i in range(workers)]
    results: List[Optional[dict]] = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for w, chunk in enumerate(chunks):
            jobs_path, out_path = os.path.join(tmp, f"jobs{w}.json"), os.path.join(tmp, f"out{w}.json")
            with open(jobs_path, "w") as f:
                json.dump([jobs[i].to_json() for i in chunk], f)
            proc = subprocess.Popen([sys.executable, "-m", "triton_bn.report.worker", jobs_path, out_path,
                                     "sass" if sass else "ptx"],
                                    env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append((proc, chunk, out_path))
        for proc, chunk, out_path in procs:
            log = proc.communicate()[0]
            if proc.returncode != 0:
                raise RuntimeError(f"report worker failed (exit {proc.returncode}):\n{log[-4000:]}")
            with open(out_path) as f:
                for i, result in zip(chunk, json.load(f)):
                    results[i] = result
    return results
