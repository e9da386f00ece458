"""L2-resident second passes on the split path (tuning.l2_passes, helpers._walk_pid).

The statistics (backward partial) pass loads with evict_last when its reads fit in L2; normalize
(dx) then walks its tiles last first and loads with evict_first. The interpreter ignores cache
hints, so the CPU checks: the host rule and the flags the launchers pass; that the reversed walk
reads the last tile first and gives the forward walk's bits; and the sm_90 PTX (compiled on the
CPU): evict_last loads in the statistics kernel, evict_first loads and a reversed program id in
normalize, none of it with the flags off. Whether it saves time is for a GPU (perf/NOTES.md).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

import triton_bn.kernels as kernels
from tests.reference import random_input
from triton_bn.kernels import bn_backward, bn_backward_dx, bn_backward_reduce, bn_normalize, input_view, use_onchip
from triton_bn.kernels.activation import LEAKY_RELU
from triton_bn.kernels.launch import clear_plans
from triton_bn.kernels.tuning import L2_BYTES_SM90, L2_RESIDENT_FRACTION, L2_USEFUL_MULTIPLE, l2_passes
from triton_bn.report import compile_jobs, tools_missing
from tests.machine_code import compile_asm

CPU = torch.device("cpu")


def test_the_rule_follows_the_first_pass_bytes():
    fits = int(L2_RESIDENT_FRACTION * L2_BYTES_SM90)
    assert l2_passes(fits, CPU) == (True, True)
    assert l2_passes(fits + 1, CPU) == (False, True)  # the last-read part still helps
    assert l2_passes(L2_USEFUL_MULTIPLE * L2_BYTES_SM90, CPU) == (False, True)
    assert l2_passes(L2_USEFUL_MULTIPLE * L2_BYTES_SM90 + 1, CPU) == (False, False)


@pytest.fixture
def passed(monkeypatch):
    """The L2 keyword arguments each launcher gets from bn_forward_train / bn_backward."""
    seen = {}
    for name, flag in (("bn_stats", None), ("bn_normalize", "l2_reversed"), ("bn_backward_reduce", "evict_last"),
                       ("bn_backward_dx", "l2_reversed")):
        real = getattr(kernels, name)

        def wrapper(*args, _real=real, _name=name, _flag=flag, **kwargs):
            seen[_name] = args[7] if _flag is None else kwargs.get(_flag, False)  # bn_stats: positional
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernels, name, wrapper)
    clear_plans()  # a replayed call would skip the launchers
    yield seen
    clear_plans()


@use_onchip(False)
def test_the_launchers_pass_the_flags_after_a_first_pass(passed):
    x = random_input((4, 3, 6, 6), torch.float32, CPU, seed=1)
    vec = lambda v: torch.full((3,), v)  # noqa: E731
    kernels.bn_forward_train(x, vec(1.0), vec(0.0), vec(0.0), vec(1.0), 0.1, 1e-5)
    assert passed == {"bn_stats": True, "bn_normalize": True}
    passed.clear()
    kernels.bn_forward_eval(x, vec(1.0), vec(0.0), vec(0.0), vec(1.0), 1e-5)
    assert passed == {"bn_normalize": False}, "no statistics pass before an eval normalize"
    passed.clear()
    bn_backward(x, x, vec(1.0), vec(0.0), vec(1.0), 1e-5, training=True)
    assert passed == {"bn_backward_reduce": True, "bn_backward_dx": True}
    passed.clear()
    bn_backward(x, x, vec(1.0), vec(0.0), vec(1.0), 1e-5, training=True, needs_input_grad=(False, True, True))
    assert passed == {"bn_backward_reduce": False}, "no dx pass follows: nothing to keep in L2"


@use_onchip(False)
def test_the_switch_turns_every_flag_off_and_replays_follow_it(passed):
    """TRITON_BN_L2_HINTS=0 / use_l2_hints(False): no hint and no reversed walk, also for a call
    replayed from a recording made with the switch on (the switch is in the replay key)."""
    x = random_input((4, 3, 6, 6), torch.float32, CPU, seed=1)
    vec = lambda v: torch.full((3,), v)  # noqa: E731
    kernels.bn_forward_train(x, vec(1.0), vec(0.0), vec(0.0), vec(1.0), 0.1, 1e-5)  # recorded, switch on
    kernels.bn_forward_train(x, vec(1.0), vec(0.0), vec(0.0), vec(1.0), 0.1, 1e-5)  # replayed
    passed.clear()
    with kernels.use_l2_hints(False):
        assert l2_passes(1024, CPU) == (False, False)
        kernels.bn_forward_train(x, vec(1.0), vec(0.0), vec(0.0), vec(1.0), 0.1, 1e-5)
        assert passed == {"bn_stats": False, "bn_normalize": False}
    assert kernels.l2_hints_enabled() and l2_passes(1024, CPU) == (True, True)


@pytest.fixture
def x_loads(monkeypatch):
    """Per interpreted load, the addresses it reads (masked lanes dropped)."""
    loads = []
    builder = interpreter.InterpreterBuilder
    masked_load = builder.create_masked_load

    def load(self, ptrs, mask, *args):
        loads.append(ptrs.data[mask.data].astype(np.uint64).ravel())
        return masked_load(self, ptrs, mask, *args)
    monkeypatch.setattr(builder, "create_masked_load", load)
    return loads


# (shape, layout): NCHW 2-D tiles (K = 256), NHWC 2-D tiles (K = C = 32), NCHW flat (K = 35).
WALKS = [((8, 16, 16, 16), "contiguous"), ((8, 32, 16, 16), "channels_last"), ((64, 16, 5, 7), "contiguous")]


@pytest.mark.parametrize("shape,layout", WALKS)
def test_the_reversed_walk_reads_the_last_tile_first(x_loads, shape, layout):
    x = random_input(shape, torch.float32, CPU, layout, seed=2)
    C = shape[1]
    mean, invstd = torch.zeros(C), torch.ones(C)
    lo, hi = x.data_ptr(), x.data_ptr() + x.untyped_storage().nbytes()
    firsts = {}
    for reversed_walk in (False, True):
        bn_normalize(input_view(x), mean, invstd, None, None, l2_reversed=reversed_walk)  # tunes: runs each config
        x_loads.clear()
        bn_normalize(input_view(x), mean, invstd, None, None, l2_reversed=reversed_walk)
        tiles = [a for a in x_loads if a.size and lo <= a.min() < hi]
        assert len(tiles) > 2, "the shape must span several programs"
        starts = [int(a.min()) for a in tiles]
        assert starts == sorted(starts, reverse=reversed_walk), f"tile order, l2_reversed={reversed_walk}"
        firsts[reversed_walk] = tiles[0]
    assert firsts[False].min() == lo and firsts[True].max() == hi - x.element_size()


CASES = [(dtype, layout, fused) for dtype in (torch.float32, torch.float16)
         for layout in ("contiguous", "channels_last") for fused in (False, True)]


@pytest.mark.parametrize("dtype,layout,fused", CASES)
def test_the_reversed_walk_gives_the_forward_walks_bits(dtype, layout, fused):
    shape = (8, 8, 9, 9) if layout == "contiguous" else (8, 32, 8, 8)  # flat (K = 81) / 2-D tiles
    x = random_input(shape, dtype, CPU, layout, seed=3)
    dy = random_input(shape, dtype, CPU, layout, seed=4)
    r = random_input(shape, dtype, CPU, layout, seed=5) if fused else None
    C = shape[1]
    g = torch.Generator().manual_seed(6)
    mean, invstd = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    epilogue = dict(activation=LEAKY_RELU if fused else 0, residual=r)
    view = input_view(x)
    sums, _, _ = bn_backward_reduce(view, dy, mean, invstd, weight, bias=bias, **epilogue)
    results = {}
    for reversed_walk in (False, True):
        clear_plans()
        y = bn_normalize(view, mean, invstd, weight, bias, l2_reversed=reversed_walk, **epilogue)
        dx = bn_backward_dx(view, dy, mean, invstd, weight, sums, 1.0 / (shape[0] * shape[2] * shape[3]),
                            bias=bias, grad_residual=fused, l2_reversed=reversed_walk, **epilogue)
        results[reversed_walk] = (y, *(dx if fused else (dx,)))
    for forward, backward in zip(results[False], results[True]):
        assert not forward.isnan().any()
        assert torch.equal(forward, backward)


MISSING = tools_missing()
# Triton 3.9 lowers eviction_policy to an L2 policy register and L1 + L2 qualifiers on the load:
#   createpolicy.fractional.L2::evict_last.b64 %rd2, 1.0;
#   @%p1 ld.global.L1::evict_last.L2::cache_hint.v4.b32 { ... }, [ %rd1 + 0 ], %rd2;
_HINTED_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global\.L1::(evict_\w+)\.L2::cache_hint")
_POLICY = re.compile(r"createpolicy\.fractional\.L2::(evict_\w+)")
_FLAGS = {"stats_partial": "EVICT_LAST", "normalize": "L2_REVERSED", "backward_partial": "EVICT_LAST",
          "backward_dx": "L2_REVERSED"}


def _hints(ptx: str):
    lines = ptx.splitlines()
    return ({m.group(1) for m in map(_HINTED_LOAD.match, lines) if m},
            {m.group(1) for m in map(_POLICY.search, lines) if m},
            sum(1 for line in lines if "%nctaid.x" in line))


def _opcodes(ptx: str) -> list:
    """The instruction sequence, operands and the hints' qualifiers dropped."""
    ops = []
    for line in ptx.splitlines():
        line = re.sub(r"^\s*@!?%p\d+\s+", "", line.strip())
        if not line or line[0] in "./{}$" or line.endswith(":") or line.startswith("createpolicy"):
            continue
        ops.append(re.sub(r"\.L1::evict_\w+|\.L2::cache_hint", "", line.split()[0]))
    return ops


