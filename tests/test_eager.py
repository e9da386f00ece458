"""Layer 2b: the eager fast path (triton_bn/eager.py): a call signature checked once, then
launched from its recordings.

Each test makes several calls of one signature on new data (the first records, the rest
replay) and checks every one against float64, or checks that a call which differs from a
checked signature in anything the checks read still gets torch's error."""
import pytest
import torch

import triton_bn
from tests.reference import assert_close, random_input, reference_batch_norm
from triton_bn import eager
from triton_bn.kernels import bn_backward, bn_forward_eval, bn_forward_train, replay
from triton_bn.kernels.launch import clear_plans

LAYOUTS = ("contiguous", "channels_last", "strided")


def _replays(launcher):
    return [r for k, r in replay._REPLAYS.items() if k[0] is launcher.__wrapped__ and k[3][0] == "keyed"]


def _vectors(device, dtype, seed):
    w = random_input((5,), dtype, device, seed=seed)
    b = random_input((5,), dtype, device, seed=seed + 1)
    return w, b, torch.zeros(5, device=device, dtype=dtype), torch.ones(5, device=device, dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_replayed_calls_match_the_reference(device, layout, dtype, training, either_path):
    """Forward, backward and running statistics of a recorded, then twice replayed, signature."""
    param_dtype = torch.float32
    w, b, rm, rv = _vectors(device, param_dtype, seed=1)
    w.requires_grad_(True), b.requires_grad_(True)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    clear_plans()
    for call in range(3):
        x = random_input((3, 5, 4, 6), dtype, device, layout, seed=10 + call, mean=4.0 * call).requires_grad_(True)
        dy = random_input((3, 5, 4, 6), dtype, device, layout, seed=20 + call)
        y = triton_bn.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-5)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
        ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, ref_rm, ref_rv, w, b, training,
                                                                               0.3, 1e-5, dy)
        for name, got, want in (("y", y, ref_y), ("dx", dx, ref_dx), ("running_mean", rm, ref_rm),
                                ("running_var", rv, ref_rv)):
            assert_close(got, want, dtype, f"{name}, call {call}")
        for name, got, want in (("dweight", dw, ref_dw), ("dbias", db, ref_db)):
            # A sum over the 72 values of a channel: accumulation error grows with it.
            assert_close(got, want, dtype, f"{name}, call {call}", tol=None if dtype == torch.float32 else 2e-2)
    forward = bn_forward_train if training else bn_forward_eval
    assert [type(r).__name__ for r in _replays(forward)] == ["_Replay"]
    assert [type(r).__name__ for r in _replays(bn_backward)] == ["_Replay"]


def test_module_calls_take_the_fast_path(device, monkeypatch):
    """A layer's second call of a signature runs no check and computes no launcher key."""
    layer = triton_bn.BatchNorm2d(5, device=device)
    x = random_input((2, 5, 3, 3), torch.float32, device, seed=3)
    layer(x)
    layer.eval()
    layer(x)
    layer.train()
    checked, metas = [], []
    monkeypatch.setattr(eager, "check_args", lambda *a, **k: checked.append(a))
    monkeypatch.setattr(replay, "_meta", lambda v: metas.append(v) or v)
    for training in (True, False, True):
        layer.train(training)
        layer(x)
    assert checked == [] and metas == []
    assert int(layer.num_batches_tracked) == 3


def _bad_variants(device, w, b, rm, rv):
    """(name, changed call arguments, torch's error class, message) for one checked call."""
    yield "weight dtype", dict(weight=w.double()), RuntimeError, "mixed dtype"
    yield "weight size", dict(weight=torch.ones(4, device=device)), RuntimeError, "weight should contain 5"
    yield "running_var size", dict(running_var=torch.ones(6, device=device)), RuntimeError, "running_var should"
    yield "eps", dict(eps=0.0), ValueError, "eps must be positive"
    yield "momentum", dict(momentum=None), TypeError, "momentum"
    yield "weight device", dict(weight=torch.ones(5, device="meta")), RuntimeError, "same device"
    yield "one value per channel", dict(input=random_input((1, 5, 1, 1), torch.float32, device, seed=9)), \
        ValueError, "more than 1 value per channel"


