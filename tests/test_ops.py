"""Layer 2a (ops.py) and what it enables: torch.compile, torch.export, opcheck, torch.func,
double backward. On the CPU, compile uses backend="aot_eager" (Inductor cannot compile Triton
kernels for the CPU); the Inductor and CUDA-graph variants are CUDA-only tests.
"""
import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import triton_bn
from tests.reference import assert_close, random_input, reference_batch_norm

CUDA = torch.cuda.is_available()


def _net(track_running_stats=True, momentum=0.1, affine=True, dim=2):
    torch.manual_seed(0)
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
    net = nn.Sequential(conv(3, 5, 1), bn(5, momentum=momentum, affine=affine, track_running_stats=track_running_stats),
                        nn.ReLU(), conv(5, 4, 1), bn(4, momentum=momentum, affine=affine,
                                                     track_running_stats=track_running_stats))
    return triton_bn.convert_model(net)


def _input(device, layout, dim=2, seed=0):
    shape = (4, 3, 5, 6) if dim == 2 else (4, 3, 7)
    return random_input(shape, torch.float32, device, layout if dim == 2 else "contiguous", seed=seed, mean=1.0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


TRAIN_CASES = [  # (track_running_stats, momentum, affine, layout, dim)
    (True, 0.1, True, "contiguous", 2),
    (True, None, True, "channels_last", 2),
    (False, 0.1, True, "contiguous", 2),
    (True, 0.1, False, "channels_last", 2),
    (True, None, False, "contiguous", 1),
]


@pytest.mark.parametrize("track,momentum,affine,layout,dim", TRAIN_CASES)
def test_compile_fullgraph_training_is_exactly_eager(track, momentum, affine, layout, dim, device):
    """Two training steps, compiled with fullgraph=True: the same y, gradients and running
    statistics as eager, bit for bit (the same kernels run), and one graph, no break."""
    eager = _net(track, momentum, affine, dim).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = _input(device, layout, dim, seed=step)
        y_eager, y_compiled = eager(x), compiled(x)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        assert torch.equal(y_eager, y_compiled), f"step {step}: y differs"
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert torch.equal(p.grad, q.grad), f"grad of {name} differs"
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs: {a} vs {b}"
    # fullgraph=True already refuses any graph break; explain() states it for the record.
    if (track, momentum, affine, layout, dim) == TRAIN_CASES[1]:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(copy.deepcopy(eager))(_input(device, layout, dim))
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_eval_is_exactly_eager(layout, device):
    model = _net().to(device)
    model(_input(device, layout))  # non-trivial running statistics
    model.eval()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = _input(device, layout, seed=3)
    assert torch.equal(model(x), compiled(x))


def test_compiled_sync_batchnorm_in_a_one_rank_group(device, tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = triton_bn.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5))).to(device)
        assert isinstance(net[1], triton_bn.SyncBatchNorm)
        compiled_model = copy.deepcopy(net)
        compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
        x = _input(device, "contiguous")
        assert torch.equal(net(x), compiled(x))
        assert torch.equal(net[1].running_var, compiled_model[1].running_var)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strict", [False, True])
