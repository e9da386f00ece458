"""Fused epilogues: y = act(BN(x) + residual) against torch's unfused composition in float64.

The full product activation x residual x training x layout x dtype x save is 6*2*2*2*3*2 =
576 cases; interpreted kernels make each a few seconds, so the grid is *pairwise*: every
value of every factor meets every value of every other factor in at least one case (save
"output" only with an invertible activation). ``CASES`` is built once, deterministically.
"""
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import triton_bn
from tests.reference import TOLERANCE, assert_close, random_input

ACTIVATIONS = [None, "relu", "leaky_relu", "silu", "hardswish", "elu"]
INVERTIBLE = {None, "leaky_relu", "elu"}
FACTORS = {
    "activation": ACTIVATIONS,
    "residual": [False, True],
    "training": [True, False],
    "layout": ["contiguous", "channels_last"],
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "save": ["input", "output"],
}
SLOPE = 0.2
EPS = 1e-5


def _allowed(case: dict) -> bool:
    return case.get("save") != "output" or case.get("activation", None) in INVERTIBLE


def _pairwise(factors: dict) -> list:
    """Greedy all-pairs: repeatedly take the allowed full case covering most uncovered pairs."""
    names = list(factors)
    uncovered = set()
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        for va, vb in itertools.product(range(len(factors[a])), range(len(factors[b]))):
            if _allowed({a: factors[a][va], b: factors[b][vb]}):
                uncovered.add((i, va, j, vb))
    candidates = [c for c in itertools.product(*(range(len(factors[n])) for n in names))
                  if _allowed({n: factors[n][v] for n, v in zip(names, c)})]
    cases = []
    while uncovered:
        def gain(c):
            return sum((i, c[i], j, c[j]) in uncovered for i, j in itertools.combinations(range(len(names)), 2))
        best = max(candidates, key=gain)
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(names)), 2)}
        cases.append({n: factors[n][v] for n, v in zip(names, best)})
    return cases


CASES = _pairwise(FACTORS)


def _case_id(case):
    dtype = str(case["dtype"]).removeprefix("torch.")
    return (f"{case['activation']}-{'res' if case['residual'] else 'nores'}-"
            f"{'train' if case['training'] else 'eval'}-{case['layout']}-{dtype}-save_{case['save']}")


def torch_act(z, activation):
    return {None: lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, SLOPE), "silu": F.silu,
            "hardswish": F.hardswish, "elu": F.elu}[activation](z)


def reference(x, r, w, b, rm, rv, training, activation, save, dy):
    """torch's unfused composition on float64 copies: act(batch_norm(x) + r); save="output" uses
    |w| + eps as the scale (the In-Place ABN guard). Returns y, running stats, grads."""
    up = lambda t: None if t is None else t.detach().to(torch.float64).clone().requires_grad_()  # noqa: E731
    x64, r64, w64, b64 = up(x), up(r), up(w), up(b)
    rm64, rv64 = (None, None) if rm is None else (rm.detach().double().clone(), rv.detach().double().clone())
    scale = w64.abs() + EPS if save == "output" else w64
    z = F.batch_norm(x64, rm64, rv64, scale, b64, training, 0.1, EPS)
    if r64 is not None:
        z = z + r64
    y = torch_act(z, activation)
    y.backward(dy.double())
    return y.detach(), rm64, rv64, (x64.grad, w64.grad, b64.grad, None if r64 is None else r64.grad)


def _setup(case, device, shape=(3, 4, 5, 6), seed=0):
    dtype = case["dtype"]
    x = random_input(shape, dtype, device, case["layout"], seed=seed, mean=0.3, std=1.5)
    # The residual in the other layout: it need not share x's strides.
    other = "channels_last" if case["layout"] == "contiguous" else "contiguous"
    r = random_input(shape, dtype, device, other, seed=seed + 1) if case["residual"] else None
    dy = random_input(shape, dtype, device, case["layout"], seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.25).to(device).requires_grad_()
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    w, b = (w.detach().float().requires_grad_(), b.detach().float().requires_grad_())
    rm = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    return x, r, dy, w, b, rm, rv


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_unfused_torch_float64(case, device, either_path):
    x, r, dy, w, b, rm, rv = _setup(case, device)
    dtype, training, activation, save = case["dtype"], case["training"], case["activation"], case["save"]
    ref_y, ref_rm, ref_rv, ref_grads = reference(x, r, w, b, rm, rv, training, activation, save, dy)
    xi = x.detach().clone().requires_grad_()
    ri = None if r is None else r.detach().clone().requires_grad_()
    y = triton_bn.batch_norm(xi, rm, rv, w, b, training, 0.1, EPS, activation=activation, negative_slope=SLOPE,
                             residual=ri, save=save)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref_y, dtype, "y")
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")
    grads = (xi.grad, w.grad, b.grad, None if ri is None else ri.grad)
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, ref_grads):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == (torch.float32 if name in ("dweight", "dbias") else dtype), name
        # save="output" rebuilds x from the rounded y: half inputs lose one more rounding.
        tol = TOLERANCE[dtype] * (2 if save == "output" and dtype != torch.float32 else 1)
        assert_close(got, want, dtype, name, tol=tol)
    if case["layout"] == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_grid_is_pairwise():
    """Every pair of factor values that is allowed occurs in some case."""
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            if _allowed({a: va, b: vb}):
                assert any(c[a] == va and c[b] == vb for c in CASES), (a, va, b, vb)
    assert len(CASES) <= 24, len(CASES)


