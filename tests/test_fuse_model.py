"""fuse_model: which patterns it fuses, that the result is the model's own function, and the
memory the In-Place ABN mode saves (perf/saved.py counts saved tensors by storage).

ResNet-50 runs channels-last: the interpreter then runs a few programs per launch (one per
channel block) instead of one per channel, so a float64 training step takes seconds.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_bn
from perf.resnet50 import Bottleneck, resnet50
from perf.saved import model_tensors, saved_activation_bytes
from tests._optional import optional
from tests.reference import TOLERANCE, assert_close


def _resnet(dtype=torch.float64, leaky=False):
    torch.manual_seed(0)
    model = resnet50(num_classes=10).to(dtype).to(memory_format=torch.channels_last)
    if leaky:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(module, name, nn.LeakyReLU(0.01, inplace=True))
    return model


def _image(dtype=torch.float64, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=g, dtype=torch.float64).to(dtype).to(
        memory_format=torch.channels_last)


def test_resnet50_every_batchnorm_is_fused_and_shares_parameters():
    model = _resnet()
    fused, summary = triton_bn.fuse_model(model, return_summary=True)
    assert summary.counts == {"bn+act": 33, "bn+add+act": 16, "plain": 4}, str(summary)
    assert sorted(summary.plain) == [f"layer{i}.0.downsample.1" for i in range(1, 5)]
    kinds = [type(m).__name__ for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert kinds.count("BatchNormAct2d") == 49 and kinds.count("BatchNorm2d") == 4, kinds
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d)), \
        "the original model must be left as it was"
    ours = {p.data_ptr() for p in [*fused.parameters(), *fused.buffers()]}
    theirs = {p.data_ptr() for p in [*model.parameters(), *model.buffers()]}
    assert ours == theirs, "parameters and buffers must be shared, not copied"
    assert list(fused.state_dict()) == list(model.state_dict())
    assert "bn3" in str(summary) and "BN -> add -> relu" in str(summary)


def test_resnet50_three_sgd_steps_match_the_unfused_model():
    """Loss and every gradient, float64, after each of 3 SGD steps (momentum 0.9), and the
    running statistics at the end, against eager torch. The tolerance is float32's (2e-5):
    at batch 2 and 32x32 the 1x1 maps of layer4 normalize 2 values per channel, which
    amplifies any rounding difference (triton_bn's unfused convert_model differs from eager
    torch by ~1e-7 here too). The first forward also equals convert_model's bit for bit: the
    fused epilogue adds no rounding of its own."""
    tol = TOLERANCE[torch.float32]
    eager = _resnet()
    fused_base = copy.deepcopy(eager)
    fused = triton_bn.fuse_model(fused_base)
    converted = triton_bn.convert_model(copy.deepcopy(eager))
    target = torch.tensor([1, 7])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, fused_base)]
    for step in range(3):
        x = _image(seed=step)
        losses = []
        for model, opt in zip((eager, fused), optimizers):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            losses.append(loss)
        if step == 0:
            assert torch.equal(F.cross_entropy(converted(x), target), losses[1].detach())
        assert_close(losses[1], losses[0], name=f"step {step} loss", tol=tol)
        for (name, p), q in zip(eager.named_parameters(), fused_base.parameters()):
            assert_close(q.grad, p.grad, name=f"step {step} grad {name}", tol=tol)
        for opt in optimizers:
            opt.step()
    for (name, a), b in zip(eager.state_dict().items(), fused_base.state_dict().values()):
        if a.is_floating_point():
            assert_close(b, a, name=name, tol=tol)
        else:
            assert torch.equal(a, b), name


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock shape with the add written the other way round and a
    functional ReLU: relu(identity + bn2(conv2(...)))."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class _Branchy(nn.Module):
    """Untraceable (data-dependent branch); its Sequential holds a fusable pair."""

    def __init__(self, c=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 1),
                                  nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.body(x)
        return y if y.sum() > 0 else -y


@pytest.mark.parametrize("make,counts,method", [
    (_BasicBlock, {"bn+act": 1, "bn+add+act": 1, "plain": 0}, "fx"),
    (lambda: Bottleneck(16, 4), {"bn+act": 2, "bn+add+act": 1, "plain": 0}, "fx"),
    (_Branchy, {"bn+act": 1, "bn+add+act": 0, "plain": 1}, "nn.Sequential pairs"),
])
def test_small_models_fuse_and_match(make, counts, method):
    torch.manual_seed(0)
    model = make()
    reference = copy.deepcopy(model)
    x = torch.randn(2, model.conv1.in_channels if hasattr(model, "conv1") else 3, 5, 5)
    fused, summary = triton_bn.fuse_model(model, return_summary=True)
    assert summary.counts == counts and summary.method == method, str(summary)
    for step in range(2):
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        y, y_ref = fused(xs[0]), reference(xs[1])
        assert_close(y, y_ref.double(), torch.float32, f"step {step} y")
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert_close(xs[0].grad, xs[1].grad.double(), torch.float32, f"step {step} dx")


def test_fuse_model_prints_its_summary(capsys):
    triton_bn.fuse_model(_BasicBlock(), verbose=True)
    out = capsys.readouterr().out
    assert "1 BN+activation, 1 BN+add+activation, 0 left plain" in out and "bn1: BN -> silu" in out


def test_torchvision_resnet_if_installed():
    torchvision = optional("torchvision")
    model = torchvision.models.resnet18()
    _, summary = triton_bn.fuse_model(model, return_summary=True)
    assert summary.counts == {"bn+act": 9, "bn+add+act": 8, "plain": 3}, str(summary)


def test_in_place_abn_saves_forty_percent_of_resnet50_activations():
    """save="output" with leaky_relu: the bytes held for backward by a ResNet-50 forward, by
    unique storage, parameters excluded, against eager torch's same model."""
    model = _resnet(torch.float32, leaky=True)
    x = _image(torch.float32, size=64)
    eager, _ = saved_activation_bytes(lambda: model(x).sum(), model_tensors(model))
    fused = triton_bn.fuse_model(model, save="output")
    ours, _ = saved_activation_bytes(lambda: fused(x).sum(), model_tensors(fused))
    saving = 1 - ours / eager
    assert saving >= 0.40, f"saved-activation bytes {ours} vs eager {eager}: {saving:.1%} less"


