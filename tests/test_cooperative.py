"""Layer 1: the cooperative path (kernels/cooperative.py) against float64 references, its plan
(co-residency), program order, the bytes it moves, and (CUDA only) the real one-launch barrier.

Under the interpreter the phases run as three launches (PHASE 1, 2, 3); plans get a small
``elements`` per program so that small inputs split into many programs per channel (block).
PHASE 0, the GPU's single launch with its barriers, runs here too where G = 1 (the barrier of
one program completes at once) and on a GPU for real (test_single_launch_on_the_gpu)."""
import pytest
import torch
import torch.nn.functional as F

from tests.program_order import program_order
from tests.reference import assert_close, random_input, reference_batch_norm
from tests.test_bytes import accesses  # noqa: F401 (the fixture that counts the interpreter's accesses)
from triton_bn.kernels import cooperative, input_view
from triton_bn.kernels.activation import activation_code
from triton_bn.kernels.tickets import _EAGER
from triton_bn.kernels.tuning import (COOPERATIVE_MAX_REGISTERS, co_resident_programs, cooperative_enabled,
                                      use_cooperative)

CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(CUDA, reason="runs the interpreter's phased launches")
CASES = [
    ((6, 3, 5, 7), "contiguous"),
    ((6, 3, 5, 7), "channels_last"),
    ((50, 37), "contiguous"),  # BatchNorm1d (N, C): channels-last [N, C]
    ((3, 7, 6, 10), "strided"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ELEMENTS = 64  # padded elements per program: 4-16 programs per channel (block) on these shapes


def _plan(x, elements=ELEMENTS, programs_per_block=None):
    """The plan with ``elements`` per program; by default one with several programs per channel (block)."""
    with use_cooperative(True):
        plan = cooperative.cooperative_plan_for(input_view(x), elements=elements)
    assert plan is not None and (plan[3] > 1 if programs_per_block is None else plan[3] == programs_per_block), plan
    return plan


def _params(C, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    bias = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    rm = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    return weight, bias, rm, rv


def _forward(x, plan, *args, **kwargs):
    return cooperative.bn_cooperative_forward(input_view(x), plan, *args, **kwargs)


def _backward(x, plan, *args, **kwargs):
    return cooperative.bn_cooperative_backward(input_view(x), plan, *args, **kwargs)


def _tickets_are_zero():
    return all(int(buffer.abs().sum()) == 0 for buffer in _EAGER.values())


@interpreter_only
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_train_and_backward_match_float64(shape, layout, dtype, device):
    x = random_input(shape, dtype, device, layout, seed=80, mean=20.0, std=3.0)  # |mean| >> std
    dy = random_input(shape, dtype, device, layout, seed=81)
    plan = _plan(x)
    w, b, rm, rv = _params(shape[1], device)
    steps = torch.zeros((), dtype=torch.int64, device=device)
    ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, dy)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    y, mean, invstd = _forward(x, plan, w, b, rm, rv, 0.1, 1e-5, steps, out=out)
    assert y is out and int(steps) == 1
    assert_close(y, ref_y, dtype, "y")
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")
    dx, dw, db, dr = _backward(x, plan, dy, mean, invstd, w, 1e-5, True, (True, True, True, False))
    assert dr is None and dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    assert_close(dx, ref_dx, dtype, "dx")
    param_tol = torch.float32 if dtype == torch.float64 else dtype  # fp32 parameters: fp32 gradients
    assert_close(dw, ref_dw, param_tol, "dweight")
    assert_close(db, ref_db, param_tol, "dbias")
    assert _tickets_are_zero()


@interpreter_only
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_backward_and_dx_alone(layout, device):
    x = random_input((6, 3, 5, 7), torch.float32, device, layout, seed=82, mean=0.5)
    dy = random_input((6, 3, 5, 7), torch.float32, device, layout, seed=83)
    w, b, rm, rv = _params(3, device, seed=1)
    plan = _plan(x)
    _, _, _, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, dy)
    dx, dw, db, _ = _backward(x, plan, dy, rm, rv, w, 1e-5, False, (True, True, True, False))
    assert_close(dx, ref_dx, torch.float32, "dx")
    assert_close(dw, ref_dw, torch.float32, "dweight")
    assert_close(db, ref_db, torch.float32, "dbias")
    dx_only = _backward(x, plan, dy, rm, rv, w, 1e-5, False, (True, False, False, False))
    assert dx_only[1:] == (None, None, None) and torch.equal(dx_only[0], dx)


def _torch_act(z, name, slope):
    return {None: lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, slope)}[name](z)


