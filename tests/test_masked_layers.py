"""Masked batch norm's layers (issue 20): ``forward(x, mask)`` (and ``residual=`` where it exists)
on BatchNorm1d, BatchNormAct1d, the Keras-style BatchNorm, SyncBatchNorm without a process group
and FrozenBatchNorm2d; the mask through torch.fx, torch.compile, torch.export and torch.jit.
Against tests/test_masked.py's float64 oracle; the gloo process groups are tests/_dist_worker.py's.
"""
import pytest
import torch

import triton_bn
from tests.reference import assert_close, random_input
from tests.test_masked import EPS, masked_reference

def _sequences(device, seed=30):
    """A speech-like batch: (N, C, L) features with right padding, and its lengths."""
    x = random_input((4, 3, 12), torch.float32, device, seed=seed, mean=3.0)
    lengths = torch.tensor([12, 7, 3, 9], device=device)
    return x, lengths, triton_bn.lengths_to_mask(lengths, 12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm1d_takes_a_mask(momentum, either_path, device):
    x, _, mask = _sequences(device)
    bn = triton_bn.BatchNorm1d(3, momentum=momentum).to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(2):
        y = bn(x, mask)
    factor = 0.5 if momentum is None else 0.1  # the cumulative average's 1/2 at the second step
    ref_y, _, _, _ = masked_reference(x, mask, bn.weight, bn.bias, None, None, 0.1, EPS)
    _, rm1, rv1, _ = masked_reference(x, mask, None, None, rm0, rv0, 1.0 if momentum is None else 0.1, EPS)
    _, rm2, rv2, _ = masked_reference(x, mask, None, None, rm1, rv1, factor, EPS)
    assert_close(y, ref_y, torch.float32, "y")
    assert_close(bn.running_mean, rm2, torch.float32, "running_mean")
    assert_close(bn.running_var, rv2, torch.float32, "running_var")
    assert int(bn.num_batches_tracked) == 2
    bn.eval()
    assert torch.equal(bn(x, mask), bn(x)), "eval ignores the mask"


def test_fused_keras_and_sync_layers_take_a_mask(device):
    x, _, mask = _sequences(device, seed=31)
    r = random_input(x.shape, torch.float32, device, seed=32)
    act = triton_bn.BatchNormAct1d(3, act_layer="relu").to(device)
    ref_y, _, _, _ = masked_reference(x, mask, act.weight, act.bias, None, None, 0.1, EPS, activation="relu",
                                      residual=r)
    assert_close(act(x, r, mask=mask), ref_y, torch.float32, "BatchNormAct1d")
    keras = triton_bn.BatchNorm(3, axis=-1).to(device)  # (N, L, C), Keras 3's call(inputs, mask=)
    ref_y, _, _, _ = masked_reference(x, mask, None, None, None, None, 0.1, EPS)
    assert_close(keras(x.transpose(1, 2).contiguous(), mask).transpose(1, 2), ref_y, torch.float32, "BatchNorm")
    sync = triton_bn.SyncBatchNorm(3).to(device)  # no process group: the plain layer
    assert_close(sync(x, mask), ref_y, torch.float32, "SyncBatchNorm")
    frozen = triton_bn.FrozenBatchNorm2d(3).to(device)
    x4 = x.unsqueeze(-1)
    assert torch.equal(frozen(x4, mask=mask.unsqueeze(-1)), frozen(x4))


def test_fx_keeps_the_mask_on_the_layer_call(device):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 3, 3, padding=1)
            self.bn = triton_bn.BatchNorm1d(3)

        def forward(self, x, mask):
            return self.bn(self.conv(x), mask)

    model = Block().to(device)
    x, _, mask = _sequences(device, seed=33)
    graph = torch.fx.symbolic_trace(model)
    calls = [n for n in graph.graph.nodes if n.op == "call_module" and n.target == "bn"]
    assert len(calls) == 1 and "mask" in calls[0].kwargs
    torch.testing.assert_close(graph(x, mask), Block.forward(model, x, mask), rtol=0, atol=0)


def test_compile_and_export_take_the_mask(device):
    """fullgraph compile (the registered ops with their mask argument) gives eager's bits, the
    gradients too; export keeps the masked op in the graph."""
    x, _, mask = _sequences(device, seed=34)
    bn = triton_bn.BatchNorm1d(3).to(device)
    eager_bn = triton_bn.BatchNorm1d(3).to(device)
    compiled = torch.compile(bn, backend="aot_eager", fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = compiled(x1, mask), eager_bn(x2, mask)
    y1.sum().backward(), y2.sum().backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(bn.running_var, eager_bn.running_var)
    program = torch.export.export(triton_bn.BatchNorm1d(3).to(device), (x, mask))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "triton_bn.forward_train.default" in targets, targets


def test_torch_jit_trace_of_a_masked_call_records_torchs_ops(device):
    """Under torch.jit.trace batch_norm computes with torch's ops (eager.computes): the masked
    composition, the same numbers."""
    x, _, mask = _sequences(device, seed=35)
    fn = lambda t, m: triton_bn.batch_norm(t, None, None, None, None, True, mask=m)  # noqa: E731
    traced = torch.jit.trace(fn, (x, mask))
    assert "triton_bn::" not in str(traced.graph) and "prim::PythonOp" not in str(traced.graph)
    assert_close(traced(x, mask), fn(x, mask), torch.float32, "traced")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronization is a CUDA notion")
def test_masked_training_never_syncs_with_the_host(device):
    """Degenerate counts are decided on the device: a masked step (one sample counting nothing)
    is CUDA-graph safe."""
    from tests.reference import assert_no_host_sync
    x, lengths, _ = _sequences(device, seed=36)
    mask = triton_bn.lengths_to_mask(lengths * torch.tensor([1, 1, 0, 1], device=device), 12)
    bn = triton_bn.BatchNorm1d(3, momentum=None).to(device)
    leaf = x.clone().requires_grad_()
    assert_no_host_sync(lambda: bn(leaf, mask).sum().backward())