@pytest.mark.parametrize("variant", range(7))
def test_a_checked_signature_does_not_pass_another(device, variant):
    """After a good call, a call differing in anything the checks read still gets torch's
    error, before any kernel: the running statistics stay as they were."""
    w, b, rm, rv = _vectors(device, torch.float32, seed=4)
    x = random_input((2, 5, 3, 3), torch.float32, device, seed=5)
    args = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True, momentum=0.1, eps=1e-5)
    triton_bn.batch_norm(**args)
    name, change, error, message = list(_bad_variants(device, w, b, rm, rv))[variant]
    before = rm.clone(), rv.clone()
    with pytest.raises(error, match=message):
        triton_bn.batch_norm(**{**args, **change})
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]), name
    with pytest.raises(error, match=message):  # the failed signature was not kept
        triton_bn.batch_norm(**{**args, **change})


def test_a_saved_input_copied_by_a_hook_is_a_new_backward_signature(device):
    """A saved-tensors hook may hand the backward a copy of x with other strides than the
    forward's x (save_on_cpu, offloading): the backward's key holds the saved x's strides."""
    w, b, rm, rv = _vectors(device, torch.float32, seed=6)
    w.requires_grad_(True)
    clear_plans()
    for call, hooked in enumerate((False, True, True)):
        x = random_input((2, 5, 3, 4), torch.float32, device, "channels_last", seed=30 + call).requires_grad_(True)
        dy = random_input((2, 5, 3, 4), torch.float32, device, seed=40 + call)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous() if hooked else t):
            y = triton_bn.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        _, _, _, (ref_dx, ref_dw, _) = reference_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, dy)
        assert_close(dx, ref_dx, torch.float32, f"dx, call {call}")
        assert_close(dw, ref_dw, torch.float32, f"dweight, call {call}")


def test_the_caches_are_bounded(device, monkeypatch):
    """A momentum schedule makes a signature, a replay and a plan per value (their keys hold
    float arguments by value): the caches forget rather than grow, and results stay right."""
    from triton_bn.kernels import launch
    monkeypatch.setattr(eager, "_MAX_CALLS", 3)
    monkeypatch.setattr(replay, "MAX_REPLAYS", 3)
    monkeypatch.setattr(launch, "MAX_PLANS", 3)
    eager._CALLS.clear()
    clear_plans()
    w, b, rm, rv = _vectors(device, torch.float32, seed=7)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    for step in range(6):
        x = random_input((2, 5, 3), torch.float32, device, seed=50 + step, mean=1.0)
        momentum = 1.0 / (step + 1)
        y = triton_bn.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5)
        ref_y, ref_rm, ref_rv, _ = reference_batch_norm(x, ref_rm, ref_rv, w, b, True, momentum, 1e-5)
        assert_close(y, ref_y, torch.float32, f"y, step {step}")
        assert len(eager._CALLS) <= 3 and len(replay._REPLAYS) <= 3
        assert all(len(kernel.plans) <= 3 for kernel in launch.all_launches())
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")


