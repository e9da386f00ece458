"""The README's "Use it" example runs as written, on this machine (a CPU runs torch's path)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _use_it_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_use_it_example_runs_as_written():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _use_it_example()], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "batch norm runs on:" in done.stdout and "mean of y ~ 0: True" in done.stdout, done.stdout
