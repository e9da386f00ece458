"""In place (``inplace=True`` with save="output"): y written over x, and the inputs that cannot
be written in place refused with torch's error before any kernel runs or any buffer moves."""
import pytest
import torch

import triton_bn
from tests.reference import assert_close, random_input
from tests.test_fused import SLOPE, _setup, reference


def test_inplace_on_a_leaf_that_requires_grad_is_refused(device):
    x = random_input((3, 4, 5), torch.float32, device, seed=11).requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable"):
        triton_bn.batch_norm(x, None, None, training=True, activation="leaky_relu", save="output", inplace=True)


def _torch_overlap_error() -> str:
    """torch's own message for an in-place op on a self-overlapping tensor."""
    with pytest.raises(RuntimeError) as info:
        torch.zeros(3).expand(2, 3).add_(1.0)
    return str(info.value)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("onchip", [True, False])
def test_inplace_on_a_self_overlapping_input_raises_torchs_error_before_any_kernel(training, onchip, device):
    """An expanded (stride-0) input: several elements share one location, so their programs
    would race on a GPU (on the CPU the result was off by ~97). torch's in-place ops refuse it."""
    from triton_bn.kernels.tuning import use_onchip
    x = random_input((1, 4, 6), torch.float32, device, seed=13).expand(3, 4, 6)
    x_before = x.clone()
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with use_onchip(onchip), pytest.raises(RuntimeError) as info:
        triton_bn.batch_norm(x, rm, rv, training=training, activation="leaky_relu", save="output", inplace=True)
    assert str(info.value) == _torch_overlap_error()
    assert torch.equal(rm, torch.zeros(4, device=device)) and torch.equal(rv, torch.ones(4, device=device))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("onchip", [True, False])
def test_inplace_on_an_unaddressable_view_raises_before_the_statistics_launch(onchip, device):
    """Spatial dims sliced in two directions do not merge (view.py): the kernels would read a
    contiguous copy and cannot write the view in place. The error comes before any launch, so
    the running statistics and the step counter stay as they were (the split path used to run
    the statistics launch first)."""
    from triton_bn.kernels.tuning import use_onchip
    m = triton_bn.BatchNormAct2d(3, act_layer="leaky_relu", save="output", inplace=True).to(device)
    x = random_input((2, 3, 9, 9), torch.float32, device, seed=14)[:, :, 1:7, 2:8]
    x_before = x.clone()
    with use_onchip(onchip), pytest.raises(ValueError, match="do not merge"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_mean, torch.zeros(3, device=device))
    assert torch.equal(m.running_var, torch.ones(3, device=device))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("training", [True, False])
def test_inplace_writes_y_over_x_and_backpropagates(training, device):
    case = dict(dtype=torch.float32, layout="channels_last", residual=True)
    x, r, dy, w, b, rm, rv = _setup(case, device, seed=12)
    leaf = x.detach().clone().requires_grad_()
    h = leaf * 1.0  # a non-leaf, as a convolution's output would be
    ri = r.detach().clone().requires_grad_()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = triton_bn.batch_norm(h, rm, rv, w, b, training, activation="leaky_relu", negative_slope=SLOPE,
                             residual=ri, save="output", inplace=True)
    assert y.data_ptr() == h.data_ptr() and h._version > 0
    y.backward(dy)
    ref_y, ref_rm, _, ref_grads = reference(x, r, w, b, rm_ref, rv_ref, training, "leaky_relu", "output", dy)
    assert_close(y, ref_y, torch.float32, "y")
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), (leaf.grad, w.grad, b.grad, ri.grad),
                               ref_grads):
        assert_close(got, want, torch.float32, name)
