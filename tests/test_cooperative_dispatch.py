"""The launchers' cooperative dispatch (kernels/__init__.py) and the cooperative path's mask.

With the switch on (``use_cooperative``) and the on-chip path off or out of reach, the launchers
take the cooperative path wherever its plan exists; plans here get a small ``elements`` per
program (tests/test_cooperative.py), so small inputs spread over several programs per channel.
Masked calls run it too (docs/masked.md), against tests/test_masked.py's float64 oracle, and an
all-True mask gives the unmasked cooperative call's bits.
"""
import pytest
import torch

import triton_bn.kernels as kernels
from tests.reference import assert_close, random_input, reference_batch_norm
from tests.test_cooperative import ELEMENTS, interpreter_only
from tests.test_kernels import count_launches
from tests.test_masked import EPS, _mask, masked_reference
from triton_bn.kernels import bn_backward, bn_forward_train, cooperative, use_cooperative, use_onchip

CASES = [((6, 3, 5, 7), "contiguous"), ((6, 3, 5, 7), "channels_last"), ((40, 5), "contiguous")]


@pytest.fixture
def small_plans(monkeypatch):
    """The launchers' plans with ELEMENTS per program (several programs per channel block)."""
    planned = []

    def plan_for(view):
        plan = cooperative.cooperative_plan_for(view, elements=ELEMENTS)
        planned.append(plan)
        return plan
    monkeypatch.setattr(kernels, "cooperative_plan_for", plan_for)
    with use_cooperative(True), use_onchip(False):
        yield planned


@interpreter_only
@pytest.mark.parametrize("shape,layout", CASES)
def test_the_launchers_take_the_cooperative_path(shape, layout, small_plans, device, monkeypatch):
    """One launch per direction on a GPU: the three phases of each under the interpreter, and
    no statistics, normalize, reduction or dx launch of the split path."""
    C = shape[1]
    x = random_input(shape, torch.float32, device, layout, seed=1, mean=3.0)
    dy = random_input(shape, torch.float32, device, layout, seed=2)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    calls = count_launches(monkeypatch)
    y, mean, invstd = bn_forward_train(x, w, b, rm, rv, 0.1, EPS)
    dx, dw, db = bn_backward(dy, x, w, mean, invstd, EPS, True)
    assert small_plans[0][3] > 1, "several programs per channel (block)"
    launched = [c.fn.__name__ for c in calls]
    assert launched == ["_bn_cooperative_forward_kernel"] * 3 + ["_bn_cooperative_backward_kernel"] * 3, launched
    ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, torch.zeros(C), torch.ones(C), w, b,
                                                                           True, 0.1, EPS, dy)
    for name, got, want in (("y", y, ref_y), ("running_mean", rm, ref_rm), ("running_var", rv, ref_rv),
                            ("dx", dx, ref_dx), ("dweight", dw, ref_dw), ("dbias", db, ref_db)):
        assert_close(got, want, torch.float32, name, tol=1e-4)


@interpreter_only
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_cooperative_matches_float64(shape, layout, dtype, small_plans, device):
    C = shape[1]
    mask = _mask("random", shape, seed=3).to(device)
    x = random_input(shape, dtype, device, layout, seed=4, mean=50.0)
    dy = random_input(shape, dtype, device, layout, seed=5)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    y, mean, invstd, inv_counts = bn_forward_train(x, w, b, rm, rv, 0.1, EPS, mask=mask)
    dx, dw, db = bn_backward(dy, x, w, mean, invstd, EPS, True, mask=mask, inv_counts=inv_counts)
    assert small_plans[0][3] > 1
    ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, ref_db, _) = masked_reference(x, mask, w, b, torch.zeros(C),
                                                                          torch.ones(C), 0.1, EPS, dy)
    for name, got, want in (("y", y, ref_y), ("running_mean", rm, ref_rm), ("running_var", rv, ref_rv),
                            ("dx", dx, ref_dx), ("dweight", dw, ref_dw), ("dbias", db, ref_db)):
        assert_close(got, want, dtype, name, tol=4e-5 if dtype == torch.float32 else None)


@interpreter_only
def test_an_all_true_mask_is_the_unmasked_cooperative_call(small_plans, device):
    shape = (6, 3, 5, 7)
    x = random_input(shape, torch.float32, device, "channels_last", seed=6)
    dy = random_input(shape, torch.float32, device, seed=7)
    everything = torch.ones((6, 5, 7), dtype=torch.bool, device=device)
    runs = []
    for mask in (None, everything):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        y, mean, invstd, *count = bn_forward_train(x, None, None, rm, rv, 0.1, EPS, mask=mask)
        grads = bn_backward(dy, x, None, mean, invstd, EPS, True, mask=mask, inv_counts=count[0] if count else None)
        runs.append((y, mean, invstd, rm, rv, grads[0]))
    for masked, plain in zip(*runs):
        assert torch.equal(masked, plain)
