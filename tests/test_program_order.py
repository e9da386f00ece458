"""Results do not depend on the order programs run in (tests/program_order.py).

Each path runs forward and backward with the interpreter's natural grid order, then reversed
and shuffled (the program that draws a channel's last ticket, hence combines, changes), and
must give the very same bits: outputs, gradients, running statistics, step counts. Small
shapes with several splits per channel, so that a channel has several programs to reorder.
Allocations are poisoned (NaN), so a read of a partial no program has written yet shows up
instead of reading back the previous run's value from reused memory.
"""
import contextlib

import pytest
import torch
import triton
import triton.language as tl

from tests.program_order import program_order
from tests.reference import random_input
from triton_bn.kernels import bn_backward, bn_forward_train
from triton_bn.kernels.activation import LEAKY_RELU
from triton_bn.kernels.tuning import use_onchip

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="reorders the interpreter's grid (CPU only)")


@triton.jit
def _arrival_kernel(rank_ptr,  # [programs] int32 out: the order program (i, j) ran in, row-major i * n1 + j
                    counter_ptr):  # [1] int32, zero
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(rank_ptr + pid, tl.atomic_add(counter_ptr, 1))


def _arrival_ranks(grid):
    """Each program's rank in the run order, by a ticket it draws."""
    rank, counter = torch.full((grid[0] * grid[1],), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    _arrival_kernel[grid](rank, counter)
    return rank.tolist()


def test_the_grid_runs_in_the_order_asked_for():
    n = 12
    assert _arrival_ranks((3, 4)) == list(range(n))
    with program_order("reversed") as order:
        assert _arrival_ranks((3, 4)) == list(reversed(range(n)))
    assert order.launches[0][0] == (3, 4, 1)
    with program_order("shuffled", seed=1):
        shuffled = _arrival_ranks((3, 4))
    assert sorted(shuffled) == list(range(n)) and shuffled != list(range(n))
    assert _arrival_ranks((3, 4)) == list(range(n))  # the interpreter is restored


def test_a_block_where_nothing_was_reordered_fails_loudly():
    with pytest.raises(AssertionError, match="no launch ran its programs in another order"):
        with program_order("reversed"):
            _arrival_ranks((1, 1))


def _poison(tensor):
    with torch.no_grad():
        if tensor.dtype.is_floating_point:
            tensor.fill_(float("nan"))
        elif tensor.dtype != torch.bool:
            tensor.fill_(-1)
    return tensor


@contextlib.contextmanager
def _poisoned_allocations():
    """torch.empty, empty_like, empty_strided and Tensor.new_empty_strided (replays allocate
    through it) return tensors filled with NaN (-1 for integers)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("empty", "empty_like", "empty_strided"):
            patch.setattr(torch, name, lambda *a, _allocate=getattr(torch, name), **k: _poison(_allocate(*a, **k)))
        allocate = torch.Tensor.new_empty_strided
        patch.setattr(torch.Tensor, "new_empty_strided", lambda self, *a, **k: _poison(allocate(self, *a, **k)))
        yield


def _split_or_onchip(onchip, fused, layout, shape):
    """(forward+backward results) of bn_forward_train / bn_backward on one path."""
    C = shape[1]
    x = random_input(shape, torch.float32, "cpu", layout, seed=1, mean=3.0, std=2.0)
    dy = random_input(shape, torch.float32, "cpu", layout, seed=2)
    w, b = torch.linspace(0.5, 1.5, C), torch.linspace(-0.2, 0.2, C)
    r = random_input(shape, torch.float32, "cpu", layout, seed=3) if fused else None
    epilogue = dict(activation=LEAKY_RELU, negative_slope=0.1, residual=r) if fused else {}
    splits = None if onchip else 3

    def run():
        rm, rv, steps = torch.zeros(C), torch.ones(C), torch.tensor(4)
        with use_onchip(onchip):
            # momentum=None: the cumulative average reads the step counter the launch moves.
            y, mean, invstd = bn_forward_train(x, w, b, rm, rv, None, 1e-5, steps, splits, **epilogue)
            grads = bn_backward(dy, x, w, mean, invstd, 1e-5, True, (True, True, True, fused), splits,
                                bias=b, **epilogue)
        return dict(y=y, mean=mean, invstd=invstd, running_mean=rm, running_var=rv, steps=steps,
                    **{name: g for name, g in zip(("dx", "dweight", "dbias", "dresidual"), grads)})
    return run


def _sync(shape):
    """SyncBatchNorm's kernels (partials, combine, combine of the ranks' moments, backward
    reduction): one rank, the collectives replaced by what one rank's would return."""
    from triton_bn import distributed
    C = shape[1]
    x = random_input(shape, torch.float32, "cpu", seed=4, mean=-2.0)
    dy = random_input(shape, torch.float32, "cpu", seed=5)

    def run():
        rm, rv = torch.zeros(C), torch.ones(C)
        w, b = torch.linspace(0.5, 1.5, C).requires_grad_(), torch.linspace(-0.2, 0.2, C).requires_grad_()
        xg = x.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(distributed, "_all_gather_moments", lambda moments, group, world: moments[None].clone())
            patch.setattr(distributed.dist, "all_reduce", lambda tensor, op=None, group=None: None)
            y = distributed.sync_batch_norm(xg, rm, rv, w, b, 0.1, 1e-5, None, 1)
            y.backward(dy)
        return dict(y=y.detach(), running_mean=rm, running_var=rv, dx=xg.grad, dweight=w.grad, dbias=b.grad)
    return run


PATHS = {
    "split": lambda: _split_or_onchip(False, False, "contiguous", (5, 3, 6, 7)),
    "split-fused-channels-last": lambda: _split_or_onchip(False, True, "channels_last", (6, 5, 4, 5)),
    "onchip-fused": lambda: _split_or_onchip(True, True, "contiguous", (4, 3, 5, 6)),
    "onchip-channels-last": lambda: _split_or_onchip(True, False, "channels_last", (16, 20, 8, 8)),  # 3 blocks
    "sync": lambda: _sync((8, 3, 32, 32)),  # 2 splits per channel at the CPU's default split
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_results_do_not_depend_on_program_order(path):
    run = PATHS[path]()
    with _poisoned_allocations():
        expected = run()
    for order, seed in (("reversed", 0), ("shuffled", 7)):
        with _poisoned_allocations(), program_order(order, seed) as recorder:
            got = run()
        assert set(got) == set(expected)
        for name, value in expected.items():
            if value is not None:
                assert torch.equal(got[name], value), f"{path}: {name} differs with the grid {order}"
        several = [grid for grid, _ in recorder.launches if grid[1] > 1]
        assert several or path.startswith("onchip"), f"{path}: no launch had several splits per channel"
