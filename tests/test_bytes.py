"""Bytes each op moves, counted through Triton's interpreter, against README's table.

Every masked load and store the interpreter executes is recorded with its addresses; the
elements that fall inside an ``[N, Q, K]`` tensor (x, y, dy, dx) are counted per tensor.
Per-channel vectors, partials and the statistics' pivot row are not in those ranges (the pivot
row is, and is the allowance below: one element per program and channel).

    split path
    forward, training   x read twice (statistics, normalize), y written once     3·T·e
    forward, eval       x read once, y written once                              2·T·e
    backward, training  x and dy read twice (reduction, dx), dx written once     5·T·e
    on-chip path (a channel's slab fits in registers, kernels/onchip.py)
    forward, training   x read once, y written once                              2·T·e
    backward, training  x and dy read once, dx written once                      3·T·e
"""
import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from tests.reference import random_input
from triton_bn.kernels import bn_backward, bn_forward_eval, bn_forward_train, use_onchip

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's memory accesses")


class _Accesses:
    def __init__(self):
        self.loads, self.stores = [], []

    def count(self, tensor: torch.Tensor, kind: str) -> float:
        """Elements of ``tensor``'s storage span touched by ``kind`` accesses, in units of numel."""
        lo = tensor.data_ptr()
        hi = lo + (tensor.untyped_storage().nbytes())
        total = 0
        for addresses in (self.loads if kind == "load" else self.stores):
            total += int(np.count_nonzero((addresses >= lo) & (addresses < hi)))
        return total / tensor.numel()


@pytest.fixture
def accesses(monkeypatch):
    record = _Accesses()
    builder = interpreter.InterpreterBuilder
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store

    def load(self, ptrs, mask, *args):
        record.loads.append(ptrs.data[mask.data].astype(np.uint64).ravel())
        return masked_load(self, ptrs, mask, *args)

    def store(self, ptrs, value, mask, *args):
        record.stores.append(ptrs.data[mask.data].astype(np.uint64).ravel())
        return masked_store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(builder, "create_masked_load", load)
    monkeypatch.setattr(builder, "create_masked_store", store)
    return record


LAYOUTS = [((8, 4, 16, 16), "contiguous"), ((8, 4, 16, 16), "channels_last"), ((512, 24), "contiguous")]
# The pivot row (one element per channel and statistics program) is read from x as well.
PIVOT_ALLOWANCE = 0.02


def _close(measured: float, expected: float, name: str):
    assert expected <= measured <= expected + PIVOT_ALLOWANCE, f"{name}: {measured:.3f} x numel, model {expected}"