def test_in_place_abn_bottleneck_matches_eager_with_the_guarded_scale():
    """fuse_model(save="output", inplace=True) on a LeakyReLU Bottleneck: every BN (the fused
    ones and the lone one) keeps only its output and overwrites its input; the result is
    eager torch's with gamma -> |gamma| + eps (In-Place ABN's guard), gradients included."""
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    block = Bottleneck(8, 4, downsample=downsample)
    block.relu = nn.LeakyReLU(0.1, inplace=True)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
    reference = copy.deepcopy(block)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(m.weight.abs() + m.eps)
    fused, summary = triton_bn.fuse_model(block, save="output", inplace=True, return_summary=True)
    assert summary.counts == {"bn+act": 2, "bn+add+act": 1, "plain": 1} and len(summary.save_output) == 4
    x = torch.randn(2, 8, 5, 5)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y, y_ref = fused(xs[0]), reference(xs[1])
    assert_close(y, y_ref.double(), torch.float32, "y")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert_close(xs[0].grad, xs[1].grad.double(), torch.float32, "dx")
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        sign = torch.sign(p.detach()) if name.endswith("weight") and p.dim() == 1 else 1.0
        assert_close(p.grad, (q.grad * sign).double(), torch.float32, name)


def _random_statistics(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model


def test_freezing_a_fused_model_keeps_activations_and_residuals():
    """freeze_batch_norm on fuse_model's result: every fused layer becomes a FrozenBatchNorm2d
    with its activation, called with its residual as before (timm's freeze_batch_norm_2d makes
    torchvision layers of them, which drop the activation and refuse the residual)."""
    torch.manual_seed(0)
    model = _random_statistics(_BasicBlock()).eval()
    fused = triton_bn.fuse_model(model)
    frozen = triton_bn.freeze_batch_norm(copy.deepcopy(fused))
    kinds = [(type(m).__name__, m.act_layer) for m in (frozen.bn1, frozen.bn2)]
    assert kinds == [("FrozenBatchNorm2d", "silu"), ("FrozenBatchNorm2d", "relu")], kinds
    x = torch.randn(2, 4, 5, 5)
    assert_close(frozen(x), model(x), torch.float32, "frozen output")
    single = triton_bn.FrozenBatchNorm2d.from_batchnorm(fused.bn2)
    assert single.act_layer == "relu"
    assert_close(single(x, x), F.relu(model.bn2(x) + x), torch.float32, "from_batchnorm output")


class _OwnNorm(nn.Module):
    """A module that calls F.batch_norm itself (as timm's BatchNormAct2d does)."""

    def __init__(self, c=3):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.full((c,), 0.5))
        self.register_buffer("running_var", torch.full((c,), 2.0))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training)


def test_fuse_model_never_traces_through_a_module_that_calls_batch_norm():
    """Traced through, ``self.training`` would be baked into the graph: the module is kept
    whole (and named in the summary), so .eval() still switches it to its running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _OwnNorm(), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    reference = copy.deepcopy(model)
    fused, summary = triton_bn.fuse_model(model, return_summary=True)
    assert summary.counts == {"bn+act": 1, "bn+add+act": 0, "plain": 0}, str(summary)
    assert any(note.startswith("1: kept whole") for note in summary.notes), str(summary)
    x = torch.randn(2, 3, 4, 4)
    fused.eval(), reference.eval()
    assert_close(fused(x), reference(x), torch.float32, "eval output")
    assert torch.equal(fused.get_submodule("1").running_mean, torch.full((3,), 0.5)), "eval moved the statistics"
