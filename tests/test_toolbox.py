"""The rest of PyTorch's toolbox on converted models: torch.fx.symbolic_trace, the quantization
fusers (fuse_modules, fuse_modules_qat, fuse_conv_bn_eval) and SyncBatchNorm conversion.

Every case compares against torch's own unconverted model (float64, so the Triton kernels and
torch's agree to ~1e-12) or, where both sides run the same code, exactly.
"""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat, get_default_qat_qconfig, prepare_qat
from torch.nn.utils.fusion import fuse_conv_bn_eval

import triton_bn
from tests.reference import assert_close

F64 = torch.float64


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, seeded weights, and batch norm parameters and running statistics away from their
    defaults (so a fusion that dropped one would show)."""
    torch.manual_seed(seed)
    model = model.to(F64)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "running_var" in name or ("weight" in name and t.dim() == 1):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.uniform_(-0.5, 0.5)
    return model


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_same_state(ours: nn.Module, ref: nn.Module, exact: bool):
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert list(ours_state) == list(ref_state)
    for name, t in ref_state.items():
        if exact or not t.is_floating_point():
            assert torch.equal(ours_state[name], t), f"{name} differs"
        else:
            assert_close(ours_state[name], t, name=name)


# ---------------------------------------------------------------------------------------------
# torch.fx.symbolic_trace


class _Net(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.Conv2d(4, 4, 2, stride=2)
        self.head = head

    def forward(self, x):
        h = self.pool(self.features(x))
        return self.head(h.flatten(1)) + h.mean()  # plain tensor code around the layers is traced


@pytest.mark.parametrize("momentum", [0.1, None])
def test_symbolic_trace_keeps_layers_whole_like_torch(momentum):
    """Inside a traced model a triton_bn layer is a call_module leaf, exactly as torch's own
    BatchNorm: the GraphModule calls the module, so .train()/.eval() on it still take effect."""
    ref = _randomized(_Net(nn.Sequential(nn.Linear(16, 5), nn.BatchNorm1d(5, momentum=momentum))))
    ours = triton_bn.convert_model(copy.deepcopy(ref))
    gm = torch.fx.symbolic_trace(ours)
    gm_ref = torch.fx.symbolic_trace(ref)
    leaves = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert leaves["features.1"] is triton_bn.BatchNorm2d and leaves["head.1"] is triton_bn.BatchNorm1d
    assert [(n.op, n.target) for n in gm.graph.nodes] == [(n.op, n.target) for n in gm_ref.graph.nodes]
    for step in range(2):
        x = _x(4, 3, 4, 4, seed=step)
        assert_close(gm(x), ref(x), name=f"train step {step}")
    _assert_same_state(gm, ref, exact=False)
    gm.eval(), ref.eval()  # the flag is read when the module runs, as for torch's leaves
    x = _x(2, 3, 4, 4, seed=5)
    assert_close(gm(x), ref(x), name="eval")
    _assert_same_state(gm, ref, exact=False)


def test_symbolic_trace_of_axis_batch_norm_inside_a_model():
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).to(F64)
    ours = copy.deepcopy(ref)
    ours[1] = triton_bn.BatchNorm(4, axis=-1, dtype=F64)  # (N, L, C): C last, like nn.Linear's output
    ours[1].load_state_dict(ref[1].state_dict())
    gm = torch.fx.symbolic_trace(ours)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "call_module", "output"]
    x = _x(3, 5, 3)
    expected = ref[2](ref[1](ref[0](x).transpose(1, 2)).transpose(1, 2))
    assert_close(gm(x), expected, name="y")
    assert_close(gm.get_submodule("1").running_mean, ref[1].running_mean, name="running_mean")


def test_symbolic_trace_of_sync_batch_norm_inside_a_model():
    ref = _randomized(nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4)))
    ours = triton_bn.convert_model(copy.deepcopy(ref))
    gm = torch.fx.symbolic_trace(ours)
    assert type(gm.get_submodule("1")) is triton_bn.SyncBatchNorm
    x = _x(2, 3, 3, 3)
    assert_close(gm(x), ref(x), name="y")  # no process group: the unsynchronized layer, as torch's
    with pytest.raises(RuntimeError, match="cannot be traced as the root"):
        torch.fx.symbolic_trace(ours[1])  # whether it synchronizes is decided when it runs


ROOTS = [(triton_bn.BatchNorm1d, (5, 3)), (triton_bn.BatchNorm1d, (4, 3, 2)), (triton_bn.BatchNorm2d, (3, 3, 2, 2)),
         (triton_bn.BatchNorm3d, (2, 3, 2, 2, 2)), (lambda c, **kw: triton_bn.BatchNorm(c, axis=-1, **kw), (3, 4, 3))]


@pytest.mark.parametrize("make,shape", ROOTS, ids=["1d-2D", "1d-3D", "2d", "3d", "axis-1"])
@pytest.mark.parametrize("training,momentum", [(True, 0.1), (True, None), (False, 0.1)])
def test_symbolic_trace_of_a_root_layer_runs_like_the_module(make, shape, training, momentum):
    """A layer traced as the root (torch's own BatchNorm cannot be) is traced through into one
    batch-norm node with the parameters and buffers as get_attr inputs; the train/eval flag is
    captured at trace time, and the graph gives exactly the module's results and statistics."""
    module = make(3, momentum=momentum, dtype=F64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5), module.running_var.uniform_(0.5, 1.5)
    module.train(training)
    twin = copy.deepcopy(module)
    gm = pickle.loads(pickle.dumps(torch.fx.symbolic_trace(module)))  # a GraphModule that pickles
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is triton_bn.functional._batch_norm]
    assert len(calls) == 1 and not any(n.op == "call_module" for n in gm.graph.nodes)
    args = list(calls[0].args) + list(calls[0].kwargs.values())
    inputs = {a.target for a in args if getattr(a, "op", "") == "get_attr"}
    counter = {"num_batches_tracked"} if training else set()  # eval never moves it
    assert inputs == {"weight", "bias", "running_mean", "running_var"} | counter
    for step in range(2):
        x = _x(*shape, seed=step)
        assert torch.equal(gm(x), twin(x)), f"step {step}"
    twin_state = twin.state_dict()  # the GraphModule holds what its graph reads (in eval: no counter)
    for name, t in gm.state_dict().items():
        assert torch.equal(t, twin_state[name]), f"{name} differs"
    with pytest.raises(ValueError, match="expected"):
        gm(_x(shape[0]))  # the input check is in the graph too