@pytest.mark.parametrize("activation,residual", [("silu", True), ("elu", False)])
def test_poisoned_outputs_are_fully_written(activation, residual, device, monkeypatch):
    """Every output the launchers allocate (y, dx, dresidual) starts as NaN: none survives."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
    case = dict(dtype=torch.float32, layout="channels_last", residual=residual)
    x, r, dy, w, b, rm, rv = _setup(case, device, shape=(2, 3, 7, 5), seed=4)
    xi = x.detach().clone().requires_grad_()
    ri = None if r is None else r.detach().clone().requires_grad_()
    y = triton_bn.batch_norm(xi, rm, rv, w, b, True, activation=activation, residual=ri)
    y.backward(dy)
    for name, t in (("y", y), ("dx", xi.grad), ("dresidual", None if ri is None else ri.grad)):
        if t is not None:
            assert not torch.isnan(t).any(), f"{name}: unwritten elements"


def test_residual_of_any_strides(device):
    """A residual sliced out of a bigger tensor (non-unit innermost stride) and a transposed one."""
    case = dict(dtype=torch.float32, layout="contiguous", residual=False)
    x, _, dy, w, b, rm, rv = _setup(case, device, shape=(3, 4, 5, 6), seed=5)
    for r in (random_input((3, 4, 5, 6), torch.float32, device, "strided", seed=6),
              random_input((3, 4, 6, 5), torch.float32, device, seed=7).transpose(2, 3)):
        ri = r.detach().clone().requires_grad_() if r.is_contiguous() else r.detach().requires_grad_()
        xi = x.detach().clone().requires_grad_()
        y = triton_bn.batch_norm(xi, None, None, w, b, True, activation="hardswish", residual=ri)
        y.backward(dy)
        ref_y, _, _, ref_grads = reference(x, r, w, b, None, None, True, "hardswish", "input", dy)
        assert_close(y, ref_y, torch.float32, "y")
        assert_close(xi.grad, ref_grads[0], torch.float32, "dx")
        assert_close(ri.grad, ref_grads[3], torch.float32, "dresidual")


def test_axis_minus_one_with_residual(device):
    x = random_input((4, 5, 3), torch.float32, device, seed=8)
    r = random_input((4, 5, 3), torch.float32, device, seed=9)
    y = triton_bn.batch_norm(x, None, None, training=True, axis=-1, activation="relu", residual=r)
    ref = F.relu(F.batch_norm(x.double().movedim(-1, 1), None, None, training=True).movedim(1, -1) + r.double())
    assert_close(y, ref, torch.float32, "y")


def _bad_calls(device):
    x = random_input((3, 4, 5), torch.float32, device, seed=10)
    return x, {
        "unknown activation": (dict(activation="gelu"), ValueError, "activation"),
        "residual shape": (dict(residual=torch.zeros(3, 4, 6, device=device)), RuntimeError, "residual"),
        "residual dtype": (dict(residual=torch.zeros(3, 4, 5, device=device, dtype=torch.float64)), RuntimeError,
                           "residual"),
        "residual device": (dict(residual=torch.zeros(3, 4, 5, device="meta")), RuntimeError, "residual"),
        "save output relu": (dict(activation="relu", save="output"), ValueError, "save='output'"),
        "save output slope 0": (dict(activation="leaky_relu", negative_slope=0.0, save="output"), ValueError,
                                "negative_slope"),
        "save mode": (dict(save="both"), ValueError, "save"),
        "inplace without save output": (dict(inplace=True), ValueError, "inplace"),
    }


@pytest.mark.parametrize("bad", list(_bad_calls("cpu")[1]))
def test_bad_fused_arguments_raise_before_any_kernel(bad, device):
    x, calls = _bad_calls(device)
    kwargs, error, match = calls[bad]
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    x_before = x.clone()
    with pytest.raises(error, match=match):
        triton_bn.batch_norm(x, rm, rv, training=True, **kwargs)
    assert torch.equal(rm, torch.zeros(4, device=device)) and torch.equal(rv, torch.ones(4, device=device))
    assert torch.equal(x, x_before)


def test_save_output_guards_gamma(device):
    """Negative and zero gamma: the scale is |gamma| + eps (the paper's guard), the gradient
    reaches gamma through abs; reconstruction stays finite. (beta = 0 here: with beta != 0 the
    rebuilt xhat of a channel with |gamma| + eps ~ 1e-5 is off by ulp(beta) / 1e-5, the mode's
    documented limit.)"""
    case = dict(dtype=torch.float32, layout="contiguous", residual=False)
    x, _, dy, _, _, _, _ = _setup(case, device, seed=13)
    b = torch.zeros(4, device=device, requires_grad=True)
    w = torch.tensor([-1.5, 0.0, 0.7, -1e-7], device=device, requires_grad=True)
    xi = x.detach().clone().requires_grad_()
    y = triton_bn.batch_norm(xi, None, None, w, b, True, activation="elu", save="output")
    y.backward(dy)
    ref_y, _, _, ref_grads = reference(x, None, w, b, None, None, True, "elu", "output", dy)
    assert_close(y, ref_y, torch.float32, "y")
    assert_close(xi.grad, ref_grads[0], torch.float32, "dx", tol=1e-4)  # 1/(|gamma|+eps) amplifies rounding
    assert_close(w.grad, ref_grads[1], torch.float32, "dweight")


@pytest.mark.parametrize("activation,residual,training", [("silu", True, True), ("elu", False, False),
                                                          (None, True, True)])
def test_fused_double_backward_gradgradcheck_float64(activation, residual, training, device):
    x = random_input((3, 2, 4), torch.float64, device, seed=14, mean=0.5).requires_grad_()
    r = random_input((3, 2, 4), torch.float64, device, seed=15).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=device).requires_grad_()
    rm, rv = torch.randn(2, dtype=torch.float64, device=device), torch.rand(2, dtype=torch.float64, device=device) + 0.5

    def f(x, w, b, r):
        return triton_bn.batch_norm(x, None if training else rm, None if training else rv, w, b, training,
                                    activation=activation, residual=r if residual else None)

    assert torch.autograd.gradcheck(f, (x, w, b, r), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b, r), fast_mode=True)


def test_save_output_refuses_double_backward(device):
    x = random_input((3, 2, 4), torch.float64, device, seed=16).requires_grad_()
    y = triton_bn.batch_norm(x * 1.0, None, None, training=True, activation="leaky_relu", save="output")
    with pytest.raises(RuntimeError, match="save='output'"):
        torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)


@pytest.mark.parametrize("save,inplace", [("input", False), ("output", False), ("output", True)])
def test_compiled_fused_call_is_exactly_eager(save, inplace, device):
    """torch.compile (aot_eager, fullgraph) traces the ops with the fused arguments: the same
    y and gradients, bit for bit (in-place: the traced op writes a new y, then copies it)."""
    case = dict(dtype=torch.float32, layout="channels_last", residual=True)
    x, r, dy, w, b, rm, rv = _setup(case, device, seed=17)

    def f(x, r, w, b, rm, rv):
        return triton_bn.batch_norm(x * 1.0, rm, rv, w, b, True, activation="leaky_relu", negative_slope=SLOPE,
                                    residual=r, save=save, inplace=inplace)

    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
        y = fn(*leaves, rm.clone(), rv.clone())
        y.backward(dy)
        results.append((y, *(t.grad for t in leaves)))
    for name, a, c in zip(("y", "dx", "dresidual", "dweight", "dbias"), *results):
        assert torch.equal(a, c), f"{name} differs"


# --- modules -------------------------------------------------------------------------------

MODULE_CASES = [  # (class, torch class, shape, act_layer, residual, save)
    (triton_bn.BatchNormAct1d, torch.nn.BatchNorm1d, (6, 4), "silu", False, "input"),
    (triton_bn.BatchNormAct2d, torch.nn.BatchNorm2d, (3, 4, 5, 6), "relu", True, "input"),
    (triton_bn.BatchNormAct2d, torch.nn.BatchNorm2d, (3, 4, 5, 6), torch.nn.LeakyReLU, True, "output"),
    (triton_bn.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 4, 3, 4, 2), "hardswish", False, "input"),
]


@pytest.mark.parametrize("cls,torch_cls,shape,act,residual,save", MODULE_CASES)
def test_batchnormact_matches_bn_then_activation(cls, torch_cls, shape, act, residual, save, device):
    """Two training steps then eval: output, gradients and buffers of torch's BN -> (+ r) -> act,
    and state_dicts that load both ways."""
    ref = torch_cls(4, momentum=None).to(device)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = cls(4, momentum=None, act_layer=act, save=save).to(device)
    assert isinstance(ours, torch_cls)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    name = ours.act_layer
    for step, training in enumerate((True, True, False)):
        ours.train(training)
        ref.train(training)
        x = random_input(shape, torch.float32, device, seed=20 + step)
        r = random_input(shape, torch.float32, device, seed=30 + step) if residual else None
        dy = random_input(shape, torch.float32, device, seed=40 + step)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        z = ref(xs[1]) if save == "input" else F.batch_norm(
            xs[1], ref.running_mean, ref.running_var, ref.weight.abs() + ref.eps, ref.bias,
            training, 0.0 if not training else 1.0 / (step + 1), ref.eps)
        if save == "output" and training:
            ref.num_batches_tracked += 1
        y_ref = torch_act(z + (r if residual else 0), name) if name != "leaky_relu" else \
            F.leaky_relu(z + (r if residual else 0), 0.01)
        y = ours(xs[0], r)
        y.backward(dy)
        y_ref.backward(dy)
        assert_close(y, y_ref.double(), torch.float32, f"step {step} y")
        assert_close(xs[0].grad, xs[1].grad.double(), torch.float32, f"step {step} dx")
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert_close(a.double(), b.double(), torch.float32, k) if a.is_floating_point() else \
            torch.testing.assert_close(a, b)
    assert_close(ours.weight.grad, ref.weight.grad.double(), torch.float32, "dweight")
    ref.load_state_dict(ours.state_dict())  # and back


def test_batchnormact_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="activation"):
        triton_bn.BatchNormAct2d(3, act_layer="gelu")
    with pytest.raises(ValueError, match="act_layer"):
        triton_bn.BatchNormAct2d(3, act_layer=torch.nn.GELU)
    with pytest.raises(ValueError, match="save='output'"):
        triton_bn.BatchNormAct2d(3, act_layer="relu", save="output")


def test_frozen_batchnorm2d_is_torchvisions(device):
    """torchvision's state_dict keys (buffers only), loads a BatchNorm2d checkpoint, eval math
    with the fused activation and residual; gradients reach x and the residual only."""
    bn = torch.nn.BatchNorm2d(4).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = triton_bn.FrozenBatchNorm2d(4, act_layer="relu").to(device)
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert not list(frozen.parameters())
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked dropped, as torchvision does
    x = random_input((3, 4, 5, 6), torch.float32, device, "channels_last", seed=50).requires_grad_()
    r = random_input((3, 4, 5, 6), torch.float32, device, seed=51).requires_grad_()
    y = frozen(x, r)
    bn.eval()
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y_ref = F.relu(bn.double()(x64) + r64)
    assert_close(y, y_ref, torch.float32, "y")
    dy = random_input((3, 4, 5, 6), torch.float32, device, seed=52)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    assert_close(r.grad, r64.grad, torch.float32, "dresidual")
    assert torch.equal(frozen.running_mean, bn.running_mean.float())
    assert torch.equal(triton_bn.FrozenBatchNorm2d.from_batchnorm(bn.float()).running_var, bn.running_var)


_SM90_WORKER = """
from perf.host_driver import install
install()
import itertools
import torch
from triton_bn.kernels import bn_backward, bn_forward_eval, bn_forward_train, use_onchip
cases = ((torch.float32, True, 3, True, False), (torch.bfloat16, False, 5, True, True),
         (torch.float64, False, 4, False, False))
for onchip, (dtype, cl, act, res, from_output) in itertools.product((True, False), cases):  # both kernel paths
    with use_onchip(onchip):
        x = torch.randn(4, 8, 6, 6, dtype=dtype)
        x = x.to(memory_format=torch.channels_last) if cl else x
        r = torch.randn(4, 8, 6, 6, dtype=dtype) if res else None
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        w, b = torch.rand(8, dtype=pd) + 0.5, torch.randn(8, dtype=pd)
        rm, rv = torch.zeros(8, dtype=pd), torch.ones(8, dtype=pd)
        y, mean, invstd = bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5, activation=act, residual=r, out=x.clone())
        bn_forward_eval(x, w, b, rm, rv, 1e-5, activation=act, residual=r)
        for training in (True, False):
            stats = (mean, invstd) if training else (rm, rv)
            bn_backward(y, y if from_output else x, w, *stats, 1e-5, training, (True, True, True, res), bias=b,
                        activation=act, residual=r, from_output=from_output)
print("compiled")
"""


@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("clang")), reason="the stub libcuda needs a C compiler")
def test_fused_variants_compile_for_sm90():
    """No GPU needed: perf's stub driver compiles the fused variants for sm_90 with the real
    Triton/ptxas toolchain (the launch is a no-op), which the interpreter never does; on chip
    and on the split path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_BN_CPU_KERNELS="1", TRITON_BN_PIN_CONFIG="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", _SM90_WORKER], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stdout + done.stderr[-3000:]
