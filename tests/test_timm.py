"""timm's norm-act layers (timm_layers.py) through convert_model, fuse_model, freeze_batch_norm,
convert_sync_batchnorm and revert_model. Skipped without timm.

Models are timm's own (``pretrained=False``) at tiny inputs, or layers built from
``timm.layers``; their batch norms get random statistics and affine so that a layer computed
with the wrong flag, statistics or activation shows.
"""
import copy

import torch
from torch import nn

import triton_bn
from tests._optional import optional
from tests.reference import assert_close, random_input

timm = optional("timm")
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct  # noqa: E402
from timm.layers import DropBlock2d, DropPath, convert_sync_batchnorm as timm_convert_sync  # noqa: E402


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, FrozenBatchNormAct2d):
            C = m.running_mean.numel()
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                m.bias.copy_(torch.randn(C, generator=g) * 0.2)
    return model


def _mobilenet():
    torch.manual_seed(0)
    return _randomize(timm.create_model("mobilenetv3_small_050", pretrained=False))


def test_fuse_model_keeps_timm_layers_live_in_eval():
    """fuse_model fuses timm's BatchNormAct2d (their activations: relu, hardswish) and never
    traces through them: after .eval() the fused model normalizes with the running statistics
    and leaves them alone, as timm's model does (it used to bake training=True in)."""
    model = _mobilenet()
    reference = copy.deepcopy(model)
    fused, summary = triton_bn.fuse_model(model, return_summary=True)
    assert summary.counts["bn+act"] >= 20, str(summary)
    assert {act for _, act in summary.fused_activation} == {"relu", "hardswish"}, str(summary)
    x = random_input((1, 3, 32, 32), torch.float32, "cpu", seed=1)
    fused.eval(), reference.eval()
    stem = fused.get_submodule("bn1")
    before = stem.running_mean.clone()
    assert_close(fused(x), reference(x), torch.float32, "eval output")
    assert torch.equal(stem.running_mean, before), "eval moved the running statistics"


class _TimmBlock(nn.Module):
    """timm's norm-act layers as its models use them: with an activation, and without one
    before a residual add and a ReLU."""

    def __init__(self, c=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1), BatchNormAct2d(c, act_layer=nn.Hardswish)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 1), BatchNormAct2d(c, apply_act=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


def test_fuse_model_keeps_timm_layers_live_in_training():
    """A timm layer's own activation is fused; one without joins the add -> ReLU pattern; in
    training both update their running statistics as timm's do, and switch back to eval."""
    torch.manual_seed(0)
    model = _randomize(_TimmBlock())
    reference = copy.deepcopy(model)
    fused, summary = triton_bn.fuse_model(model, return_summary=True)
    assert summary.fused_activation == [("bn1", "hardswish")] and summary.fused_residual == [("bn2", "relu")]
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=1)
    assert_close(fused(x), reference(x), torch.float32, "train output")
    for name in ("bn1", "bn2"):
        assert_close(fused.get_submodule(name).running_var, reference.get_submodule(name).running_var,
                     torch.float32, f"{name} running_var")
    fused.eval(), reference.eval()
    assert_close(fused(x), reference(x), torch.float32, "eval output")