def test_symbolic_trace_captures_the_flag_of_a_root_layer():
    module = triton_bn.BatchNorm2d(3, dtype=F64)
    gm = torch.fx.symbolic_trace(module)
    gm.eval()  # traced in training: the graph keeps training, as any traced-through code would
    gm(_x(2, 3, 2, 2))
    assert int(gm.num_batches_tracked) == 1


# ---------------------------------------------------------------------------------------------
# Quantization fusers


FUSIONS = {  # name: (the torch model, its input shape, whether fuse_modules_qat supports it)
    "conv1d-bn": (lambda: nn.Sequential(nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3)), (4, 2, 5), True),
    "conv1d-bn-relu": (lambda: nn.Sequential(nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.ReLU()), (4, 2, 5), True),
    "conv2d-bn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3)), (3, 2, 3, 3), True),
    "conv2d-bn-relu": (lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.ReLU()), (3, 2, 3, 3), True),
    "conv3d-bn-relu": (lambda: nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.ReLU()), (2, 2, 2, 2, 2), True),
    "linear-bn1d": (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), (5, 4), True),
    "bn2d-relu": (lambda: nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()), (3, 2, 2, 2), True),
    "bn3d-relu": (lambda: nn.Sequential(nn.BatchNorm3d(2), nn.ReLU()), (2, 2, 2, 2, 2), True),
    "convtranspose2d-bn": (lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.BatchNorm2d(3)), (2, 2, 2, 2), False),
}


def _twin_models(name):
    make, shape, _ = FUSIONS[name]
    ref = _randomized(make())
    ours = triton_bn.convert_model(copy.deepcopy(ref))
    assert any(type(m).__module__.startswith("triton_bn") for m in ours.modules())
    return ref, ours, shape


