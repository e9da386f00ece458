"""triton_bn.lightning.TritonSyncBatchNorm: Lightning's LayerSync with triton_bn's synchronized
layers, and back. Skipped without Lightning."""
import torch
from torch import nn

import triton_bn
from tests._optional import optional
from tests.reference import random_input

optional("lightning.pytorch")
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.plugins import TorchSyncBatchNorm  # noqa: E402

from triton_bn.lightning import TritonSyncBatchNorm  # noqa: E402


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(),
                         triton_bn.BatchNormAct2d(3, act_layer="leaky_relu", negative_slope=0.2, save="output"),
                         nn.Flatten(), nn.BatchNorm1d(48))


def test_apply_synchronizes_with_triton_bn_and_revert_gives_its_layers_back():
    """apply: triton_bn.SyncBatchNorm and SyncBatchNormAct (torch's plugin: torch's SyncBatchNorm
    for all, activation dropped); revert: the triton_bn layers, not torch's _BatchNormXd."""
    model = _model()
    weight = model[3].weight
    plugin = TritonSyncBatchNorm()
    synced = plugin.apply(model)
    assert [type(synced[i]) for i in (1, 3, 5)] == [triton_bn.SyncBatchNorm, triton_bn.SyncBatchNormAct,
                                                     triton_bn.SyncBatchNorm]
    assert (synced[3].act_layer, synced[3].negative_slope, synced[3].save) == ("leaky_relu", 0.2, "output")
    reverted = plugin.revert(synced)
    assert [type(reverted[i]) for i in (1, 3, 5)] == [triton_bn.BatchNorm2d, triton_bn.BatchNormAct2d,
                                                       triton_bn.BatchNorm1d]
    assert (reverted[3].act_layer, reverted[3].save, reverted[3].weight) == ("leaky_relu", "output", weight)
    assert not hasattr(reverted[3], "process_group")
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=1)
    assert reverted.eval()(x).shape == (2, 48)


def test_trainer_takes_it_with_sync_batchnorm_true():
    plugin = TritonSyncBatchNorm()
    assert isinstance(plugin, TorchSyncBatchNorm)  # what Trainer(sync_batchnorm=True) accepts beside it
    trainer = Trainer(accelerator="cpu", devices=1, sync_batchnorm=True, plugins=[plugin], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer._accelerator_connector._layer_sync is plugin