@interpreter_only
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,residual,from_output", [
    ("relu", False, False), ("leaky_relu", True, False), ("leaky_relu", True, True), (None, True, True)])
def test_fused_epilogue(layout, dtype, activation, residual, from_output, device):
    """act(BN(x) + r) forward; the backward from x or, save="output", from y, with dresidual."""
    shape, slope = (3, 6, 5, 7), 0.2
    x = random_input(shape, dtype, device, layout, seed=84, mean=0.3, std=1.5)
    r = random_input(shape, dtype, device, "contiguous", seed=85) if residual else None
    dy = random_input(shape, dtype, device, layout, seed=86)
    w, b, _, _ = _params(shape[1], device, seed=2)
    plan = _plan(x)
    up = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x64, r64, w64, b64 = up(x), up(r), up(w), up(b)
    z = F.batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5)
    ref_y = _torch_act(z if r64 is None else z + r64, activation, slope)
    ref_y.backward(dy.double())
    code = activation_code(activation)
    y, mean, invstd = _forward(x, plan, w, b, None, None, 0.1, 1e-5, activation=code, negative_slope=slope,
                               residual=r)
    assert_close(y, ref_y, dtype, "y")
    grads = _backward(y if from_output else x, plan, dy, mean, invstd, w, 1e-5, True,
                      (True, True, True, residual), bias=b, activation=code, negative_slope=slope, residual=r,
                      from_output=from_output)
    tol = 2e-5 if dtype == torch.float32 else (6e-2 if from_output else 3e-2)
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, (x64.grad, w64.grad, b64.grad,
                                                                                 None if r64 is None else r64.grad)):
        if want is None:
            assert got is None, name
        else:
            assert_close(got, want, dtype, name, tol=tol)


@interpreter_only
def test_in_place_forward_writes_y_over_x(device):
    x = random_input((6, 3, 5, 7), torch.float32, device, seed=87, mean=1.0)
    ref_y, _, _, _ = reference_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    y, _, _ = _forward(x, _plan(x), None, None, None, None, 0.1, 1e-5, out=x)
    assert y.data_ptr() == x.data_ptr()
    assert_close(x, ref_y, torch.float32, "y in place")


@interpreter_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("layout,position", [("contiguous", 0), ("contiguous", 77), ("channels_last", 5)])
def test_non_finite_values_behave_like_torch(value, layout, position, device):
    x = random_input((6, 3, 5, 5), torch.float32, "cpu", layout, seed=88)
    x.as_strided((x.numel(),), (1,))[position] = value
    results = []
    for fn in ("torch", "cooperative"):
        rm, rv = torch.zeros(3), torch.ones(3)
        if fn == "torch":
            y = F.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
        else:
            y, _, _ = _forward(x, _plan(x), None, None, rm, rv, 1.0, 1e-5)
        results.append((y, rm, rv))
    for name, theirs, ours in zip(("y", "running_mean", "running_var"), *results):
        torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)


@interpreter_only
@pytest.mark.parametrize("cumulative", [False, True])
def test_running_statistics_and_step_counter_move_exactly_once(cumulative, device):
    """Three steps against torch's module (momentum, or momentum=None's 1/num_batches_tracked)."""
    theirs = torch.nn.BatchNorm2d(5, momentum=None if cumulative else 0.3)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    steps = torch.zeros((), dtype=torch.int64, device=device)
    for step in range(3):
        x = random_input((4, 5, 6, 3), torch.float32, device, "channels_last", seed=89 + step, mean=step, std=2.0)
        _forward(x, _plan(x), None, None, rm, rv, None if cumulative else 0.3, 1e-5, steps)
        theirs(x.cpu())
    assert_close(rm, theirs.running_mean, torch.float32, "running_mean")
    assert_close(rv, theirs.running_var, torch.float32, "running_var")
    assert int(steps) == 3 and _tickets_are_zero()