@pytest.mark.parametrize("name", list(FUSIONS))
def test_fuse_modules_eval_matches_torch(name):
    ref, ours, shape = _twin_models(name)
    ref.eval(), ours.eval()
    groups = [[str(i) for i in range(len(ref))]]
    fused_ref, fused = fuse_modules(ref, groups), fuse_modules(ours, groups)
    assert [type(m) for m in fused.modules()] == [type(m) for m in fused_ref.modules()]
    _assert_same_state(fused, fused_ref, exact=True)
    x = _x(*shape)
    assert torch.equal(fused(x), fused_ref(x))
    assert_close(fused(x), ours(x), name="fused vs unfused")


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", [n for n, (_, _, qat) in FUSIONS.items() if qat])
def test_fuse_modules_qat_matches_torch(name):
    ref, ours, shape = _twin_models(name)
    groups = [[str(i) for i in range(len(ref))]]
    fused_ref, fused = fuse_modules_qat(ref, groups), fuse_modules_qat(ours, groups)
    assert [type(m) for m in fused.modules()] == [type(m) for m in fused_ref.modules()]
    x = _x(*shape)
    assert torch.equal(fused(x), fused_ref(x))  # the fused module runs, in training
    _assert_same_state(fused, fused_ref, exact=True)
    for model in (fused, fused_ref):
        model.float().qconfig = get_default_qat_qconfig("qnnpack")
        prepare_qat(model, inplace=True)
    assert [type(m) for m in fused.modules()] == [type(m) for m in fused_ref.modules()]
    assert torch.equal(fused(x.float()), fused_ref(x.float()))  # and so does the QAT module


def test_fusion_runs_hooks_once_like_torch():
    calls = {"ours": 0, "torch": 0}
    fused = {}
    for key, convert in (("torch", lambda m: m), ("ours", triton_bn.convert_model)):
        model = convert(nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()).eval())
        model[0].register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        fused[key] = fuse_modules(model, [["0", "1"]])
        fused[key](torch.randn(2, 2, 2, 2))
    assert calls == {"ours": 1, "torch": 1}


@pytest.mark.parametrize("conv,ours,theirs,shape", [(nn.Conv1d, triton_bn.BatchNorm1d, nn.BatchNorm1d, (2, 2, 4)),
                                                     (nn.Conv2d, triton_bn.BatchNorm2d, nn.BatchNorm2d, (2, 2, 3, 3))])
def test_fuse_conv_bn_eval_matches_torch(conv, ours, theirs, shape):
    """Duck-typed in torch (it reads the layer's attributes): worked before, kept as a check."""
    model = _randomized(nn.Sequential(conv(2, 3, 2), ours(3))).eval()
    bn_ref = theirs(3, dtype=F64).eval()
    bn_ref.load_state_dict(model[1].state_dict())
    fused, fused_ref = fuse_conv_bn_eval(model[0], model[1]), fuse_conv_bn_eval(model[0], bn_ref)
    _assert_same_state(fused, fused_ref, exact=True)
    x = _x(*shape)
    assert_close(fused(x), model(x), name="fused vs unfused")


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm conversion


def test_convert_model_undoes_torchs_convert_sync_batchnorm():
    """torch's converter turns triton_bn layers into torch's SyncBatchNorm; convert_model then
    makes them triton_bn's, sharing parameters, buffers and the process group."""
    ref = _randomized(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv3d(4, 2, 1), nn.BatchNorm3d(2)))
    group = object()  # stands for a process group: stored, never used without torch.distributed
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(triton_bn.convert_model(copy.deepcopy(ref)), group)
    assert type(synced[1]) is nn.SyncBatchNorm  # torch's converter knows only its own class
    params = dict(synced.named_parameters())
    ours = triton_bn.convert_model(synced)
    assert type(ours[1]) is type(ours[3]) is triton_bn.SyncBatchNorm
    assert ours[1].process_group is group and ours[3].process_group is group
    assert all(p is params[n] for n, p in ours.named_parameters())
    x = _x(2, 3, 2, 2)

    def run(model, x):
        h = model[1](model[0](x))
        return model[3](model[2](h.unsqueeze(2)))  # (N, C, 1, H, W) for the 3-D layers

    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(ref, mode)()
        assert_close(run(ours, x), run(ref, x), name=mode)
    _assert_same_state(ours, ref, exact=False)
