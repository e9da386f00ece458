"""One rank of the process groups spawned by tests/test_distributed.py.

    python tests/_dist_worker.py INIT_FILE RANK WORLD_SIZE OUT_DIR

Joins a gloo group (file:// rendezvous, loopback), runs every check below on CPU tensors through
Triton's interpreter, and writes OUT_DIR/rank<RANK>.json = {check: "ok" or the failure}. Each
rank builds the whole global batch from seeds, runs its slice, and compares with a float64
torch reference on the concatenated batch. A check does all its collectives before asserting,
so a failed comparison on one rank does not leave the others waiting.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, through triton_bn
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for tests.reference

import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from tests.reference import assert_close, random_input, reference_batch_norm  # noqa: E402
from triton_bn.distributed import SyncBatchNorm, SyncBatchNormAct, convert_sync_batchnorm  # noqa: E402

EPS = 1e-5
COLLECTIVES = {"all_gather": 0, "all_reduce": 0}


def _counting(name):
    original = getattr(dist, name)

    def wrapper(*args, **kwargs):
        COLLECTIVES[name] += 1
        return original(*args, **kwargs)
    return wrapper


def _collectives_during(fn):
    """(fn(), {collective: calls}) for the library's all_gather / all_reduce calls inside fn."""
    before = dict(COLLECTIVES)
    result = fn()
    return result, {k: COLLECTIVES[k] - before[k] for k in COLLECTIVES}


def _local(full, sizes, rank):
    lo = sum(sizes[:rank])
    return full[lo:lo + sizes[rank]]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)  # clone keeps channels_last strides


def _reduce_dims(t):
    return [d for d in range(t.dim()) if d != 1]


def _identical_on_all_ranks(t, name):
    """All ranks' copies of ``t`` gathered (a collective: call it on every rank)."""
    copies = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, t.contiguous())
    return [(name, c) for c in copies]