@pytest.mark.parametrize("activation,residual", [("relu", True), ("relu", False), ("silu", True), (None, True)],
                         ids=["relu-residual", "relu", "silu-residual", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_replayed_calls_match_the_reference(device, activation, residual, training, either_path):
    """act(BN(x) + r), forward and backward (dresidual included), recorded then replayed."""
    from tests.test_fused import EPS, SLOPE, reference
    w, b, rm, rv = _vectors(device, torch.float32, seed=11)
    w.requires_grad_(True), b.requires_grad_(True)
    clear_plans()
    for call in range(3):
        x = random_input((3, 5, 4, 3), torch.float32, device, seed=60 + call, mean=2.0 * call).requires_grad_(True)
        r = random_input((3, 5, 4, 3), torch.float32, device, "channels_last", seed=70 + call) if residual else None
        r = None if r is None else r.requires_grad_(True)
        dy = random_input((3, 5, 4, 3), torch.float32, device, seed=80 + call)
        ref_y, ref_rm, ref_rv, ref_grads = reference(x, r, w, b, rm, rv, training, activation, "input", dy)
        y = triton_bn.batch_norm(x, rm, rv, w, b, training, 0.1, EPS, activation=activation, negative_slope=SLOPE,
                                 residual=r)
        grads = torch.autograd.grad(y, [t for t in (x, w, b, r) if t is not None], dy)
        assert_close(y, ref_y, torch.float32, f"y, call {call}")
        assert_close(rm, ref_rm, torch.float32, f"running_mean, call {call}")
        for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, ref_grads):
            assert_close(got, want, torch.float32, f"{name}, call {call}")
    forward = bn_forward_train if training else bn_forward_eval
    assert [type(r).__name__ for r in _replays(forward)] == ["_Replay"]
    assert [type(r).__name__ for r in _replays(bn_backward)] == ["_Replay"]


def test_other_calls_take_the_general_path(device):
    """Strided running statistics and the memory mode (save="output") are not the fast path's:
    no checked signature is kept for them."""
    eager._CALLS.clear()
    x = random_input((2, 6, 3), torch.float32, device, seed=8)
    strided = torch.zeros(12, device=device)[::2]
    triton_bn.batch_norm(x, strided, torch.ones(6, device=device), training=True)
    triton_bn.batch_norm(x, None, None, training=True, activation="leaky_relu", save="output")
    assert list(eager._CALLS.values()) == [eager._GENERAL]
    assert_close(strided, 0.1 * x.double().mean((0, 2)), torch.float32, "strided running_mean")


def test_a_plain_module_call_goes_straight_to_the_fast_path(device, monkeypatch):
    """From the layer's forward to eager.run, not through functional._batch_norm (a frame
    with its own argument tests, ~0.5 us); a masked call still takes the general path. A layer
    whose track_running_stats was turned off after construction keeps its buffers: training
    normalizes with the batch and leaves them alone, eval reads them (torch's rule)."""
    from triton_bn import modules
    layer = triton_bn.BatchNorm2d(5, device=device)
    x = random_input((2, 5, 3, 3), torch.float32, device, seed=12, mean=3.0)
    general = []
    original = modules._batch_norm
    monkeypatch.setattr(modules, "_batch_norm", lambda *a, **k: general.append(k) or original(*a, **k))
    for training in (True, False, True):
        layer.train(training)
        layer(x)
    assert general == []
    layer.track_running_stats = False
    before = layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked)
    y = layer(x)
    ref_y = reference_batch_norm(x, None, None, layer.weight, layer.bias, True, 0.1, 1e-5)[0]
    assert_close(y, ref_y, torch.float32, "batch statistics, no running update")
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == before[2]
    layer.eval()
    ref_y = reference_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.1,
                                 1e-5)[0]
    assert_close(layer(x), ref_y, torch.float32, "eval: the running statistics")
    assert general == []
    layer.train()
    layer(x, mask=torch.ones(2, 3, 3, dtype=torch.bool, device=device))
    assert len(general) == 1 and "mask" in general[0]


def test_a_replayed_result_keeps_its_none_entries(device):
    """A replay returns what the recorded call returned, None entries included (a gradient
    not asked for): replay.py maps a None to the table's None slot, not to a tensor."""
    w, b, rm, rv = _vectors(device, torch.float32, seed=13)
    clear_plans()
    for call in range(3):
        x = random_input((2, 5, 3, 4), torch.float32, device, seed=90 + call)
        dy = random_input((2, 5, 3, 4), torch.float32, device, seed=95 + call)
        _, mean, invstd = bn_forward_train(x, w, b, rm, rv)
        dx, dw, db = bn_backward(dy, x, w, mean, invstd, 1e-5, True, (True, False, True))
        assert dw is None and isinstance(dx, torch.Tensor) and isinstance(db, torch.Tensor), call
        assert_close(db, dy.double().sum((0, 2, 3)), torch.float32, f"dbias, call {call}")
        dx, dw, db = bn_backward(dy, x, w, mean, invstd, 1e-5, True, (False, True, False))
        assert dx is None and db is None and isinstance(dw, torch.Tensor), call
    assert [type(r).__name__ for r in replay._REPLAYS.values() if r is not replay._NOT_REPLAYABLE].count("_Replay") >= 3
