"""Layer 3: the modules are drop-in replacements for torch.nn.BatchNorm1d/2d/3d."""
import copy
import inspect

import pytest
import torch
from torch import nn

import triton_bn
from tests.reference import assert_close, random_input

PAIRS = [(triton_bn.BatchNorm1d, nn.BatchNorm1d, (6, 5)), (triton_bn.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7)),
         (triton_bn.BatchNorm2d, nn.BatchNorm2d, (3, 5, 4, 6)), (triton_bn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 2))]


def _twins(ours_cls, torch_cls, device, **kwargs):
    ref = torch_cls(5, device=device, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours = ours_cls(5, device=device, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_is_a_torch_batchnorm_with_the_same_state(ours_cls, torch_cls, shape, device):
    ours, ref = _twins(ours_cls, torch_cls, device)
    assert isinstance(ours, torch_cls)
    assert inspect.signature(ours_cls.__init__) == inspect.signature(torch_cls.__init__)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(5, device=device)) and int(ours.num_batches_tracked) == 0
    bad = torch.randn(*shape[:1], device=device)
    with pytest.raises(ValueError, match="expected"):
        ours(bad)  # torch's own _check_input_dim


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_steps_then_eval_match_torch(ours_cls, torch_cls, shape, momentum, dtype, device):
    ours, ref = _twins(ours_cls, torch_cls, device, momentum=momentum)
    layout = "channels_last" if len(shape) >= 4 else "contiguous"
    for step in range(3):
        x = random_input(shape, dtype, device, layout, seed=step, mean=step, std=1 + step)
        # torch's fp32 module on the upcast batch: the same statistics, then one rounding.
        assert_close(ours(x), ref(x.float()), dtype, f"y step {step}")
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert_close(ours.running_mean, ref.running_mean, torch.float32, "running_mean")
    assert_close(ours.running_var, ref.running_var, torch.float32, "running_var")
    ours.eval(), ref.eval()
    x = random_input(shape, dtype, device, layout, seed=9)
    assert_close(ours(x), ref(x.float()), dtype, "eval y")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("onchip", [True, False])
def test_the_step_counter_moves_inside_the_statistics_launch(momentum, onchip, device, monkeypatch):
    """A training forward is the batch-norm kernels and nothing else (2 launches split, 1 on
    chip): the statistics kernel increments num_batches_tracked itself (torch's module
    launches an add_ for it)."""
    from tests.test_kernels import count_launches
    from triton_bn.kernels.tuning import use_onchip
    ours = triton_bn.BatchNorm2d(4, momentum=momentum).to(device)
    x = random_input((3, 4, 5, 2), torch.float32, device, seed=3)
    with use_onchip(onchip):
        ours(x)  # the first call of a shape tunes and compiles
        calls = count_launches(monkeypatch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            ours(x)
    assert len(calls) == (1 if onchip else 2)
    assert int(ours.num_batches_tracked) == 2
    assert not [e.name for e in profile.events() if e.name.startswith("aten::add")], "a separate counter op ran"


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_affine_and_tracking_flags(affine, track_running_stats, device):
    ours, ref = _twins(triton_bn.BatchNorm2d, nn.BatchNorm2d, device, affine=affine,
                       track_running_stats=track_running_stats)
    x = random_input((4, 5, 3, 3), torch.float32, device, seed=1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = random_input((4, 5, 3, 3), torch.float32, device, seed=2)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(ref, mode)()
        y, y_ref = ours(x), ref(x_ref)
        y.backward(dy), y_ref.backward(dy)
        assert_close(y, y_ref, torch.float32, f"{mode} y")
        assert_close(x.grad, x_ref.grad, torch.float32, f"{mode} dx")
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, torch.float32, f"{mode} param grad")
    for a, b in zip(ours.buffers(), ref.buffers()):
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, atol=1e-6)


def test_bias_keyword_passes_through(device):
    if "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        pytest.skip("this torch's BatchNorm has no bias= keyword")
    m = triton_bn.BatchNorm2d(5, bias=False, device=device)
    assert m.bias is None and m.weight is not None
    x = random_input((3, 5, 4, 4), torch.float32, device, seed=3)
    ref = nn.BatchNorm2d(5, bias=False, device=device)
    assert_close(m(x), ref(x), torch.float32, "y")


def test_dtype_keyword_and_half_module(device):
    m = triton_bn.BatchNorm2d(5, device=device, dtype=torch.float16)
    x = random_input((3, 5, 4, 4), torch.float16, device, "channels_last", seed=4)
    y = m(x)
    assert y.dtype == torch.float16 and m.running_mean.dtype == torch.float16
    assert_close(y, nn.functional.batch_norm(x.double(), None, None, training=True), torch.float16, "y")
    expected_mean = 0.1 * x.double().mean((0, 2, 3))
    assert_close(m.running_mean, expected_mean, torch.float16, "running_mean")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 6 * 6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
        self.bn3d = nn.BatchNorm3d(2)
        self.sync = nn.SyncBatchNorm(3)

    def forward(self, x):
        return self.head(self.features(x))


def test_convert_model_keeps_everything(device):
    torch.manual_seed(0)
    model = _Net().to(device)
    model.features[1].eval()
    params_before = {n: p for n, p in model.named_parameters()}
    converted = triton_bn.convert_model(model)
    assert converted is model  # children replaced in place
    assert type(model.features[1]) is triton_bn.BatchNorm2d and type(model.features[4]) is triton_bn.BatchNorm2d
    assert type(model.head[2]) is triton_bn.BatchNorm1d and type(model.bn3d) is triton_bn.BatchNorm3d
    assert type(model.sync) is triton_bn.SyncBatchNorm and model.sync.process_group is None
    assert all(p is params_before[n] for n, p in model.named_parameters()), "parameters must be the same objects"
    assert not model.features[1].training and model.features[4].training
    assert model.features[1].running_mean.device.type == torch.device(device).type
    root = triton_bn.convert_model(nn.BatchNorm1d(3))
    assert type(root) is triton_bn.BatchNorm1d


def test_converted_cnn_trains_like_torch(device):
    """conv-bn-relu twice + linear, SGD from identical weights: losses and params agree."""
    torch.manual_seed(0)
    ref = _Net().to(device)
    ours = triton_bn.convert_model(copy.deepcopy(ref))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(8, 3, 6, 6, generator=g).to(device).to(memory_format=torch.channels_last)
        target = torch.randint(0, 4, (8,), generator=g).to(device)
        losses = []
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0]), f"step {step}: {losses}"
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert_close(q, p, name=name, tol=1e-4)
    for (name, b), c in zip(ref.named_buffers(), ours.buffers()):
        assert_close(c, b, name=name, tol=1e-4)
    ref.eval(), ours.eval()
    x = torch.randn(4, 3, 6, 6, generator=g).to(device)
    assert_close(ours(x), ref(x), name="eval logits", tol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rejected_input_leaves_the_module_untouched(momentum, device):
    m = triton_bn.BatchNorm2d(5, momentum=momentum, device=device)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for bad in (torch.randn(1, 5, 1, 1, device=device), torch.randint(0, 9, (2, 5, 3, 3), device=device)):
        with pytest.raises((ValueError, NotImplementedError)):
            m(bad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by a rejected call"


def test_convert_model_summary_names_what_it_converted_and_what_it_left(capsys):
    """A subclass of torch's BatchNorm (its forward may do more) is left, and the summary says so."""

    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.BatchNorm2d(3), Scaled(3), triton_bn.BatchNormAct2d(3))  # the last: ours already
    converted = triton_bn.convert_model(model, verbose=True)
    assert type(converted[0]) is triton_bn.BatchNorm2d and type(converted[1]) is Scaled
    out = capsys.readouterr().out
    assert "1 layers converted, 1 left" in out and "0: BatchNorm2d -> BatchNorm2d" in out, out
    assert "1: Scaled left: a subclass of torch's batch norm" in out, out


@pytest.mark.parametrize("training", [False, True])
def test_torch_jit_trace_records_torchs_ops(training, device):
    """torch.jit.trace (the legacy ONNX exporter's tracer) cannot see Triton launches: a layer it
    traces computes with torch's ops, so the trace is the layer's function, not a constant."""
    torch.manual_seed(0)
    layer = triton_bn.BatchNormAct2d(3, act_layer="silu").to(device).train(training)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(layer)
    x, x2 = (random_input((2, 3, 4, 4), torch.float32, device, seed=s) for s in (1, 2))
    traced = torch.jit.trace(layer, (x,), check_trace=False)
    assert "batch_norm" in str(traced.graph)
    reference(x)  # the same step as the trace's
    assert_close(traced(x2), reference(x2), torch.float32, "traced output")
    assert_close(layer.running_mean, reference.running_mean, torch.float32, "running_mean")


def test_torch_jit_trace_of_the_functional_call_records_torchs_ops(device):
    """The same for triton_bn.batch_norm called directly, fused and after an eager call of the
    same signature (whose checked call the eager path would otherwise launch)."""
    x, x2, r = (random_input((2, 3, 4, 4), torch.float32, device, seed=s) for s in (1, 2, 3))
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)

    def f(x, r):
        return triton_bn.batch_norm(x, rm, rv, training=False, activation="relu", residual=r)
    f(x, r)  # eager: its signature is now prepared
    traced = torch.jit.trace(f, (x, r), check_trace=False)
    assert "batch_norm" in str(traced.graph)
    assert_close(traced(x2, r), f(x2, r), torch.float32, "traced output")