@pytest.mark.parametrize("shape,layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@use_onchip(False)
def test_forward_training_reads_x_twice_writes_y_once(shape, layout, dtype, accesses, device):
    x = random_input(shape, dtype, device, layout, seed=30)
    C = shape[1]
    bn_forward_train(x, None, None, torch.zeros(C, device=device), torch.ones(C, device=device))  # tunes
    accesses.loads.clear(), accesses.stores.clear()
    y, _, _ = bn_forward_train(x, None, None, torch.zeros(C, device=device), torch.ones(C, device=device))
    _close(accesses.count(x, "load"), 2.0, "x loads")
    _close(accesses.count(y, "store"), 1.0, "y stores")
    assert accesses.count(x, "store") == 0 and accesses.count(y, "load") == 0


@pytest.mark.parametrize("shape,layout", LAYOUTS)
def test_forward_eval_reads_x_once(shape, layout, accesses, device):
    x = random_input(shape, torch.float32, device, layout, seed=31)
    C = shape[1]
    bn_forward_eval(x, None, None, torch.zeros(C, device=device), torch.ones(C, device=device))  # tunes
    accesses.loads.clear(), accesses.stores.clear()
    y = bn_forward_eval(x, None, None, torch.zeros(C, device=device), torch.ones(C, device=device))
    _close(accesses.count(x, "load"), 1.0, "x loads")
    _close(accesses.count(y, "store"), 1.0, "y stores")


@pytest.mark.parametrize("shape,layout", LAYOUTS)
@use_onchip(False)
def test_backward_training_reads_x_and_dy_twice(shape, layout, accesses, device):
    x = random_input(shape, torch.float32, device, layout, seed=32)
    dy = random_input(shape, torch.float32, device, layout, seed=33)
    _, mean, invstd = bn_forward_train(x, None, None, None, None)
    bn_backward(dy, x, None, mean, invstd)  # tunes
    accesses.loads.clear(), accesses.stores.clear()
    dx, _, _ = bn_backward(dy, x, None, mean, invstd)
    _close(accesses.count(x, "load"), 2.0, "x loads")
    _close(accesses.count(dy, "load"), 2.0, "dy loads")
    _close(accesses.count(dx, "store"), 1.0, "dx stores")


@pytest.mark.parametrize("shape,layout", LAYOUTS[:2])
@use_onchip(False)
def test_fused_residual_is_read_once_forward_and_twice_backward(shape, layout, accesses, device):
    """act(BN(x) + r): r once in the forward; the backward recomputes z in both of its passes
    (r twice), writes dx and dr once each, and never writes the pre-activation."""
    from triton_bn.kernels.activation import activation_code
    relu = activation_code("relu")
    x = random_input(shape, torch.float32, device, layout, seed=34)
    r = random_input(shape, torch.float32, device, "contiguous", seed=35)
    dy = random_input(shape, torch.float32, device, layout, seed=36)
    w, b = torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)
    for _ in range(2):  # the first call of each launch tunes
        accesses.loads.clear(), accesses.stores.clear()
        y, mean, invstd = bn_forward_train(x, w, b, None, None, activation=relu, residual=r)
    _close(accesses.count(x, "load"), 2.0, "x loads")
    _close(accesses.count(r, "load"), 1.0, "residual loads")
    _close(accesses.count(y, "store"), 1.0, "y stores")
    for _ in range(2):
        accesses.loads.clear(), accesses.stores.clear()
        dx, _, _, dr = bn_backward(dy, x, w, mean, invstd, needs_input_grad=(True, True, True, True), bias=b,
                                   activation=relu, residual=r)
    _close(accesses.count(x, "load"), 2.0, "x loads")
    _close(accesses.count(dy, "load"), 2.0, "dy loads")
    _close(accesses.count(r, "load"), 2.0, "residual loads")
    _close(accesses.count(dx, "store"), 1.0, "dx stores")
    _close(accesses.count(dr, "store"), 1.0, "dresidual stores")
    stored = sum(len(a) for a in accesses.stores)
    big = dx.numel() + dr.numel()
    assert stored <= big * (1 + PIVOT_ALLOWANCE), f"{stored} elements stored: more than dx and dr"


# (8, 4, 16, 16) has 2048 elements per channel: too many for one program on chip. These fit.
ONCHIP_LAYOUTS = [((8, 4, 8, 16), "contiguous"), ((8, 8, 4, 16), "channels_last"), ((512, 24), "contiguous")]


