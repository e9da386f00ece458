"""Run Triton's interpreter grid in another program order (tests only).

On a GPU a launch's programs run in any order, and concurrently; the interpreter runs them
one by one in row-major grid order, so the last program of a channel (the one that draws the
last ticket and combines) is always the last split. ``program_order`` makes ``tl.program_id``
walk the grid reversed or shuffled instead, so a result that depends on which program comes
last, or on a read racing a write, shows up on the CPU.

How: ``GridExecutor.__call__`` (triton/runtime/interpreter.py) calls
``interpreter_builder.set_grid_dim(*grid)`` once per launch, then ``set_grid_idx(x, y, z)``
before each program, in row-major order. Both are wrapped: the k-th program of a launch gets
the k-th index of a permutation of the grid. What this relies on is checked, and a mismatch
fails loudly rather than silently running the natural order: set_grid_dim comes first; the
indices asked for are the row-major ones; every launch runs all its programs; at least one
launch of several programs ran permuted (``launches`` records each launch's order).
"""
from __future__ import annotations

import contextlib
import itertools
import random
from typing import List, Optional, Tuple

from triton.runtime import interpreter

ORDERS = ("natural", "reversed", "shuffled")


class _Permuter:
    def __init__(self, order: str, seed: int, fail_at: Optional[Tuple[int, int]]):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order, self.rng, self.fail_at = order, random.Random(seed), fail_at
        self.launches: List[Tuple[tuple, list]] = []  # (grid, the (x, y, z) run, in run order)
        self.natural: list = []
        self.permuted: list = []

    def start(self, grid: tuple) -> None:
        self.check_finished()
        self.natural = list(itertools.product(*(range(n) for n in grid)))
        self.permuted = list(self.natural)
        if self.order == "reversed":
            self.permuted.reverse()
        elif self.order == "shuffled":
            self.rng.shuffle(self.permuted)
            if self.permuted == self.natural:  # a tiny grid may shuffle to itself
                self.permuted.reverse()
        self.launches.append((grid, []))

    def next(self, index: tuple) -> tuple:
        if not self.launches:
            raise AssertionError("program_order: set_grid_idx before any set_grid_dim (Triton's interpreter changed)")
        grid, run = self.launches[-1]
        k = len(run)
        if k >= len(self.natural) or tuple(index) != self.natural[k]:
            raise AssertionError(f"program_order: the interpreter asked for program {tuple(index)} as #{k} of "
                                 f"grid {grid}, not the row-major one (Triton's interpreter changed)")
        if self.fail_at == (len(self.launches) - 1, k):
            raise RuntimeError(f"program_order: injected failure before program #{k} of launch "
                               f"#{len(self.launches) - 1}")
        run.append(self.permuted[k])
        return self.permuted[k]

    def check_finished(self) -> None:
        if self.launches:
            grid, run = self.launches[-1]
            failed = self.fail_at is not None and self.fail_at[0] == len(self.launches) - 1
            if len(run) != len(self.natural) and not failed:
                raise AssertionError(f"program_order: a launch of grid {grid} ran {len(run)} of "
                                     f"{len(self.natural)} programs through set_grid_idx")

    def check_permuted(self) -> None:
        self.check_finished()
        if self.order != "natural" and not any(
                run != list(itertools.product(*(range(n) for n in grid))) for grid, run in self.launches):
            raise AssertionError(f"program_order({self.order!r}): no launch ran its programs in another order "
                                 f"({len(self.launches)} launches, grids {[g for g, _ in self.launches]})")


@contextlib.contextmanager
def program_order(order: str = "reversed", seed: int = 0, fail_at: Optional[Tuple[int, int]] = None):
    """Interpreted launches inside run their programs in ``order`` ("natural", "reversed",
    "shuffled" with ``seed``). ``fail_at=(launch, program)``: raise RuntimeError before that
    program of that launch (counted from 0 inside the block), as a launch stopped midway.
    Yields the recorder, whose ``launches`` list each launch's grid and run order."""
    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx  # fails here if they are gone
    permuter = _Permuter(order, seed, fail_at)

    def grid_dim(nx, ny, nz):
        permuter.start((nx, ny, nz))
        return set_dim(nx, ny, nz)

    def grid_idx(x, y, z):
        return set_idx(*permuter.next((x, y, z)))

    own = {name: vars(builder)[name] for name in ("set_grid_dim", "set_grid_idx") if name in vars(builder)}
    builder.set_grid_dim, builder.set_grid_idx = grid_dim, grid_idx
    try:
        yield permuter
        permuter.check_permuted()  # not after an exception: it propagates as it is
    finally:
        for name in ("set_grid_dim", "set_grid_idx"):
            if name in own:
                setattr(builder, name, own[name])
            else:
                delattr(builder, name)
