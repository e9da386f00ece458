"""triton_bn.BatchNorm: any feature axis without copies, center/scale, initializers, Keras parity.

The reference is torch's float64 batch_norm on the input with its feature axis moved to 1.
"""
import pytest
import torch
from torch import nn

import triton_bn
import triton_bn.kernels as kernels
from triton_bn.kernels.launch import clear_plans
from tests.reference import assert_close, assert_no_host_sync, random_input, reference_batch_norm
from triton_bn.axis_norm import BatchNorm, from_keras

C = 5


def _affine_inits(seed):
    """Distinct non-trivial γ, β and running statistics (a callable initializer per tensor)."""
    g = torch.Generator().manual_seed(seed)

    def values(low, high):
        return lambda t: (torch.rand(t.shape, generator=g, dtype=torch.float64) * (high - low) + low).to(t)
    return dict(weight_init=values(0.5, 1.5), bias_init=values(-1, 1),
                running_mean_init=values(-0.5, 0.5), running_var_init=values(0.5, 2.0))


def _check_against_torch(m, x, axis, training, dy_seed=1, dtype=torch.float32):
    """m(x) against float64 torch batch_norm on x.movedim(axis, 1): y, dx, dγ, dβ, running stats."""
    x = x.detach().requires_grad_()
    moved = lambda t: None if t is None else t.movedim(axis, 1)  # noqa: E731
    before = [None if t is None else t.clone() for t in (m.running_mean, m.running_var)]
    y = m(x)
    dy = random_input(tuple(y.shape), x.dtype, x.device, seed=dy_seed)
    y.backward(dy)
    use_batch = training or m.running_mean is None
    ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, ref_db) = reference_batch_norm(
        moved(x), *before, m.weight, m.bias, use_batch, m.momentum, m.eps, dy=moved(dy))
    assert y.dtype == x.dtype
    assert_close(y, ref_y.movedim(1, axis), dtype, "y")
    assert_close(x.grad, ref_dx.movedim(1, axis), dtype, "dx")
    for name, got, ref in (("dweight", m.weight, ref_dw), ("dbias", m.bias, ref_db)):
        if got is not None:
            assert_close(got.grad, ref, dtype, name)
    if m.running_mean is not None:
        assert_close(m.running_mean, ref_rm, dtype, "running_mean")
        assert_close(m.running_var, ref_rv, dtype, "running_var")
    return y


