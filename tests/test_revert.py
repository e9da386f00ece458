"""revert_model: triton_bn's layers back to torch's (timm's: tests/test_timm.py), sharing
parameters and buffers, with eval outputs equal to the model before conversion."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import triton_bn
from tests.reference import assert_close, random_input, random_statistics


class _Block(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        y = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        return self.head(self.pool(F.relu(x + self.bn2(self.conv2(y)))))


def _ours(module: nn.Module) -> list:
    return [name for name, m in module.named_modules() if type(m).__module__.startswith("triton_bn")]


def test_revert_of_a_converted_model_is_torchs_model():
    torch.manual_seed(0)
    model = random_statistics(nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm2d(3, affine=False)),
                                      nn.SyncBatchNorm(3, momentum=None)))
    reference = copy.deepcopy(model)
    tensors = [t.data_ptr() for t in [*model.parameters(), *model.buffers()]]
    converted = triton_bn.convert_model(model)
    reverted, summary = triton_bn.revert_model(converted, return_summary=True)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in reference.modules()]
    assert [t.data_ptr() for t in [*reverted.parameters(), *reverted.buffers()]] == tensors
    assert len(summary.reverted) == 3 and not summary.left, str(summary)
    assert reverted[2].momentum is None and reverted[1][0].affine is False


def test_revert_of_a_fused_graph_is_a_torch_graph_computing_the_same():
    """BN -> act and BN -> add -> act fused by fuse_model come back as torch's BatchNorm node,
    the add and the activation: no triton_bn module is left, the outputs are the model's."""
    torch.manual_seed(0)
    model = random_statistics(_Block()).eval()
    fused = triton_bn.fuse_model(model)
    assert _ours(fused)
    reverted, summary = triton_bn.revert_model(fused, return_summary=True)
    assert isinstance(reverted, torch.fx.GraphModule) and not _ours(reverted), _ours(reverted)
    assert not summary.left and "BatchNorm2d + relu" in str(summary), str(summary)
    targets = [n.target for n in reverted.graph.nodes if n.op == "call_function"]
    assert F.leaky_relu in targets and F.relu in targets
    assert reverted.bn2.weight is model.bn2.weight
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=1)
    assert_close(reverted(x), model(x), torch.float32, "eval output")
    reverted.train(), model.train()
    assert_close(reverted(x), model(x), torch.float32, "training output")


def test_revert_of_fuse_models_sequential_fallback_puts_the_activation_back():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.SiLU())

        def forward(self, x):
            y = self.body(x)
            return y if y.sum() > 0 else -y

    model = random_statistics(Branchy()).eval()
    reference = copy.deepcopy(model)
    fused = triton_bn.fuse_model(model)
    assert isinstance(fused.body[2], nn.Identity)
    reverted = triton_bn.revert_model(fused)
    assert [type(m) for m in reverted.body] == [nn.Conv2d, nn.BatchNorm2d, nn.SiLU]
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=2)
    assert_close(reverted(x), reference(x), torch.float32, "output")


def test_layers_revert_model_cannot_place_are_left_and_named():
    model = nn.Sequential(triton_bn.BatchNormAct2d(3), triton_bn.FrozenBatchNorm2d(3), triton_bn.BatchNorm2d(3))
    reverted, summary = triton_bn.revert_model(model, return_summary=True)
    assert [type(m) for m in reverted] == [triton_bn.BatchNormAct2d, triton_bn.FrozenBatchNorm2d, nn.BatchNorm2d]
    text = str(summary)
    assert "0: BatchNormAct2d left: built directly" in text and "torch has no frozen batch norm" in text, text
