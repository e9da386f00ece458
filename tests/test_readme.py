"""The README's examples run as written, on this machine (a CPU runs torch's path): "Use it" and
"Masked batch norm" (whose CPU run is the torch composition, composite.masked_batch_norm)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_use_it_example_runs_as_written():
    out = _run(_example("## Use it"))
    assert "batch norm runs on:" in out and "mean of y ~ 0: True" in out, out


def test_the_masked_example_runs_as_written():
    out = _run(_example("## Masked batch norm"))
    assert "running mean from the real frames only: True" in out, out