@pytest.mark.parametrize("shape,axis", [
    ((4, C, 6), 1), ((4, 6, C), -1), ((4, 6, C), 2),
    ((3, C, 4, 3), 1), ((3, 4, 3, C), -1), ((3, 4, C, 3), 2),
    ((7, C), -1), ((2, 3, C, 2, 2), 2),
])
@pytest.mark.parametrize("training", [True, False])
def test_any_axis_matches_torch_on_the_permuted_tensor(shape, axis, training, device):
    m = BatchNorm(C, axis=axis, **_affine_inits(seed=2)).to(device).train(training)
    x = random_input(shape, torch.float32, device, seed=3, mean=1.5, std=2.0)
    y = _check_against_torch(m, x, axis, training)
    assert y.shape == x.shape
    assert int(m.num_batches_tracked) == int(training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_parameters(dtype, device):
    m = BatchNorm(C, axis=-1, **_affine_inits(seed=18)).to(device)
    x = random_input((4, 6, C), dtype, device, seed=19, mean=1.0)
    _check_against_torch(m, x, -1, training=True, dtype=dtype)


@pytest.mark.parametrize("shape", [(4, 6, C), (3, 4, 3, C)])
def test_channels_last_axis_makes_no_copy(shape, device, monkeypatch):
    """axis=-1 on a contiguous (N, ..., C) tensor: the kernels read x and dy where they are,
    and y and dx come out as contiguous (N, ..., C) tensors."""
    x = random_input(shape, torch.float32, device, seed=4).requires_grad_()
    dy = random_input(shape, torch.float32, device, seed=5)
    views, merged, copies = [], [], []
    real_input_view, real_mergeable, real_contiguous = kernels.input_view, kernels.mergeable, torch.Tensor.contiguous

    def spy_input_view(t):
        view = real_input_view(t)
        views.append((view.tensor.data_ptr(), view.channels_last))
        return view

    def spy_mergeable(t):
        out = real_mergeable(t)
        merged.append((t.data_ptr(), out.data_ptr()))
        return out

    def spy_contiguous(t, *args, **kwargs):
        out = real_contiguous(t, *args, **kwargs)
        if out.numel() == x.numel() and out.data_ptr() != t.data_ptr():
            copies.append(tuple(t.shape))
        return out
    clear_plans()  # a replayed call (kernels/replay.py) would not run the launcher's Python
    monkeypatch.setattr(kernels, "input_view", spy_input_view)
    monkeypatch.setattr(kernels, "mergeable", spy_mergeable)
    monkeypatch.setattr(torch.Tensor, "contiguous", spy_contiguous)
    m = BatchNorm(C, axis=-1).to(device)
    y = m(x)
    y.backward(dy)
    assert views == [(x.data_ptr(), True)] * 2, "forward and backward must view x in place, channels-last"
    assert dy.data_ptr() in {ptr for ptr, _ in merged}, "backward must see dy"
    assert all(before == after for before, after in merged), "no tensor may be copied to merge its axes"
    assert copies == []
    assert y.shape == x.shape and y.is_contiguous() and x.grad.is_contiguous()


@pytest.mark.parametrize("center,scale", [(True, True), (True, False), (False, True), (False, False)])
def test_center_and_scale_are_independent(center, scale, device):
    m = BatchNorm(C, axis=-1, center=center, scale=scale, **_affine_inits(seed=6)).to(device)
    assert (m.bias is not None, m.weight is not None) == (center, scale)
    assert {n for n, _ in m.named_parameters()} == {n for n, on in (("bias", center), ("weight", scale)) if on}
    expected_keys = [k for k, on in (("weight", scale), ("bias", center)) if on]
    assert list(m.state_dict()) == expected_keys + ["running_mean", "running_var", "num_batches_tracked"]
    assert m.affine == (center and scale)
    x = random_input((4, 6, C), torch.float32, device, seed=7, mean=-1.0)
    _check_against_torch(m, x, -1, training=True)
    # A state_dict round trip into a fresh module with the same options.
    fresh = BatchNorm(C, axis=-1, center=center, scale=scale).to(device)
    fresh.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))


def test_torch_batchnorm1d_checkpoint_loads_into_axis_minus_one():
    torch_bn = nn.BatchNorm1d(C)
    with torch.no_grad():
        for t in (torch_bn.weight, torch_bn.bias, torch_bn.running_mean, torch_bn.running_var):
            t.copy_(torch.randn(C))
    m = BatchNorm(C, axis=-1)
    m.load_state_dict(torch_bn.state_dict())
    assert torch.equal(m.running_var, torch_bn.running_var) and torch.equal(m.weight, torch_bn.weight)


def test_keras_weight_order_loads_by_name():
    """docs/keras.md's port of layer.get_weights() = [gamma, (beta,) moving_mean, moving_variance]."""
    import numpy as np
    center, scale = False, True
    keras_weights = [np.arange(C, dtype=np.float32) + k for k in (1, 10, 20)]  # no beta: center=False
    bn = BatchNorm.from_keras(C, center=center, scale=scale)
    names = [n for n, on in (("weight", scale), ("bias", center)) if on] + ["running_mean", "running_var"]
    bn.load_state_dict({n: torch.from_numpy(w) for n, w in zip(names, keras_weights)}, strict=False)
    for t, w in zip((bn.weight, bn.running_mean, bn.running_var), keras_weights):
        assert torch.equal(t.detach(), torch.from_numpy(w))


def test_initializers_float_inplace_and_returning(device):
    calls = []

    def counting_ones(t):
        calls.append(tuple(t.shape))
        return nn.init.ones_(t)
    m = BatchNorm(C, weight_init=0.5, bias_init=lambda t: torch.full_like(t, -2.0),
                  running_mean_init=lambda t: nn.init.constant_(t, 3.0), running_var_init=counting_ones,
                  device=device)
    assert calls == [(C,)], "each initializer runs once at construction"
    for t, value in ((m.weight, 0.5), (m.bias, -2.0), (m.running_mean, 3.0), (m.running_var, 1.0)):
        assert torch.equal(t.detach(), torch.full((C,), value, device=device))
    with torch.no_grad():
        for t in (m.weight, m.bias, m.running_mean, m.running_var):
            t.add_(7.0)
    m.num_batches_tracked.fill_(4)
    m.reset_running_stats()
    assert m.running_mean[0] == 3.0 and m.running_var[0] == 1.0 and m.num_batches_tracked == 0
    assert m.weight[0] == 7.5, "reset_running_stats leaves the parameters alone"
    m.reset_parameters()
    assert m.weight[0] == 0.5 and m.bias[0] == -2.0
    assert len(calls) == 3
    with pytest.raises(TypeError, match="weight_init must be a float or a callable"):
        BatchNorm(C, weight_init="ones")