def test_export_of_an_eval_model_runs(strict, device):
    model = _net().to(device)
    model(_input(device, "channels_last"))
    model.eval()
    x = _input(device, "channels_last", seed=5)
    program = torch.export.export(model, (x,), strict=strict)
    targets = {str(n.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
               for n in gm.graph.nodes if n.op == "call_function"}
    assert "triton_bn.forward_eval.default" in targets, targets
    assert torch.equal(program.module()(x), model(x))


def _opcheck_cases(device):
    x = random_input((4, 3, 5, 6), torch.float32, device, "channels_last", seed=6)
    x16 = random_input((6, 5, 7), torch.float16, device, seed=7)
    w, b, rm, rv = (torch.rand(3, device=device) + 0.5, torch.randn(3, device=device),
                    torch.zeros(3, device=device), torch.ones(3, device=device))
    counter = torch.tensor(3, device=device)
    y, mean, invstd, _ = torch.ops.triton_bn.forward_train(x, w, b, None, None, None, 0.1, 1e-5)
    mask = torch.rand((4, 5, 6), generator=torch.Generator().manual_seed(14)).to(device) > 0.3
    masked = torch.ops.triton_bn.forward_train(x, w, b, None, None, None, 0.1, 1e-5, 0, 0.01, None, mask)
    r = random_input((4, 3, 5, 6), torch.float32, device, "contiguous", seed=13)
    y_elu = torch.ops.triton_bn.forward_train(x, w, b, None, None, None, 0.1, 1e-5, 5, 0.01, r)[0]
    return [
        (torch.ops.triton_bn.forward_train.default, (x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5)),
        (torch.ops.triton_bn.forward_train.default, (x16, None, None, torch.zeros(5, device=device),
                                                      torch.ones(5, device=device), counter, 0.0, 1e-3)),
        (torch.ops.triton_bn.forward_eval.default, (x, w, None, rm + 0.5, rv * 2, 1e-5)),
        (torch.ops.triton_bn.forward_eval.default, (x16, None, None, torch.zeros(5, device=device),
                                                     torch.ones(5, device=device), 0.0)),
        (torch.ops.triton_bn.backward.default, (torch.randn_like(x), x, w, mean, invstd, 1e-5, True,
                                                [True, True, True], torch.float32)),
        (torch.ops.triton_bn.backward.default, (torch.randn_like(x), x, None, rm, rv, 1e-5, False,
                                                [True, False, True], torch.float32)),
        # The fused epilogue: act(BN(x) + residual); the residual in another layout.
        (torch.ops.triton_bn.forward_train.default, (x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5, 3, 0.01,
                                                      r)),
        (torch.ops.triton_bn.forward_eval.default, (x, w, b, rm + 0.5, rv * 2, 1e-5, 2, 0.2, r)),
        (torch.ops.triton_bn.backward.default, (torch.randn_like(x), x, w, mean, invstd, 1e-5, True,
                                                [True, True, True, True], torch.float32, b, 4, 0.01, r, False)),
        # save="output": the saved tensor is y (elu, invertible), weight > 0.
        (torch.ops.triton_bn.backward.default, (torch.randn_like(x), y_elu, w, mean, invstd, 1e-5, True,
                                                [True, True, False, True], torch.float32, b, 5, 0.01, r, True)),
        # Masked batch norm: the mask in, 1 / the per-channel counts out and back into the backward.
        (torch.ops.triton_bn.forward_train.default, (x, w, b, rm.clone(), rv.clone(), counter.clone(), None, 1e-5,
                                                      1, 0.01, r, mask)),
        (torch.ops.triton_bn.backward.default, (torch.randn_like(x), x, w, masked[1], masked[2], 1e-5, True,
                                                [True, True, True], torch.float32, None, 0, 0.01, None, False, mask,
                                                masked[3])),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck_every_registered_op(case, device):
    op, args = _opcheck_cases(device)[case]
    results = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_double_backward_gradgradcheck_float64(training, affine, device):
    x = random_input((3, 2, 4), torch.float64, device, seed=8, mean=0.5).requires_grad_()
    params = ((torch.rand(2, dtype=torch.float64, device=device) + 0.5).requires_grad_(),
              torch.randn(2, dtype=torch.float64, device=device).requires_grad_()) if affine else ()
    rm, rv = torch.randn(2, dtype=torch.float64, device=device), torch.rand(2, dtype=torch.float64, device=device) + 0.5

    def f(x, *wb):
        w, b = wb if wb else (None, None)
        return triton_bn.batch_norm(x, None if training else rm, None if training else rv, w, b, training)

    # fast_mode: random projections instead of full Jacobians (each evaluation is a kernel call
    # through the interpreter); it fails on a wrong gradient just the same.
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)


def test_gradient_penalty_matches_torch(device):
    """WGAN-GP style: the norm of dL/dx, differentiated again w.r.t. the parameters."""
    x = random_input((6, 3, 4), torch.float32, device, seed=9)
    results = []
    for fn in (triton_bn.batch_norm, torch.nn.functional.batch_norm):
        w = torch.linspace(0.5, 1.5, 3, device=device, requires_grad=True)
        xi = x.clone().requires_grad_()
        y = fn(xi, None, None, w, None, True)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), xi, create_graph=True)
        gx.norm().backward()
        results.append(w.grad)
    assert_close(results[0], results[1].double(), torch.float32, "dpenalty/dweight")


