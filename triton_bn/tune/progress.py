"""A plain one-line progress display on stderr (no tqdm: it is not a dependency).

Tool layer (triton_bn.tune). The line is rewritten in place with a carriage return:

    [ 7/36] 2x256x56x56 fp32 NCHW forward: _bn_normalize_kernel candidate 2/4

and ended with a newline by ``done()``, so the per-shape tables on stdout stay readable when
both streams go to one terminal (``clear()`` blanks the line before a table is printed).
"""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total = total
        self.count = 0
        self.step_text = ""
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._width = 0

    def step(self, text: str):
        """Start the next of ``total`` steps."""
        self.count += 1
        self.step_text = text
        self._show(text)

    def detail(self, text: str):
        """Say what the current step is doing, e.g. which candidate it benchmarks."""
        self._show(f"{self.step_text}: {text}")

    def _show(self, text: str):
        if not self.enabled:
            return
        digits = len(str(self.total))
        line = f"[{self.count:>{digits}}/{self.total}] {text}"
        # pad with spaces so a shorter line fully covers the previous one
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))

    def clear(self):
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()

    def done(self, text: str = "done"):
        if self.enabled:
            self._show(text)
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