def test_convert_model_converts_timm_norm_act_layers_and_says_what_it_left():
    torch.manual_seed(0)
    layers = nn.Sequential(
        BatchNormAct2d(4, act_layer=nn.SiLU),                                      # silu, fused
        BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: DropBlock2d(0.1, 3)),  # relu, drop after
        BatchNormAct2d(4, apply_act=False, drop_layer=lambda: DropPath(0.1)),         # no activation
        BatchNormAct2d(4, act_layer=nn.GELU),                                      # no gelu kernel: left
        BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=lambda: DropPath(0.1)),     # drop before silu: left
        FrozenBatchNormAct2d(4, act_layer=nn.Hardswish),
    )
    _randomize(layers)
    reference = copy.deepcopy(layers).eval()
    weight, frozen_mean = layers[0].weight, layers[5].running_mean
    converted, summary = triton_bn.convert_model(layers, return_summary=True)
    kinds = [type(m).__name__ for m in converted]
    assert kinds == ["BatchNormAct2d"] * 5 + ["FrozenBatchNorm2d"], kinds
    assert [type(m) for m in converted[3:5]] == [BatchNormAct2d, BatchNormAct2d], "left ones stay timm's"
    assert [getattr(converted[i], "act_layer", "?") for i in (0, 1, 2, 5)] == ["silu", "relu", None, "hardswish"]
    assert isinstance(converted[1].drop, DropBlock2d) and isinstance(converted[2].drop, DropPath)
    assert converted[0].weight is weight and converted[5].running_mean is frozen_mean, "shared, not copied"
    assert len(summary.converted) == 4 and len(summary.left) == 2, str(summary)
    assert "GELU has no fused kernel" in str(summary) and "do not commute" in str(summary)
    x = random_input((2, 4, 5, 5), torch.float32, "cpu", seed=2)
    converted.eval()
    assert_close(converted(x), reference(x), torch.float32, "eval output")


def test_efficientnet_every_norm_act_layer_converts():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    timm_layers = sum(type(m) is BatchNormAct2d for m in model.modules())
    converted, summary = triton_bn.convert_model(model, return_summary=True)
    assert len(summary.converted) == timm_layers == 49 and not summary.left, str(summary)
    assert {getattr(m, "act_layer", "-") for m in converted.modules() if isinstance(m, nn.BatchNorm2d)} == \
        {"silu", None}


def test_timm_sync_layers_convert_to_triton_sync_fused():
    """timm's SyncBatchNormAct (timm's converter's output) and BatchNormAct2d both become
    triton_bn.SyncBatchNormAct with the activation; eval output unchanged."""
    model = _randomize(nn.Sequential(BatchNormAct2d(3, act_layer=nn.SiLU), BatchNormAct2d(3, act_layer=nn.ReLU)))
    reference = copy.deepcopy(model).eval()
    timm_synced = timm_convert_sync(copy.deepcopy(model))
    assert type(timm_synced[0]) is SyncBatchNormAct
    ours = triton_bn.convert_model(timm_synced)
    direct = triton_bn.convert_sync_batchnorm(copy.deepcopy(model))
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=3)
    for converted in (ours, direct):
        assert [(type(m), m.act_layer) for m in converted] == [(triton_bn.SyncBatchNormAct, "silu"),
                                                                 (triton_bn.SyncBatchNormAct, "relu")]
        assert_close(converted.eval()(x), reference(x), torch.float32, "eval output")


def test_revert_gives_timm_layers_back():
    model = _randomize(nn.Sequential(BatchNormAct2d(3, act_layer=nn.Hardswish),
                                     BatchNormAct2d(3, act_layer=nn.ReLU, drop_layer=lambda: DropPath(0.2))))
    weight = model[1].weight
    reference = copy.deepcopy(model).eval()
    reverted = triton_bn.revert_model(triton_bn.convert_model(model))
    assert [type(m) for m in reverted] == [BatchNormAct2d, BatchNormAct2d]
    assert isinstance(reverted[0].act, nn.Hardswish) and isinstance(reverted[1].drop, DropPath)
    assert reverted[1].weight is weight
    assert list(reverted.state_dict()) == list(reference.state_dict())
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=4)
    assert torch.equal(reverted.eval()(x), reference(x))


def test_freeze_batch_norm_of_timm_layers_keeps_their_activation():
    model = _randomize(nn.Sequential(BatchNormAct2d(3, act_layer=nn.SiLU), BatchNormAct2d(3, act_layer=nn.GELU)))
    reference = copy.deepcopy(model).eval()
    frozen = triton_bn.freeze_batch_norm(triton_bn.convert_model(model))
    assert type(frozen[0]) is triton_bn.FrozenBatchNorm2d and frozen[0].act_layer == "silu"
    assert type(frozen[1]) is FrozenBatchNormAct2d  # gelu: timm's own frozen layer
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=5)
    assert_close(frozen(x), reference(x), torch.float32, "frozen output")