def test_torch_func_grad_and_functional_call(device):
    model = _net(dim=1).to(device)
    x = _input(device, "contiguous", dim=1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss(p, b, x):  # buffers are arguments: the step counter and running stats are updated in place
        return torch.func.functional_call(model, (p, b), (x,)).square().sum()

    grads = torch.func.grad(loss)(params, buffers, x)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad.double(), torch.float32, name)
    for name, b in model.named_buffers():
        assert torch.equal(buffers[name], b), f"{name}: functional_call's update differs from the module's"
    g = torch.func.grad(lambda x: triton_bn.batch_norm(x, None, None, training=True).pow(3).sum())(x)
    ref_x = x.double().requires_grad_()
    torch.nn.functional.batch_norm(ref_x, None, None, training=True).pow(3).sum().backward()
    assert_close(g, ref_x.grad, torch.float32, "torch.func.grad")


def test_vmap_is_a_clear_error(device):
    with pytest.raises(NotImplementedError, match="no torch.vmap rule"):
        torch.func.vmap(lambda x: triton_bn.batch_norm(x, None, None, training=True))(
            random_input((2, 4, 3, 5), torch.float32, device, seed=10))


@pytest.mark.parametrize("bad", ["channels", "one_value", "dtype"])
def test_bad_input_under_compile_raises_torchs_error_and_changes_nothing(bad, device):
    """The checks are Python: compiled without fullgraph, a bad call falls back to eager and
    raises torch's error, before any kernel and with the state unchanged. (With fullgraph=True
    dynamo reports any raise as Unsupported, for torch's own BatchNorm exactly as for ours.)"""
    torch.manual_seed(0)
    model = triton_bn.convert_model(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())).to(device)
    torch_model = copy.deepcopy(model)
    torch_model[0].__class__ = nn.BatchNorm2d  # torch's own layer, same state
    x = {"channels": torch.randn(4, 2, 5, 6), "one_value": torch.randn(1, 3, 1, 1),
         "dtype": torch.ones(4, 3, 2, 2, dtype=torch.long)}[bad].to(device)
    errors = []
    for m in (model, torch_model):
        compiled = torch.compile(m, backend="aot_eager")
        compiled(_input(device, "contiguous"))
        before = _state(m)
        with pytest.raises(Exception) as caught:
            compiled(x)
        errors.append(caught.value)
        for name, value in m.state_dict().items():
            if name.endswith("num_batches_tracked") and m is torch_model:
                continue  # torch counts the failed step; triton_bn deliberately does not
            assert torch.equal(value, before[name]), f"{name} changed by a failed call"
    assert type(errors[0]) is type(errors[1]), errors
    assert str(errors[0]) == str(errors[1]), errors


def test_eager_calls_skip_the_dispatcher(device, monkeypatch):
    """The registered ops are for tracers; an eager call launches the kernels directly."""
    calls = []
    for name in ("forward_train", "forward_eval", "backward"):
        op = getattr(triton_bn.ops, name)
        monkeypatch.setattr(triton_bn.ops, name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    x = random_input((4, 3, 5), torch.float32, device, seed=11).requires_grad_()
    triton_bn.batch_norm(x, torch.zeros(3, device=device), torch.ones(3, device=device), training=True).sum().backward()
    assert not calls


def test_eager_and_op_paths_agree(device):
    x = random_input((5, 4, 3, 3), torch.float32, device, "channels_last", seed=12)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    y_op, mean, invstd, _ = torch.ops.triton_bn.forward_train(x, None, None, rm, rv, None, 0.1, 1e-5)
    rm2, rv2 = torch.zeros(4, device=device), torch.ones(4, device=device)
    y = triton_bn.batch_norm(x, rm2, rv2, training=True)
    assert torch.equal(y, y_op) and torch.equal(rm, rm2) and torch.equal(rv, rv2)
    assert y_op.is_contiguous(memory_format=torch.channels_last)
    ref, _, _, _ = reference_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    assert_close(y_op, ref, torch.float32, "y")


@pytest.mark.skipif(not CUDA, reason="Inductor and CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_and_cuda_graphs_match_eager(mode):
    eager = _net(momentum=None).cuda()
    compiled_model = copy.deepcopy(eager)
    x = _input("cuda", "channels_last")
    eager(x)  # autotune before capture, as the README says
    compiled = torch.compile(compiled_model, mode=mode, fullgraph=True)
    for step in range(3):
        x = _input("cuda", "channels_last", seed=step)
        y_eager, y_compiled = eager(x), compiled(x)
        y_eager.sum().backward()
        y_compiled.sum().backward()
        assert_close(y_compiled, y_eager.double(), torch.float32, f"step {step} y")
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        assert_close(b, a.double(), torch.float32, name)