@pytest.mark.skipif(MISSING is not None, reason=f"no GPU compiler tools: {MISSING}")
def test_the_ptx_carries_the_hints_only_under_the_flags(tmp_path):
    """The report's recorded training launches (32 x 64 x 56 x 56 fp16: x 12.8 MB, x + dy 25.7 MB,
    the flags on), each compiled as recorded and with its flag off."""
    jobs = {}
    for job in compile_jobs(archs=(90,), dtypes=("fp16",), layouts=("NCHW", "NHWC"),
                            kernels=list(_FLAGS), kept_only=True):
        if job.variant == "train" and job.name in _FLAGS:
            jobs.setdefault((job.name, job.layout), job)
    assert len(jobs) == 8, sorted(jobs)
    pairs = []
    for (name, _), job in sorted(jobs.items()):
        constexprs = dict(job.constexprs)
        assert constexprs[_FLAGS[name]] is True, (name, "the launcher sets the flag on a tensor that fits")
        pairs += [job, dataclasses.replace(job, constexprs=tuple({**constexprs, _FLAGS[name]: False}.items()))]
    ptx = [code["ptx"] for code in compile_asm(pairs, tmp_path)]
    for i in range(0, len(pairs), 2):
        job, on, off = pairs[i], ptx[i], ptx[i + 1]
        where = f"{job.name} {job.layout}"
        loads, policies, nctaid = _hints(on)
        if _FLAGS[job.name] == "EVICT_LAST":
            assert loads == {"evict_last"} and policies == {"evict_last"} and nctaid == 0, where
            # The same instructions but one: the 64-bit policy operand's 0 default (mov.u64 %rd, 0x0).
            on_ops, off_ops = Counter(_opcodes(on)), Counter(_opcodes(off))
            extra, missing = on_ops - off_ops, off_ops - on_ops
            assert extra == Counter({"mov.u64": 1}) and not missing, f"{where}: {extra}, {missing}"
        else:
            assert loads == {"evict_first"} and policies == {"evict_first"} and nctaid == 1, where
            extra = len(_opcodes(on)) - len(_opcodes(off))
            # mov %nctaid.x, not + add (num_programs - 1 - pid), the policy operand's mov.u64
            assert 0 < extra <= 4, f"{where}: the reversed walk costs {extra} instructions per program"
        assert _hints(off) == (set(), set(), 0), f"{where}: the flag off adds no hint"