def test_momentum_none_is_the_cumulative_average(device):
    m = BatchNorm(C, axis=-1, momentum=None).to(device)
    xs = [random_input((4, 6, C), torch.float32, device, seed=s, mean=s) for s in (8, 9)]
    for x in xs:
        m(x)
    batch_means = torch.stack([x.double().reshape(-1, C).mean(0) for x in xs])
    batch_vars = torch.stack([x.double().reshape(-1, C).var(0) for x in xs])
    assert int(m.num_batches_tracked) == 2
    assert_close(m.running_mean, batch_means.mean(0), torch.float32, "running_mean")
    # The first batch replaces the initial variance of 1 entirely (m = 1/1), then averages.
    assert_close(m.running_var, batch_vars.mean(0), torch.float32, "running_var")


def test_track_running_stats_false_uses_batch_statistics_in_eval(device):
    m = BatchNorm(C, axis=2, track_running_stats=False).to(device).eval()
    assert m.running_mean is None and m.num_batches_tracked is None
    assert "running_mean" not in m.state_dict()
    _check_against_torch(m, random_input((3, 4, C, 3), torch.float32, device, seed=10), 2, training=False)


def test_from_keras_maps_the_arguments_and_the_momentum_rule(device):
    m = from_keras(C, momentum=0.9, epsilon=1e-2, center=False, gamma_initializer=2.0,
                   moving_variance_initializer="ones").to(device)
    assert (m.axis, m.eps, m.momentum, m.bias, m.weight[0].item()) == (-1, 1e-2, 0.1, None, 2.0)
    assert BatchNorm.from_keras(C).momentum == 0.01  # Keras' default momentum=0.99
    x = random_input((8, 3, C), torch.float32, device, seed=11, mean=2.0)
    m(x)
    rows = x.double().reshape(-1, C)
    # Keras: moving = moving * k + batch * (1 - k), k = 0.9; the variance is PyTorch's unbiased one.
    assert_close(m.running_mean, 0.0 * 0.9 + rows.mean(0) * 0.1, torch.float32, "running_mean")
    assert_close(m.running_var, 1.0 * 0.9 + rows.var(0) * 0.1, torch.float32, "running_var")


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma_regularizer=object()), "gamma_regularizer.*weight_decay"),
    (dict(beta_regularizer=object()), "beta_regularizer.*weight_decay"),
    (dict(gamma_constraint=object()), "gamma_constraint.*parametrize"),
    (dict(beta_constraint=object()), "beta_constraint.*parametrize"),
    (dict(synchronized=True), "SyncBatchNorm"),
    (dict(beta_initializer="glorot_uniform"), "beta_initializer='glorot_uniform'"),
    (dict(momentum=1.5), "momentum must be a float in"),
])
def test_from_keras_refuses_what_it_would_silently_ignore(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        from_keras(C, **kwargs)


def test_keras_l2_regularizer_is_weight_decay_on_a_parameter_group(device):
    """Keras gamma_regularizer=L2(l) adds l * sum(gamma**2) to the loss; in PyTorch it is
    weight_decay = 2 * l on the parameter group holding gamma (docs/keras.md)."""
    l2, lr = 0.05, 0.5
    x = random_input((4, 6, C), torch.float32, device, seed=12)
    modules = [from_keras(C, gamma_initializer=1.5).to(device) for _ in range(2)]
    idiom = torch.optim.SGD([{"params": [modules[0].weight], "weight_decay": 2 * l2},
                             {"params": [modules[0].bias], "weight_decay": 0.0}], lr=lr)
    by_hand = torch.optim.SGD(modules[1].parameters(), lr=lr)
    for m, opt, penalty in ((modules[0], idiom, 0.0), (modules[1], by_hand, l2)):
        loss = m(x).pow(3).mean() + penalty * m.weight.pow(2).sum()
        loss.backward()
        opt.step()
    assert_close(modules[0].weight, modules[1].weight, torch.float32, "weight")
    assert not torch.equal(modules[0].weight, torch.full_like(modules[0].weight, 1.5)), "the step must move γ"


def test_keras_constraint_idioms(device):
    """Keras NonNeg() on gamma: (a) projection after each step, Keras' own semantics;
    (b) torch.nn.utils.parametrize, a reparametrization the kernels see as the weight."""
    import torch.nn.utils.parametrize as parametrize

    class NonNeg(nn.Module):
        def forward(self, w):
            return w.clamp(min=0.0)
    x = random_input((4, 6, C), torch.float32, device, seed=13)
    inits = {"weight_init": lambda t: torch.linspace(-1.0, 1.0, C, dtype=t.dtype).to(t)}
    # (a) projection
    m = BatchNorm(C, axis=-1, **inits).to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        m.weight.clamp_(min=0.0)
    assert (m.weight >= 0).all()
    # (b) parametrization: forward and grads go through the constraint.
    m = BatchNorm(C, axis=-1, **inits).to(device)
    parametrize.register_parametrization(m, "weight", NonNeg())
    assert "parametrizations.weight.original" in m.state_dict()
    y = m(x)
    ref_y = reference_batch_norm(x.movedim(-1, 1), None, None, m.weight, m.bias, True, 0.1, m.eps)[0]
    assert_close(y, ref_y.movedim(1, -1), torch.float32, "y")
    y.pow(2).mean().backward()
    grad = m.parametrizations.weight.original.grad
    assert grad is not None and (grad[:C // 2] == 0).all(), "clamped entries get no gradient"


def test_errors_name_the_problem_before_any_state_changes(device):
    m = BatchNorm(C, axis=-1).to(device)
    with pytest.raises(ValueError, match="rank >= 2"):
        m(torch.randn(C, device=device))
    with pytest.raises(IndexError, match="axis 3 is out of range for a 3-D input"):
        BatchNorm(C, axis=3).to(device)(torch.randn(2, 3, C, device=device))
    with pytest.raises(ValueError, match="expected 5 features along axis -1, got 4"):
        m(torch.randn(2, 3, 4, device=device))
    # No γ, β nor running statistics to catch a mismatch: the module still does.
    bare = BatchNorm(C, axis=1, center=False, scale=False, track_running_stats=False)
    with pytest.raises(ValueError, match="expected 5 features along axis 1, got 3"):
        bare(torch.randn(2, 3, C, device=device))
    with pytest.raises(IndexError, match="axis -3 is out of range for a 2-D input"):
        BatchNorm(C, axis=-3)(torch.randn(2, C, device=device))
    with pytest.raises(ValueError, match="axis 0 is the batch axis"):
        BatchNorm(C, axis=-3)(torch.randn(2, 3, C, device=device))
    with pytest.raises(ValueError, match="axis 0 is the batch axis"):
        BatchNorm(C, axis=0)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        BatchNorm(0)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros_like(m.running_mean))


def test_functional_axis_with_running_stats_and_grads(device):
    """triton_bn.batch_norm(..., axis=...) is the functional form of the same thing."""
    x = random_input((3, 4, C, 3), torch.float32, device, seed=14, mean=0.5).requires_grad_()
    w = random_input((C,), torch.float32, device, seed=15).requires_grad_()
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    y = triton_bn.batch_norm(x, rm, rv, w, None, True, 0.2, 1e-4, axis=2)
    dy = random_input(tuple(y.shape), torch.float32, device, seed=16)
    y.backward(dy)
    ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, _) = reference_batch_norm(
        x.movedim(2, 1), torch.zeros(C), torch.ones(C), w, None, True, 0.2, 1e-4, dy=dy.movedim(2, 1))
    assert_close(y, ref_y.movedim(1, 2), torch.float32, "y")
    assert_close(x.grad, ref_dx.movedim(1, 2), torch.float32, "dx")
    assert_close(w.grad, ref_dw, torch.float32, "dweight")
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")


def test_extra_repr_names_the_options():
    assert repr(BatchNorm(C, axis=-1, momentum=None, center=False)) == (
        "BatchNorm(5, axis=-1, eps=1e-05, momentum=None, center=False, scale=True, track_running_stats=True)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronization is a CUDA notion")
def test_no_host_sync_with_cumulative_momentum(device):
    x = random_input((8, 100, 16), torch.float16, device, seed=17).requires_grad_()
    m = BatchNorm(16, axis=-1, momentum=None).to(device)
    assert_no_host_sync(lambda: m(x).float().sum().backward())