@pytest.mark.parametrize("shape,layout", ONCHIP_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onchip_forward_training_reads_x_once(shape, layout, dtype, accesses, device):
    from triton_bn.kernels import input_view, onchip
    x = random_input(shape, dtype, device, layout, seed=37)
    assert onchip.onchip_tile_for(input_view(x)) is not None
    C = shape[1]
    y, _, _ = bn_forward_train(x, None, None, torch.zeros(C, device=device), torch.ones(C, device=device))
    _close(accesses.count(x, "load"), 1.0, "x loads")
    _close(accesses.count(y, "store"), 1.0, "y stores")
    assert accesses.count(x, "store") == 0 and accesses.count(y, "load") == 0


@pytest.mark.parametrize("shape,layout", ONCHIP_LAYOUTS)
def test_onchip_backward_reads_x_and_dy_once(shape, layout, accesses, device):
    x = random_input(shape, torch.float32, device, layout, seed=38)
    dy = random_input(shape, torch.float32, device, layout, seed=39)
    _, mean, invstd = bn_forward_train(x, None, None, None, None)
    accesses.loads.clear(), accesses.stores.clear()
    dx, _, _ = bn_backward(dy, x, None, mean, invstd)
    _close(accesses.count(x, "load"), 1.0, "x loads")
    _close(accesses.count(dy, "load"), 1.0, "dy loads")
    _close(accesses.count(dx, "store"), 1.0, "dx stores")


def test_onchip_fused_residual_is_read_once_each_way(accesses, device):
    from triton_bn.kernels.activation import activation_code
    relu, shape = activation_code("relu"), (8, 4, 8, 16)
    x = random_input(shape, torch.float32, device, seed=40)
    r = random_input(shape, torch.float32, device, "channels_last", seed=41)
    dy = random_input(shape, torch.float32, device, seed=42)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    y, mean, invstd = bn_forward_train(x, w, b, None, None, activation=relu, residual=r)
    _close(accesses.count(x, "load"), 1.0, "x loads")
    _close(accesses.count(r, "load"), 1.0, "residual loads")
    accesses.loads.clear(), accesses.stores.clear()
    dx, _, _, dr = bn_backward(dy, x, w, mean, invstd, needs_input_grad=(True, True, True, True), bias=b,
                               activation=relu, residual=r)
    for name, tensor in (("x", x), ("dy", dy), ("residual", r)):
        _close(accesses.count(tensor, "load"), 1.0, f"{name} loads")
    _close(accesses.count(dx, "store"), 1.0, "dx stores")
    _close(accesses.count(dr, "store"), 1.0, "dresidual stores")


@pytest.mark.parametrize("shape,layout", LAYOUTS[:2] + ONCHIP_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_reads_at_most_its_allowance_and_adds_no_launch(shape, layout, dtype, accesses, device):
    """Masked batch norm (issue 20): x, dy, y and dx move exactly what they move unmasked, the
    mask (bool) is read at most T·e + N·S bytes in all (channels-first programs re-read its rows
    per channel, from L2 on a GPU), and the launches are the unmasked call's, on either path."""
    from tests.test_kernels import count_launches
    x = random_input(shape, dtype, device, layout, seed=37)
    dy = random_input(shape, dtype, device, layout, seed=38)
    mask = torch.rand((shape[0], *shape[2:]), generator=torch.Generator().manual_seed(39)).to(device) > 0.3
    T, NS = x.numel(), mask.numel()
    moved, launches = {}, {}
    with use_onchip(shape in [s for s, _ in ONCHIP_LAYOUTS]):
        for masked in (False, True):
            m = mask if masked else None
            for _ in range(2):  # the first call of each launch tunes
                with pytest.MonkeyPatch.context() as patch:  # not the accesses fixture's patch
                    calls = count_launches(patch)
                    accesses.loads.clear(), accesses.stores.clear()
                    out = bn_forward_train(x, None, None, None, None, mask=m)
                    forward_launches = len(calls)
                    forward_mask_bytes = accesses.count(mask, "load") * NS
                    grads = bn_backward(dy, x, None, out[1], out[2], mask=m, inv_counts=out[3] if masked else None)
            launches[masked] = (forward_launches, len(calls) - forward_launches)
            moved[masked] = [accesses.count(x, "load"), accesses.count(dy, "load"), accesses.count(out[0], "store"),
                             accesses.count(grads[0], "store")]
            mask_bytes = (forward_mask_bytes, accesses.count(mask, "load") * NS - forward_mask_bytes)
    assert moved[True] == moved[False], f"x, dy loads, y, dx stores: {moved}"
    assert launches[True] == launches[False], launches
    for direction, read in zip(("forward", "backward"), mask_bytes):
        assert 0 < read <= T * x.element_size() + NS, f"{direction}: {read} mask bytes read"
