"""triton_bn.distributed: SyncBatchNorm against torch on the concatenated batch.

The synchronized path runs in spawned process groups (gloo over loopback, CPU tensors through
Triton's interpreter; tests/_dist_worker.py holds the checks), 2 and 3 ranks with uneven and
empty per-rank batches. The rest (constructor, state_dict, converter, the unsynchronized layer,
argument errors) runs in this process.
"""
import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_bn
import triton_bn.distributed as tbd
from tests.reference import assert_close, random_input
from triton_bn.distributed import SyncBatchNorm, SyncBatchNormAct, convert_sync_batchnorm
from triton_bn.modules import BatchNorm2d

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
GROUP_TIMEOUT_S = 240  # a whole group; collectives inside time out after 60 s each


def _run_group(world_size, tmp_path):
    """Spawn ``world_size`` ranks of _dist_worker.py; {rank: {check: "ok" or failure}}."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    init_file = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, WORKER, str(init_file), str(rank), str(world_size), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world_size)]
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    logs = {}
    try:
        for rank, proc in enumerate(procs):
            logs[rank], _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"{world_size}-rank group did not finish within {GROUP_TIMEOUT_S} s")
    results = {}
    for rank, proc in enumerate(procs):
        path = tmp_path / f"rank{rank}.json"
        assert proc.returncode == 0 and path.exists(), f"rank {rank} exited with {proc.returncode}:\n{logs[rank]}"
        results[rank] = json.loads(path.read_text())
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_synchronized_ranks_match_torch_on_the_whole_batch(world_size, tmp_path):
    """Every check of _dist_worker.CHECKS on every rank: y, dx, local dgamma/dbeta, running
    stats (equal on all ranks), one collective per direction, eval/process_group, DDP + SGD."""
    results = _run_group(world_size, tmp_path)
    failures = [f"rank {rank}, {check}:\n{outcome}" for rank, checks in results.items()
                for check, outcome in checks.items() if outcome != "ok"]
    assert not failures, "\n".join(failures)
    assert len(results[0]) >= 7, f"checks that ran: {list(results[0])}"


def test_constructor_and_state_dict_match_torch():
    ours = SyncBatchNorm(5, eps=1e-3, momentum=None, process_group=None)
    torch.manual_seed(0)
    theirs = nn.SyncBatchNorm(5, eps=1e-3, momentum=None)
    theirs.running_mean.normal_()
    assert isinstance(ours, nn.SyncBatchNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert (ours.eps, ours.momentum, ours.process_group) == (1e-3, None, None)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.BatchNorm2d(4, affine=False), nn.BatchNorm3d(2, track_running_stats=False),
        BatchNorm2d(5), nn.Sequential(nn.SyncBatchNorm(6, momentum=None), nn.ReLU()), nn.Linear(2, 2))
    model[0].eval()
    model[3].running_var.uniform_(1, 2)
    return model


def test_convert_sync_batchnorm_like_torch():
    group = object()  # any process-group handle is stored as given
    ours = convert_sync_batchnorm(_model(), group)
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(_model(), group)
    original = _model()
    converted = [m for m in ours.modules() if isinstance(m, SyncBatchNorm)]
    assert len(converted) == 5 and isinstance(ours[5], nn.Linear)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    for mine, torch_one in zip(ours.modules(), theirs.modules()):
        assert mine.training == torch_one.training
        if isinstance(mine, SyncBatchNorm):
            assert mine.process_group is group
            assert (mine.eps, mine.momentum, mine.affine, mine.track_running_stats) == \
                (torch_one.eps, torch_one.momentum, torch_one.affine, torch_one.track_running_stats)
    # The very same tensors (an optimizer holding them keeps working), and the root is replaced.
    bn = original[3]
    new = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(new) is SyncBatchNorm and new is not bn
    assert new.weight is bn.weight and new.bias is bn.bias and new.running_var is bn.running_var
    assert new.num_batches_tracked is bn.num_batches_tracked and new.process_group is None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_it_is_the_plain_layer(device, momentum):
    """No initialized process group: SyncBatchNorm is exactly triton_bn.BatchNorm2d (bitwise),
    in training (forward, backward, running stats) and in eval."""
    assert not torch.distributed.is_initialized()
    torch.manual_seed(0)
    plain = BatchNorm2d(3, momentum=momentum).to(device)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    synced = SyncBatchNorm.convert_sync_batchnorm(BatchNorm2d(3, momentum=momentum).to(device))
    synced.load_state_dict(plain.state_dict())
    x = random_input((4, 3, 5, 6), torch.float32, device, "channels_last", seed=1, mean=2.0)
    dy = random_input((4, 3, 5, 6), torch.float32, device, seed=2)
    for _ in range(2):
        outputs = []
        for layer in (plain, synced):
            xi = x.clone().requires_grad_(True)
            layer.zero_grad()
            y = layer(xi)
            y.backward(dy)
            outputs.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
        for a, b in zip(*outputs):
            assert torch.equal(a, b)
    for name, value in plain.state_dict().items():
        assert torch.equal(synced.state_dict()[name], value), name
    plain.eval(), synced.eval()
    assert torch.equal(plain(x), synced(x))


def test_sync_errors_come_before_any_collective(monkeypatch):
    """Bad arguments raise before the collective (group=None would fail inside it)."""
    x = random_input((4, 3, 5), torch.float32, "cpu", seed=0)
    running = (torch.zeros(3), torch.ones(3))
    with pytest.raises(NotImplementedError, match="not implemented for"):
        tbd.sync_batch_norm(x.long(), *running, None, None, 0.1, 1e-5, None, 2)
    with pytest.raises(ValueError, match="eps must be positive"):
        tbd.sync_batch_norm(x, *running, None, None, 0.1, 0.0, None, 2)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements"):
        tbd.sync_batch_norm(x, torch.zeros(4), running[1], None, None, 0.1, 1e-5, None, 2)
    with pytest.raises(ValueError, match="running_var must be contiguous"):
        tbd.sync_batch_norm(x, running[0], torch.ones(3, 2)[:, 0], None, None, 0.1, 1e-5, None, 2)
    monkeypatch.setattr(tbd, "uses_kernels", lambda t: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tbd.sync_batch_norm(x, *running, None, None, 0.1, 1e-5, None, 2)
    assert torch.equal(running[0], torch.zeros(3)) and torch.equal(running[1], torch.ones(3))


def test_convert_sync_batchnorm_keeps_fused_layers_fused():
    """BatchNormAct*d -> SyncBatchNormAct with its activation, slope, memory mode and drop, the
    very same tensors; without a process group it computes exactly the fused layer, residual
    call included (torch's SyncBatchNorm took neither the activation nor the residual)."""
    torch.manual_seed(0)
    fused = triton_bn.BatchNormAct2d(3, act_layer="leaky_relu", negative_slope=0.2, save="output")
    fused.drop = nn.Dropout(0.5)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(fused, triton_bn.BatchNormAct1d(2, act_layer="silu"))
    reference = copy.deepcopy(fused)
    synced = convert_sync_batchnorm(model)
    assert [type(m) for m in synced] == [SyncBatchNormAct, SyncBatchNormAct]
    layer = synced[0]
    assert (layer.act_layer, layer.negative_slope, layer.save, layer.inplace) == ("leaky_relu", 0.2, "output", False)
    assert layer.weight is fused.weight and layer.running_var is fused.running_var
    assert isinstance(layer.drop, nn.Dropout) and synced[1].act_layer == "silu"
    x, r = random_input((2, 3, 4, 5), torch.float32, "cpu", seed=1), random_input((2, 3, 4, 5), torch.float32, "cpu", seed=2)
    layer.eval(), reference.eval()  # eval: no process group is needed, and the drop is the identity
    assert torch.equal(layer(x, r), reference(x, r))


def test_fused_resnet_block_converts_to_sync_and_runs_its_residual_call():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = block

        def forward(self, x):
            return F.relu(self.body(x) + x)

    model = Block()
    fused = triton_bn.fuse_model(model)
    synced = convert_sync_batchnorm(copy.deepcopy(fused))
    assert type(synced.get_submodule("body.1")) is SyncBatchNormAct
    x = random_input((2, 3, 4, 4), torch.float32, "cpu", seed=3)
    assert_close(synced(x), model(x), torch.float32, "y")  # training step, no process group: unsynchronized
    synced.eval(), model.eval()
    assert_close(synced(x), model(x), torch.float32, "y (eval)")
    # fuse_model fuses torch's SyncBatchNorm too (it used to leave it torch's, unconverted)
    fused_sync = triton_bn.fuse_model(nn.Sequential(nn.SyncBatchNorm(3), nn.ReLU()))
    assert type(fused_sync.get_submodule("0")) is SyncBatchNormAct and fused_sync.get_submodule("0").act_layer == "relu"


def test_sync_batch_norm_act_constructor_and_repr():
    layer = SyncBatchNormAct(4, momentum=None, process_group=None, act_layer=nn.SiLU, save="input")
    assert isinstance(layer, nn.SyncBatchNorm) and layer.act_layer == "silu" and layer.momentum is None
    assert list(layer.state_dict()) == list(nn.SyncBatchNorm(4).state_dict())
    assert "act_layer='silu'" in repr(layer)
