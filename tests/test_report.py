"""The kernels' machine code, compiled for sm_90 on the CPU: what the config list promises.

Every shipped autotune config (triton_bn/kernels/tuning.py) of every autotuned kernel is
compiled once, from the launchers' own arguments (see triton_bn/report/launches.py), the
(dtype, layout) rotating over fp32/fp16/bf16 x NCHW/NHWC so that each kernel meets all six;
the combine kernels with their fixed launch configs, and the on-chip kernels (not autotuned)
at the on-chip bound, each (kernel, variant) once with (dtype, layout) rotating. Asserted: zero spill bytes everywhere,
and 128-bit loads (and stores) of the [N, Q, K] tiles in the elementwise and
partial-reduction kernels. ~100 compiles in one subprocess without TRITON_INTERPRET;
widths come from the PTX (``ld.global.v4.b32``), which one test checks against the SASS.
The full sweep (all dtypes x layouts x configs, SASS) is ``python -m triton_bn.report``.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from triton_bn.kernels.tuning import TILE_CONFIGS
from triton_bn.report import compile_jobs, run_jobs, tools_missing
from triton_bn.report.launches import _specialize
from triton_bn.report.machine_code import occupancy, ptx_width, sass_width

MISSING = tools_missing()
needs_tools = pytest.mark.skipif(MISSING is not None, reason=f"no GPU compiler tools: {MISSING}")

PAIRS = [(dtype, layout) for layout in ("NCHW", "NHWC") for dtype in ("fp32", "fp16", "bf16")]
TILE_KERNELS = {"stats_partial", "backward_partial", "normalize", "backward_dx"}
ELEMENTWISE = {"normalize", "backward_dx", "onchip_forward", "onchip_backward"}  # these also store tiles
ONCHIP = {"onchip_forward", "onchip_backward"}


def _config_key(config_items, num_warps):
    return tuple(sorted(config_items)), num_warps


SHIPPED = {_config_key(c.kwargs.items(), c.num_warps) for c in TILE_CONFIGS}


@functools.lru_cache(maxsize=None)
def _all_jobs():
    return tuple(compile_jobs(archs=(90,), layouts=("NCHW", "NHWC")))


@functools.lru_cache(maxsize=None)
def _sample_jobs():
    """Each (autotuned kernel, variant) x shipped config once, (dtype, layout) rotating."""
    groups = {}
    for job in _all_jobs():
        if job.autotuned:
            key = (job.dtype, job.layout, _config_key(job.config, job.num_warps))
            groups.setdefault((job.name, job.variant), {})[key] = job
    selected = []
    for k, (_, group) in enumerate(sorted(groups.items())):
        for i, config in enumerate(TILE_CONFIGS):
            dtype, layout = PAIRS[(i + k) % len(PAIRS)]
            selected.append(group[(dtype, layout, _config_key(config.kwargs.items(), config.num_warps))])
    onchip = {}
    for job in _all_jobs():
        if job.name in ONCHIP:
            onchip.setdefault((job.name, job.variant), {})[(job.dtype, job.layout)] = job
    for k, (_, group) in enumerate(sorted(onchip.items())):
        selected.append(group[PAIRS[k % len(PAIRS)]])
    return tuple(selected + [job for job in _all_jobs() if not job.autotuned and job.name not in ONCHIP])


@functools.lru_cache(maxsize=None)
def _sample_rows():
    return run_jobs(list(_sample_jobs()), workers=1, sass=False)


def _describe(row):
    return (f"{row['name']}/{row['variant']} {row['dtype']} {row['layout']} {row['config_label']}: "
            f"regs={row.get('regs')} stack={row.get('stack')} local={row.get('local')} "
            f"tile LDG={row.get('tile_ldg_min')}x{row.get('tile_ldg_count')} "
            f"tile STG={row.get('tile_stg_min')}x{row.get('tile_stg_count')}")


def test_sample_covers_every_shipped_config_and_input():
    jobs = _sample_jobs()
    kernels = {(j.name, j.variant) for j in jobs if j.autotuned}
    assert {name for name, _ in kernels} == TILE_KERNELS
    for name, variant in kernels:
        mine = [j for j in jobs if (j.name, j.variant) == (name, variant)]
        assert {_config_key(j.config, j.num_warps) for j in mine} == SHIPPED, (name, variant)
        assert {(j.dtype, j.layout) for j in mine} == set(PAIRS), (name, variant)
    # SyncBatchNorm's combine, and the on-chip kernels: every variant, plain and fused.
    assert {j.name for j in jobs if not j.autotuned} == {"stats_combine"} | ONCHIP
    assert {(j.name, j.variant) for j in jobs if j.name in ONCHIP} == {
        ("onchip_forward", "train"), ("onchip_forward", "train-fused"), ("onchip_backward", "train"),
        ("onchip_backward", "train-fused"), ("onchip_backward", "eval")}
    assert all(j.num_warps == 16 for j in jobs if j.name in ONCHIP)  # at the bound


@needs_tools
def test_shipped_configs_do_not_spill_and_move_tiles_128_bits_at_a_time():
    rows = _sample_rows()
    failed = [f"{_describe(r)}\n{r['error']}" for r in rows if "error" in r]
    assert not failed, "compilation failed:\n" + "\n".join(failed)
    spilling = [_describe(r) for r in rows if r["spill_bytes"] or r["stack"] or r["local"]]
    assert not spilling, "configs that spill (drop them from TILE_CONFIGS):\n" + "\n".join(spilling)
    narrow = [_describe(r) for r in rows if r["name"] in TILE_KERNELS | ONCHIP and (
        not r["tile_lines"] or r["tile_ldg_count"] == 0 or r["tile_ldg_min"] != 128
        or (r["name"] in ELEMENTWISE and (r["tile_stg_count"] == 0 or r["tile_stg_min"] != 128)))]
    assert not narrow, "tile accesses narrower than 128 bits:\n" + "\n".join(narrow)


@needs_tools
def test_sass_widths_agree_with_ptx():
    """The cheap PTX reading used above is what ptxas emits: same widths and counts in SASS."""
    job = next(j for j in _sample_jobs() if j.name == "normalize" and j.dtype == "fp16")
    (ptx_row,), (sass_row,) = run_jobs([job], sass=False), run_jobs([job], sass=True)
    fields = ["ldg_max", "stg_max", "tile_ldg_min", "tile_stg_min", "tile_ldg_count", "tile_stg_count"]
    assert {f: sass_row[f] for f in fields} == {f: ptx_row[f] for f in fields}
    assert sass_row["tile_ldg_min"] == 128 and sass_row["widths_from"] == "sass"


def test_recorded_launches_carry_the_launchers_specialization():
    """NCHW fp16 (S = 3136): k stride 1 is a constant, n/q strides and K are multiples of 16;
    NHWC: k stride 1, q stride = C = 64."""
    jobs = {(j.name, j.variant, j.dtype, j.layout): j for j in _all_jobs()}
    for layout, q_stride in (("NCHW", 3136), ("NHWC", 64)):
        job = jobs[("normalize", "train", "fp16", layout)]
        signature, constexprs = dict(job.signature), dict(job.constexprs)
        assert signature["x_ptr"] == "*fp16" and signature["x_k_stride"] == "constexpr"
        assert constexprs["x_k_stride"] == 1 and constexprs["CHANNELS_LAST"] == (layout == "NHWC")
        assert constexprs["ACC_DTYPE"] == ("tl", "fp32")
        assert {"x_ptr", "y_ptr", "x_n_stride", "x_q_stride", "K"} <= set(job.divisible)
        assert q_stride % 16 == 0 and signature["x_q_stride"] == "i32"


def test_specialization_matches_triton():
    native = pytest.importorskip("triton._C.libtriton")
    if not hasattr(native, "native_specialize_impl"):
        pytest.skip("this triton has no native_specialize_impl to compare with")
    from triton.backends.compiler import BaseBackend
    tensor = torch.empty(64, dtype=torch.float16)
    assert tensor.data_ptr() % 16 == 0
    for value in (1, 0, 16, 17, -16, 3136, 2**31 + 16, 2**40, 0.5, tensor):
        kind, attr = native.native_specialize_impl(BaseBackend, value, False, True, True)
        mine, const, divisible = _specialize("arg", value, set())
        assert mine == kind, value
        assert (const == value) if kind == "constexpr" else (divisible == (attr == "D")), value


def test_access_width_parsing():
    assert [sass_width(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "STG.E.128.STRONG.GPU",
                                      "LDG.E.EL.128", "LDG.E.U8")] == [128, 64, 32, 16, 128, 128, 8]
    assert [ptx_width(s) for s in (".v4.b32", ".v2.b32", ".b32", ".b16", ".L1::evict_last.v4.b32",
                                   ".v8.b16", ".v2.b64")] == [128, 64, 32, 16, 128, 128, 128]


def test_occupancy_estimate():
    assert occupancy(32, 4, 0, 90) == (1.0, 16, "threads")  # 2048 threads / 128
    assert occupancy(128, 8, 0, 90) == (0.25, 2, "regs")  # 65536 / (128 * 32 * 8)
    assert occupancy(60, 8, 0, 90)[:2] == (0.5, 4)  # 60 -> 64 regs per thread when allocated
    assert occupancy(16, 1, 0, 90) == (0.5, 32, "blocks")
    assert occupancy(32, 4, 100 * 1024, 90) == (0.125, 2, "smem")  # 228 KB / 101 KB
    assert occupancy(32, 4, 100 * 1024, 80)[1] == 1  # 164 KB on sm_80


@needs_tools
def test_report_command_line(tmp_path):
    """The CLI works from an interpreter process (it compiles in clean subprocesses)."""
    env = dict(os.environ, TRITON_INTERPRET="1", XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "triton_bn.report", "--kernel", "stats_combine", "--layout",
                          "NC", "--dtype", "fp32", "--ptx", "--json"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads(out.stdout)
    assert row["name"] == "stats_combine" and row["regs"] > 0 and row["spill_bytes"] == 0