@interpreter_only
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_results_do_not_depend_on_program_order(order, layout, device):
    """Phase 2's owners read every part in part order: the same bits in any program order."""
    x = random_input((6, 3, 5, 7), torch.float32, device, layout, seed=92, mean=3.0)
    dy = random_input((6, 3, 5, 7), torch.float32, device, layout, seed=93)
    w, b, _, _ = _params(3, device, seed=3)
    plan = _plan(x)

    def run():
        rm, rv = torch.zeros(3), torch.ones(3)
        steps = torch.zeros((), dtype=torch.int64)
        y, mean, invstd = _forward(x, plan, w, b, rm, rv, 0.1, 1e-5, steps, activation=2, residual=dy)
        grads = _backward(x, plan, dy, mean, invstd, w, 1e-5, True, (True, True, True, True), bias=b, activation=2,
                          residual=dy)
        return (y, mean, invstd, rm, rv, steps, *grads)
    natural = run()
    with program_order(order, seed=5):
        other = run()
    for a, b_ in zip(natural, other):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------
# The plan: co-residency and the switch

def test_plan_is_off_by_default_and_sized_for_co_residency():
    x = torch.empty((64, 512, 7, 7), dtype=torch.float16).to(memory_format=torch.channels_last)
    view = input_view(x)
    assert not cooperative_enabled()  # TRITON_BN_COOPERATIVE defaults to 0
    assert cooperative.cooperative_plan_for(view) is None
    with use_cooperative(True):
        block_r, block_k, warps, G, blocks = cooperative.cooperative_plan_for(view)
    # perf/NOTES.md, 2026-12-08: 64 fp16 channels x 128 rows per program, 200 programs of 8 warps.
    assert (block_r, block_k, warps, G, blocks) == (128, 64, 8, 25, 8)
    assert G * blocks <= co_resident_programs(132, warps) == 264
    assert 65536 // (COOPERATIVE_MAX_REGISTERS * 32 * warps) == 2
    for shape in [(64, 2048, 7, 7), (256, 512, 7, 7)]:  # 800, 784 programs: not co-resident
        big = torch.empty(shape, dtype=torch.float16).to(memory_format=torch.channels_last)
        with use_cooperative(True):
            assert cooperative.cooperative_plan_for(input_view(big)) is None
    assert cooperative.cooperative_tile(64, 512, 49, False, 4, 108) is None  # 512 programs > 216 (A100)


@pytest.mark.parametrize("N,Q,K,cl,itemsize", [(6, 35, 3, True, 4), (6, 3, 35, False, 2), (50, 1, 37, True, 8),
                                                (64, 49, 512, True, 2), (64, 8, 3136, False, 4)])