def check_layer(rank, world, sizes, tail, dtype, layout="contiguous", momentum=0.1, steps=1,
                affine=True, track_running_stats=True):
    """SyncBatchNorm training steps on uneven slices of one global batch vs a float64 torch
    BatchNorm on the whole batch: y, dx, the local dgamma/dbeta, running stats, collectives."""
    C = tail[0]
    torch.manual_seed(1)
    bn = SyncBatchNorm(C, eps=EPS, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    params = (bn.weight, bn.bias) if affine else (None, None)
    ref_rm = torch.zeros(C, dtype=torch.float64) if track_running_stats else None
    ref_rv = torch.ones(C, dtype=torch.float64) if track_running_stats else None
    checks = []  # (name, actual, expected, dtype): compared after every collective is done
    calls = []
    for step in range(steps):
        shape = (sum(sizes), *tail)
        x_full = random_input(shape, dtype, "cpu", layout, seed=10 + step, mean=3.0, std=2.0)
        dy_full = random_input(shape, dtype, "cpu", layout, seed=20 + step)
        x, dy = _leaf(_local(x_full, sizes, rank)), _local(dy_full, sizes, rank)
        bn.zero_grad()
        y, forward_calls = _collectives_during(lambda: bn(x))
        _, backward_calls = _collectives_during(lambda: y.backward(dy))
        ref_momentum = 1.0 / (step + 1) if momentum is None else momentum
        y_ref, ref_rm, ref_rv, (dx_ref, _, _) = reference_batch_norm(
            x_full, ref_rm, ref_rv, *params, True, ref_momentum, EPS, dy_full)
        x64, dy64 = x_full.double(), dy_full.double()
        var, mean = torch.var_mean(x64, _reduce_dims(x64), correction=0, keepdim=True)
        xhat = _local((x64 - mean) / torch.sqrt(var + EPS), sizes, rank)
        dy_local = _local(dy64, sizes, rank)
        checks += [(f"step {step} y", y, _local(y_ref, sizes, rank), dtype),
                   (f"step {step} dx", x.grad, _local(dx_ref, sizes, rank), dtype)]
        if affine and x.numel() == 0:
            # torch leaves them None, and DDP's all-reduce then waits for them: zeros instead.
            for name, grad in (("dweight", bn.weight.grad), ("dbias", bn.bias.grad)):
                assert grad is not None and grad.dtype == bn.weight.dtype, f"empty rank: {name} is {grad}"
                assert torch.equal(grad, torch.zeros_like(grad)), f"empty rank: {name} = {grad}"
        elif affine:
            # torch.nn.SyncBatchNorm's parameter gradients: this rank's share, with global statistics.
            checks += [(f"step {step} dweight", bn.weight.grad, (dy_local * xhat).sum(_reduce_dims(xhat)), dtype),
                       (f"step {step} dbias", bn.bias.grad, dy_local.sum(_reduce_dims(dy_local)), dtype)]
        calls.append((forward_calls, backward_calls))
    if track_running_stats:
        copies = _identical_on_all_ranks(torch.stack([bn.running_mean, bn.running_var]), "running stats")
        checks += [("running_mean", bn.running_mean, ref_rm, torch.float32),
                   ("running_var", bn.running_var, ref_rv, torch.float32)]
        assert int(bn.num_batches_tracked) == steps
        for name, other in copies:
            assert torch.equal(other, copies[0][1]), f"{name} differ between ranks"
    else:
        assert bn.running_mean is None and bn.running_var is None
    for name, actual, expected, tol_dtype in checks:
        assert_close(actual, expected, tol_dtype, name)
    for forward_calls, backward_calls in calls:
        assert forward_calls == {"all_gather": 1, "all_reduce": 0}, f"forward collectives {forward_calls}"
        assert backward_calls == {"all_gather": 0, "all_reduce": 1}, f"backward collectives {backward_calls}"
    if layout == "channels_last" and x.numel() > 0:
        assert y.is_contiguous(memory_format=torch.channels_last), "y lost channels_last"
        assert x.grad.is_contiguous(memory_format=torch.channels_last), "dx lost channels_last"


_ACTIVATIONS = {"relu": F.relu, "leaky_relu": lambda z, s: F.leaky_relu(z, s), "silu": F.silu}


def check_fused_layer(rank, world, sizes, act, save="input", slope=0.01, inplace=False):
    """SyncBatchNormAct, y = act(BN(x) + r), on uneven slices vs float64 torch on the whole batch:
    y, dx, dresidual, the local dgamma/dbeta, one collective per direction. save="output"
    scales by |gamma| + eps (In-Place ABN); inplace writes y over the input."""
    C, tail = 3, (3, 4, 5)
    torch.manual_seed(2)
    bn = SyncBatchNormAct(C, eps=EPS, act_layer=act, negative_slope=slope, save=save, inplace=inplace)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.normal_()
    shape = (sum(sizes), *tail)
    x_full = random_input(shape, torch.float32, "cpu", seed=50, mean=1.0, std=2.0)
    r_full = random_input(shape, torch.float32, "cpu", seed=51)
    dy_full = random_input(shape, torch.float32, "cpu", seed=52)
    x, r = _leaf(_local(x_full, sizes, rank)), _leaf(_local(r_full, sizes, rank))
    dy = _local(dy_full, sizes, rank)
    y, forward_calls = _collectives_during(lambda: bn(x.clone() if inplace else x, r))  # in place: not on a leaf
    y_out = y.detach().clone()
    _, backward_calls = _collectives_during(lambda: y.backward(dy))

    def reference(dy64):
        x64, r64 = x_full.double().requires_grad_(), r_full.double().requires_grad_()
        w64, b64 = bn.weight.detach().double().requires_grad_(), bn.bias.detach().double().requires_grad_()
        scale = w64.abs() + EPS if save == "output" else w64
        var, mean = torch.var_mean(x64, _reduce_dims(x64), correction=0, keepdim=True)
        z = (x64 - mean) / torch.sqrt(var + EPS) * scale.view(1, -1, 1, 1) + b64.view(1, -1, 1, 1) + r64
        y64 = _ACTIVATIONS[act](z, slope) if act == "leaky_relu" else _ACTIVATIONS[act](z)
        y64.backward(dy64)
        return y64, x64.grad, r64.grad, w64.grad, b64.grad

    y_ref, dx_ref, dr_ref, _, _ = reference(dy_full.double())
    mask = torch.zeros_like(dy_full, dtype=torch.float64)
    _local(mask, sizes, rank).fill_(1.0)
    _, _, _, dw_ref, db_ref = reference(dy_full.double() * mask)  # this rank's share, global statistics
    for name, actual, expected in (("y", y_out, _local(y_ref, sizes, rank)), ("dx", x.grad, _local(dx_ref, sizes, rank)),
                                   ("dresidual", r.grad, _local(dr_ref, sizes, rank)),
                                   ("dweight", bn.weight.grad, dw_ref), ("dbias", bn.bias.grad, db_ref)):
        assert_close(actual, expected, torch.float32, name)
    assert forward_calls == {"all_gather": 1, "all_reduce": 0}, f"forward collectives {forward_calls}"
    assert backward_calls == {"all_gather": 0, "all_reduce": 1}, f"backward collectives {backward_calls}"


def check_masked_layer(rank, world, sizes, fused=False):
    """Masked SyncBatchNorm (SyncBatchNormAct with a residual when ``fused``): each rank's mask
    counts a different number of positions (one rank none at all, one rank an empty batch), and
    the statistics must be those of every rank's counted positions, vs a float64 composition on
    the whole batch: y, dx, dresidual, the local dgamma/dbeta, running statistics."""
    C, tail = 3, (3, 7)
    torch.manual_seed(3)
    bn = SyncBatchNormAct(C, eps=EPS, act_layer="relu") if fused else SyncBatchNorm(C, eps=EPS)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    shape = (sum(sizes), *tail)
    x_full = random_input(shape, torch.float32, "cpu", seed=60, mean=20.0, std=2.0)
    r_full = random_input(shape, torch.float32, "cpu", seed=61)
    dy_full = random_input(shape, torch.float32, "cpu", seed=62)
    g = torch.Generator().manual_seed(63)
    mask_full = torch.rand((shape[0], shape[2]), generator=g) > torch.linspace(0.1, 0.9, shape[0])[:, None]
    mask_full[:sizes[0]] = False  # rank 0 counts nothing
    x, r = _leaf(_local(x_full, sizes, rank)), _leaf(_local(r_full, sizes, rank))
    mask = _local(mask_full, sizes, rank)
    y = bn(x, r, mask=mask) if fused else bn(x, mask=mask)
    y_out = y.detach().clone()
    y.backward(_local(dy_full, sizes, rank))

    def reference(dy64):
        x64, r64 = x_full.double().requires_grad_(), r_full.double().requires_grad_()
        w64, b64 = bn.weight.detach().double().requires_grad_(), bn.bias.detach().double().requires_grad_()
        counted = mask_full[:, None].expand_as(x64)
        count = counted.sum((0, 2)).double().view(1, -1, 1)
        mean = torch.where(counted, x64, 0.0).sum((0, 2), keepdim=True) / count
        var = torch.where(counted, (x64 - mean) ** 2, 0.0).sum((0, 2), keepdim=True) / count
        z = (x64 - mean) / torch.sqrt(var + EPS) * w64.view(1, -1, 1) + b64.view(1, -1, 1)
        y64 = torch.relu(z + r64) if fused else z
        y64.backward(dy64)
        return y64, x64.grad, r64.grad, w64.grad, b64.grad, mean.flatten(), (var * count / (count - 1)).flatten()

    y_ref, dx_ref, dr_ref, _, _, mean_ref, unbiased_ref = reference(dy_full.double())
    share = torch.zeros_like(dy_full, dtype=torch.float64)
    _local(share, sizes, rank).fill_(1.0)
    _, _, _, dw_ref, db_ref, _, _ = reference(dy_full.double() * share)
    checks = [("y", y_out, _local(y_ref, sizes, rank)), ("dx", x.grad, _local(dx_ref, sizes, rank)),
              ("dweight", bn.weight.grad, dw_ref), ("dbias", bn.bias.grad, db_ref),
              ("running_mean", bn.running_mean, 0.9 * rm0.double() + 0.1 * mean_ref),
              ("running_var", bn.running_var, 0.9 * rv0.double() + 0.1 * unbiased_ref)]
    if fused:
        checks.append(("dresidual", r.grad, _local(dr_ref, sizes, rank)))
    for name, actual, expected in checks:
        assert_close(actual, expected, torch.float32, name)


def check_eval_and_subgroups(rank, world):
    """process_group is honored: ranks {0, 1} synchronize, every other rank is a group of one
    (the plain layer, no collective); eval mode never synchronizes."""
    groups = [dist.new_group([0, 1])] + [dist.new_group([r]) for r in range(2, world)]
    group = groups[0] if rank < 2 else groups[rank - 1]
    members = [0, 1] if rank < 2 else [rank]
    sizes = [3, 2] + [4] * (world - 2)
    C = 3
    bn = SyncBatchNorm(C, eps=EPS, process_group=group)
    x_full = random_input((sum(sizes), C, 5), torch.float32, "cpu", seed=3, mean=-1.0)
    x = _local(x_full, sizes, rank)
    y, train_calls = _collectives_during(lambda: bn(x))
    group_x = torch.cat([_local(x_full, sizes, r) for r in members])
    y_ref, rm_ref, rv_ref, _ = reference_batch_norm(group_x, torch.zeros(C), torch.ones(C), bn.weight,
                                                   bn.bias, True, 0.1, EPS)
    lo = sum(sizes[r] for r in members if r < rank)
    bn.eval()
    y_eval, eval_calls = _collectives_during(lambda: bn(x))
    assert train_calls["all_gather"] == (1 if rank < 2 else 0), f"training collectives {train_calls}"
    assert eval_calls == {"all_gather": 0, "all_reduce": 0}, f"eval collectives {eval_calls}"
    assert_close(y, y_ref[lo:lo + sizes[rank]], name="y (training)")
    assert_close(bn.running_mean, rm_ref, name="running_mean")
    assert_close(bn.running_var, rv_ref, name="running_var")
    expected = F.batch_norm(x.double(), bn.running_mean.double(), bn.running_var.double(),
                            bn.weight.double(), bn.bias.double(), False, 0.1, EPS)
    assert_close(y_eval, expected, name="y (eval)")


def check_errors_before_collectives(rank, world):
    """A bad call (here on every rank) raises before any collective or buffer change."""
    bn = SyncBatchNorm(3, eps=EPS)
    x = random_input((2, 3, 4), torch.float32, "cpu", seed=5)
    before = dict(COLLECTIVES)
    for bad, error in ((x.long(), NotImplementedError), (x[:, :2], RuntimeError)):
        try:
            bn(bad)
        except error:
            pass
        else:
            raise AssertionError(f"no {error.__name__} for {bad.dtype} {tuple(bad.shape)}")
    assert int(bn.num_batches_tracked) == 0, "num_batches_tracked changed"
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert COLLECTIVES == before, "a collective ran"


def check_ddp(rank, world, sizes, steps=3):
    """A small conv net with SyncBatchNorm in DistributedDataParallel, a few SGD steps, vs the
    same net with torch.nn.BatchNorm2d on the whole batch in one process (float64)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    reference = copy.deepcopy(net).double()
    model = DistributedDataParallel(convert_sync_batchnorm(net))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.5)
    total = sum(sizes)
    for step in range(steps):
        x_full = random_input((total, 3, 3, 4), torch.float32, "cpu", seed=30 + step, mean=1.0)
        target_full = random_input((total, 2, 3, 4), torch.float32, "cpu", seed=40 + step)
        # DDP averages the ranks' gradients: the reference loss is the ranks' losses / world.
        optimizer.zero_grad()
        out = model(_local(x_full, sizes, rank))
        ((out - _local(target_full, sizes, rank)) ** 2).sum().div(total).backward()
        bn = model.module[1]
        # Every rank, an empty one too, hands DDP a gradient for every parameter.
        assert bn.weight.grad is not None and bn.bias.grad is not None, f"rank {rank}: BN gradient None"
        optimizer.step()
        ref_optimizer.zero_grad()
        ((reference(x_full.double()) - target_full.double()) ** 2).sum().div(total * world).backward()
        ref_optimizer.step()
    assert isinstance(model.module[1], SyncBatchNorm)
    expected = dict(reference.state_dict())
    for name, value in model.module.state_dict().items():
        assert_close(value, expected[name], torch.float32, name)  # ~3e-7 off after 3 steps


# (name, {world size: per-rank batch sizes}, check). Uneven everywhere; world 3 has empty ranks
# and a rank with a single sample (one value per channel locally, many globally).
CHECKS = [
    ("fp32 NCHW", {2: [3, 5], 3: [2, 0, 4]},
     lambda r, w, s: check_layer(r, w, s, (3, 4, 5), torch.float32)),
    ("fp32 channels_last momentum=None x2", {2: [2, 5], 3: [3, 1, 2]},
     lambda r, w, s: check_layer(r, w, s, (4, 3, 3), torch.float32, "channels_last", None, steps=2)),
    ("bf16 (N, C)", {2: [5, 1], 3: [1, 4, 0]},
     lambda r, w, s: check_layer(r, w, s, (6,), torch.bfloat16)),
    ("bf16 channels_last", {2: [4, 2], 3: [0, 2, 3]},
     lambda r, w, s: check_layer(r, w, s, (4, 2, 3), torch.bfloat16, "channels_last")),
    ("fp32 (N, C, L) no affine, no running stats", {2: [4, 4], 3: [2, 3, 3]},
     lambda r, w, s: check_layer(r, w, s, (3, 7), torch.float32, affine=False, track_running_stats=False)),
    ("eval and process_group", {2: None, 3: None}, lambda r, w, s: check_eval_and_subgroups(r, w)),
    ("errors before collectives", {2: None, 3: None}, lambda r, w, s: check_errors_before_collectives(r, w)),
    ("DDP SGD", {2: [3, 5], 3: [4, 0, 3]}, lambda r, w, s: check_ddp(r, w, s)),
    ("fused relu + residual", {2: [3, 2], 3: [2, 0, 3]},
     lambda r, w, s: check_fused_layer(r, w, s, "relu")),
    ("fused leaky_relu save=output in place", {2: [2, 3], 3: [1, 3, 1]},
     lambda r, w, s: check_fused_layer(r, w, s, "leaky_relu", "output", slope=0.2, inplace=True)),
    ("masked, uneven counts", {2: [2, 4], 3: [2, 0, 4]}, lambda r, w, s: check_masked_layer(r, w, s)),
    ("masked fused relu + residual", {2: [3, 3], 3: [1, 3, 2]},
     lambda r, w, s: check_masked_layer(r, w, s, fused=True)),
]


def main():
    init_file, rank, world, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    # A rank that dies or diverges makes its peers' collectives fail after this, not hang.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    for name in COLLECTIVES:
        setattr(dist, name, _counting(name))
    # torch's DDP refuses CPU modules holding a SyncBatchNorm, because torch's own kernels are
    # CUDA-only; triton_bn's run on the CPU through the interpreter, so lift that guard here.
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    torch.set_num_threads(1)
    results = {}
    for name, sizes, check in CHECKS:
        try:
            check(rank, world, sizes[world])
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test, which fails on it
            results[name] = traceback.format_exc(limit=4)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
