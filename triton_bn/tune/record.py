"""Watching Triton's autotuners while the real launchers run: which key, which candidates, which times.

Tool layer (triton_bn.tune). Nothing here benchmarks by itself: the kernels' own Autotuners
do, with the library's benchmarker (``triton_bn.kernels.tuning.do_bench``), exactly as on a
first call inside a training job. While attached, the recorder

* gives every autotuner an empty cache that remembers the key each call looks up (Triton
  asks ``key not in cache`` first), so every key is benchmarked afresh and the key tuple is
  Triton's own, whatever arguments it is made of;
* reads ``configs_timings``, which Triton's Autotuner sets after benchmarking a key (one
  entry per pruned candidate; a key with a single candidate is not benchmarked at all);
* times each benchmarker call on the host (``wall_ms``: compile + benchmark on a GPU, one
  interpreted run under the interpreter) and reports progress per candidate.

On detach every autotuner gets its own cache dict back, with the winners found added. Launch
plans (kernels/launch.py, which bypass the autotuner once recorded) are dropped on attach and
detach, so every launch while attached goes through its autotuner.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

from ..kernels.launch import clear_plans
from .store import config_to_json, key_to_json


class _ProbeCache(dict):
    """An autotune cache that remembers the keys looked up with ``in``."""

    def __init__(self):
        super().__init__()
        self.lookups: list = []

    def __contains__(self, key):
        self.lookups.append(key)
        return super().__contains__(key)


def _quantiles(timing):
    """(median, p20, p80) ms from do_bench's result; None for a failed candidate (inf)."""
    values = list(timing) if isinstance(timing, (list, tuple)) else [timing] * 3
    values = (values + values[-1:] * 3)[:3]
    return [None if v is None or not math.isfinite(v) else float(v) for v in values]


class Recorder:
    """Entries of the tuning file, built from what the autotuners do during the launches."""

    def __init__(self, kernels: Dict[str, object], bytes_of: Callable[[str], Optional[int]] = lambda name: None,
                 progress=None):
        self.kernels = kernels
        self.bytes_of = bytes_of  # kernel name -> bytes it moves per call for the current op
        self.progress = progress
        self.entries: List[dict] = []
        self.index: Dict[tuple, int] = {}  # (kernel, key) -> entry index
        self.used: List[int] = []  # entries the current shape used, in first-use order
        self._walls: List[float] = []
        self._candidates = 0

    # --- per call -----------------------------------------------------------------------
    def _record(self, name: str, kernel, key):
        if key is None:
            return
        index = self.index.get((name, key))
        if index is None:
            index = self.index[(name, key)] = len(self.entries)
            self.entries.append(self._entry(name, kernel, key))
        if index not in self.used:
            self.used.append(index)

    def _entry(self, name: str, kernel, key) -> dict:
        winner = kernel.cache[key]
        timings = getattr(kernel, "configs_timings", None)
        if timings:
            candidates = []
            for i, (config, timing) in enumerate(timings.items()):
                ms, p20, p80 = _quantiles(timing)
                wall = self._walls[i] if i < len(self._walls) else None
                candidates.append({"config": config_to_json(config), "ms": ms, "ms_p20": p20, "ms_p80": p80,
                                   "wall_ms": wall})
        else:  # one candidate after pruning: Triton uses it without benchmarking
            candidates = [{"config": config_to_json(winner), "ms": None, "ms_p20": None, "ms_p80": None,
                           "wall_ms": None, "note": "only candidate: not benchmarked"}]
        return {"kernel": name, "key_names": list(kernel.keys), "key": key_to_json(key),
                "bytes": self.bytes_of(name), "winner": config_to_json(winner), "candidates": candidates}

    # --- hooks --------------------------------------------------------------------------
    def _wrap_run(self, name: str, kernel, run):
        def recorded_run(*args, **kwargs):
            probe = kernel.cache
            seen = len(probe.lookups)
            kernel.configs_timings = None  # set again only if this call benchmarks
            self._walls, self._candidates = [], 0
            result = run(*args, **kwargs)
            self._record(name, kernel, probe.lookups[seen] if len(probe.lookups) > seen else None)
            return result
        return recorded_run

    def _wrap_prune(self, prune):
        def counted_prune(*args, **kwargs):
            kept = prune(*args, **kwargs)
            self._candidates = len(kept)
            return kept
        return counted_prune

    def _wrap_bench(self, name: str, bench):
        def timed_bench(kernel_call, *args, **kwargs):
            if self.progress is not None:
                self.progress.detail(f"{name} candidate {len(self._walls) + 1}/{self._candidates or '?'}")
            start = time.perf_counter()
            result = bench(kernel_call, *args, **kwargs)
            self._walls.append((time.perf_counter() - start) * 1e3)
            return result
        return timed_bench

    @contextmanager
    def attached(self):
        """Probe caches and wrapped run / prune / benchmarker on every autotuner, undone on exit."""
        # A recorded launch plan (kernels/launch.py) goes straight to the compiled kernel,
        # past the autotuner: forget them, so every launch here is seen and re-planned.
        clear_plans()
        saved = {}
        for name, kernel in self.kernels.items():
            instance = vars(kernel)
            saved[name] = (kernel.cache, {attr: instance[attr] for attr in ("run", "prune_configs", "do_bench")
                                          if attr in instance})
            bench = kernel.do_bench  # the library's benchmarker (a cached_property on the Autotuner)
            kernel.cache = _ProbeCache()
            kernel.run = self._wrap_run(name, kernel, kernel.run)
            kernel.prune_configs = self._wrap_prune(kernel.prune_configs)
            instance["do_bench"] = self._wrap_bench(name, bench)
        try:
            yield self
        finally:
            for name, kernel in self.kernels.items():
                cache, attrs = saved[name]
                instance = vars(kernel)
                for attr in ("run", "prune_configs", "do_bench"):
                    instance.pop(attr, None)
                instance.update(attrs)
                cache.update(kernel.cache)
                kernel.cache = cache
            clear_plans()