def test_parts_cover_each_slab_once(N, Q, K, cl, itemsize):
    for elements in (64, 0):
        plan = cooperative.cooperative_tile(N, Q, K, cl, itemsize, 100000, elements)
        block_r, block_k, warps, G, blocks = plan
        rows, cols = (N * Q, K) if cl else (N, K)
        if cl:
            assert G * block_r >= rows > (G - 1) * block_r and blocks * block_k >= K > (blocks - 1) * block_k
        else:
            assert blocks == Q and G == -(-N // block_r) * -(-K // block_k)
        assert block_r * block_k <= (elements or 8192) and warps <= 8


# ---------------------------------------------------------------------------------------------
# Bytes (tests/test_bytes.py's counter) and the single launch at G = 1

@interpreter_only
@pytest.mark.parametrize("shape,layout", [((8, 4, 8, 16), "contiguous"), ((8, 8, 4, 16), "channels_last"),
                                          ((512, 24), "contiguous")])
def test_single_launch_moves_2_and_3_tensors(shape, layout, accesses, device, monkeypatch):  # noqa: F811
    """PHASE 0, the GPU's kernel (with its barriers, which one program passes at once): forward
    training reads x once and writes y (2·T·e), backward reads x and dy once and writes dx (3·T·e)."""
    monkeypatch.setattr(cooperative, "_phases", lambda exchange: (0,))
    x = random_input(shape, torch.float32, device, layout, seed=94)
    dy = random_input(shape, torch.float32, device, layout, seed=95)
    plan = _plan(x, elements=16384, programs_per_block=1)
    ref_y, _, _, (ref_dx, _, _) = reference_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, dy)
    y, mean, invstd = _forward(x, plan, None, None, None, None, 0.1, 1e-5)
    assert accesses.count(x, "load") == pytest.approx(1.0 + _pivots(x, plan)) and accesses.count(y, "store") == 1.0
    accesses.loads.clear(), accesses.stores.clear()
    dx = _backward(x, plan, dy, mean, invstd, None, 1e-5, True, (True, False, False, False))[0]
    assert accesses.count(x, "load") == 1.0 and accesses.count(dy, "load") == 1.0
    assert accesses.count(dx, "store") == 1.0 and accesses.count(x, "store") == 0
    assert_close(y, ref_y, torch.float32, "y")
    assert_close(dx, ref_dx, torch.float32, "dx")
    assert _tickets_are_zero()


def _pivots(x, plan):
    """The statistics' pivot row, in units of numel: one element per channel and program."""
    return plan[3] * x.shape[1] / x.numel()


@interpreter_only
def test_phased_launches_read_x_once_per_register_phase(accesses, device):  # noqa: F811
    """G > 1 under the interpreter: phase 1 reads x, phase 2 reads only the parts, phase 3 reads
    x again where a GPU keeps it in registers (so 2 here, 1 in the single launch above)."""
    x = random_input((8, 4, 8, 16), torch.float32, device, "channels_last", seed=96)
    plan = _plan(x)
    y, _, _ = _forward(x, plan, None, None, None, None, 0.1, 1e-5)
    assert accesses.count(x, "load") == pytest.approx(2.0 + _pivots(x, plan)) and accesses.count(y, "store") == 1.0


# ---------------------------------------------------------------------------------------------
# The real barrier: one cooperative launch on a GPU

@pytest.mark.skipif(not CUDA, reason="needs a GPU: the single cooperative launch with its grid barriers")
@pytest.mark.parametrize("shape,layout,dtype", [((64, 512, 7, 7), "channels_last", torch.float16),
                                                ((32, 64, 28, 28), "contiguous", torch.float32),
                                                ((8192, 96), "contiguous", torch.bfloat16)])
def test_single_launch_on_the_gpu(shape, layout, dtype):
    x = random_input(shape, dtype, "cuda", layout, seed=97, mean=5.0, std=2.0)
    dy = random_input(shape, dtype, "cuda", layout, seed=98)
    w, b, rm, rv = _params(shape[1], "cuda", seed=4)
    with use_cooperative(True):
        plan = cooperative.cooperative_plan_for(input_view(x))
    assert plan is not None and plan[3] > 1, plan
    steps = torch.zeros((), dtype=torch.int64, device="cuda")
    ref_y, ref_rm, ref_rv, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, dy)
    y, mean, invstd = _forward(x, plan, w, b, rm, rv, 0.1, 1e-5, steps)
    dx, dw, db, _ = _backward(x, plan, dy, mean, invstd, w, 1e-5, True, (True, True, True, False))
    torch.cuda.synchronize()
    assert int(steps) == 1 and _tickets_are_zero()
    for name, got, want, tol in (("y", y, ref_y, dtype), ("running_mean", rm, ref_rm, torch.float32),
                                 ("running_var", rv, ref_rv, torch.float32), ("dx", dx, ref_dx, dtype),
                                 ("dweight", dw, ref_dw, dtype), ("dbias", db, ref_db, dtype)):
        assert_close(got, want, tol, name)
    # Graph-captured: the capture's own zeroed counters; replays give the eager bits.
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        y_graph, _, _ = _forward(x, plan, w, b, None, None, 0.1, 1e-5)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, y)
