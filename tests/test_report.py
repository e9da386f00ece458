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

from triton_bn.kernels.tuning import TILE_CONFIGS, prune_tile_configs
from triton_bn.report import compile_jobs, run_jobs, tools_missing
from triton_bn.report.budget import budget, instructions_per_byte
from triton_bn.report.launches import CompileJob, _specialize, job_key
from triton_bn.report.machine_code import integer_divisions, occupancy, ptx_width, sass_width
from triton_bn.report.shapes import RESNET50_SHAPES, case_rows, launch_paths, shape_jobs
from triton_bn.report.shapes_table import with_budget

MISSING = tools_missing()
needs_tools = pytest.mark.skipif(MISSING is not None, reason=f"no GPU compiler tools: {MISSING}")

PAIRS = [(dtype, layout) for layout in ("NCHW", "NHWC") for dtype in ("fp32", "fp16", "bf16")]
TILE_KERNELS = {"stats_partial", "backward_partial", "normalize", "backward_dx"}
ELEMENTWISE = {"normalize", "backward_dx", "onchip_forward", "onchip_backward"}  # these also store tiles
ONCHIP = {"onchip_forward", "onchip_backward"}
FLAT_KERNELS = ELEMENTWISE - ONCHIP  # the split path's elementwise kernels, which walk flat


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
def test_folded_combines_leave_two_programs_per_sm():
    """The partial kernels' last program per channel merges the splits (the folded combine);
    that merge must not set the kernel's register count: at most 128 per thread, so that at
    least two 8-warp programs share an SM (a tile-sized merge block took 192-234)."""
    rows = [r for r in _sample_rows() if r["name"] in ("stats_partial", "backward_partial") and "error" not in r]
    assert {r["variant"] for r in rows} >= {"train", "sync"}
    heavy = [_describe(r) for r in rows if r["regs"] > 128]
    assert not heavy, "register-bound partial kernels:\n" + "\n".join(heavy)


FLAT_LAYOUTS = ("NCHW-S49", "NCHW-S196", "NHWC-C3")


def _first_config_per_tile_size():
    """What a GPU's pruning keeps for a flat launch (tuning.prune_tile_configs). Computed here:
    compile_jobs marks ``kept`` by this process's rules, which are the interpreter's under pytest."""
    first = {}
    for c in TILE_CONFIGS:
        first.setdefault(c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_K"], _config_key(c.kwargs.items(), c.num_warps))
    return set(first.values())


FLAT_CONFIGS = _first_config_per_tile_size()


@functools.lru_cache(maxsize=None)
def _flat_jobs():
    """normalize and backward_dx (train and eval) where their rows are not 16-byte multiples
    (NCHW 7x7 and 14x14, channels-last C = 3; fp32 and fp16): one kept config per case,
    rotating, so every config the pruning keeps for a flat launch is compiled somewhere."""
    groups = {}
    for job in compile_jobs(archs=(90,), dtypes=("fp32", "fp16"), layouts=FLAT_LAYOUTS, kernels=sorted(FLAT_KERNELS)):
        if _config_key(job.config, job.num_warps) in FLAT_CONFIGS:
            groups.setdefault((job.name, job.variant, job.layout, job.dtype), []).append(job)
    return tuple(group[i % len(group)] for i, (_, group) in enumerate(sorted(groups.items())))


def test_flat_launches_are_recorded(monkeypatch):
    monkeypatch.setenv("TRITON_BN_INTERPRET_GPU_PRUNING", "1")
    monkeypatch.delenv("TRITON_BN_PIN_CONFIG", raising=False)
    assert {_config_key(c.kwargs.items(), c.num_warps)
            for c in prune_tile_configs(TILE_CONFIGS, {"K": 49}, FLAT=True)} == FLAT_CONFIGS
    jobs = _flat_jobs()
    assert {(j.name, j.variant, j.layout, j.dtype) for j in jobs} == {
        (name, variant, layout, dtype) for name in FLAT_KERNELS for variant in ("train", "eval")
        for layout in FLAT_LAYOUTS for dtype in ("fp32", "fp16")}
    assert all(dict(j.constexprs)["FLAT"] for j in jobs)
    configs = {_config_key(j.config, j.num_warps) for j in jobs}
    assert len(configs) == len({dict(c)["BLOCK_R"] * dict(c)["BLOCK_K"] for c, _ in configs}) > 1


@needs_tools
def test_flat_launches_move_tiles_128_bits_at_a_time_without_divisions():
    """The flat walk vectorizes rows of 49, 196 and 3 elements, and its channel index
    (i // S) % C compiles to multiply-high sequences: no div/rem instruction in the PTX."""
    rows = run_jobs(list(_flat_jobs()), workers=1, sass=False)
    failed = [f"{_describe(r)}\n{r['error']}" for r in rows if "error" in r]
    assert not failed, "compilation failed:\n" + "\n".join(failed)
    bad = [f"{_describe(r)} spill={r['spill_bytes']} int_divisions={r['int_divisions']}" for r in rows
           if r["spill_bytes"] or r["int_divisions"] or r["tile_ldg_count"] == 0 or r["tile_stg_count"] == 0
           or r["tile_ldg_min"] != 128 or r["tile_stg_min"] != 128]
    assert not bad, "flat launches that spill, divide or access tiles narrower than 128 bits:\n" + "\n".join(bad)


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


def test_integer_division_count():
    ptx = ("\tdiv.s32 \t%r1, %r2, %r3;\n\tmul.hi.s32 \t%r4, %r1, 1402438301;\n"
           "\t@%p1 rem.u64 \t%rd1, %rd2, %rd3;\n\tdiv.rn.f32 \t%f1, %f2, %f3;\n\tdiv.full.f32 %f4, %f5, %f6;")
    assert integer_divisions(ptx) == 2  # float divisions are not counted


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


# --- --shapes resnet50: main loops, instructions per element, division subroutines -----------
# A subset that compiles in CI time: one NCHW fp32 shape with S = 49 (no 16-byte vectors: K is
# odd) and one channels-last fp16 shape, batch 64, the training kernels, each launch's first
# kept config. The full sweep is `python -m triton_bn.report --shapes resnet50` (perf/NOTES.md).
SUBSET = (((512, 7, 7), ("fp32", "NCHW")), ((256, 14, 14), ("fp16", "NHWC")))
REDUCTIONS = {"stats_partial", "backward_partial"}
TENSORS_MOVED = {"stats_partial": (1, 0), "backward_partial": (2, 0), "normalize": (1, 1), "backward_dx": (2, 1)}


def test_resnet50_shapes_are_perfs():
    from perf.resnet50_layers import SHAPES
    assert RESNET50_SHAPES == SHAPES


def test_shapes_record_both_paths_when_the_onchip_switch_exists(monkeypatch):
    """Feature detection: with a ``tuning.use_onchip`` every case is recorded with it off
    ('split') and on ('onchip'); without it, once. Kept configs only."""
    import contextlib
    from triton_bn.kernels import tuning
    assert [label for label, _ in launch_paths()] == (["split", "onchip"] if hasattr(tuning, "use_onchip")
                                                      else ["split"])
    entered = []

    @contextlib.contextmanager
    def use_onchip(enabled):
        entered.append(enabled)
        yield
    monkeypatch.setattr(tuning, "use_onchip", use_onchip, raising=False)
    jobs, cases = shape_jobs(shapes=[(512, 7, 7)], batches=(64,), formats=[("fp16", "NHWC")])
    # The path contexts, in order (the scenarios' own split-path wrappers enter use_onchip(False) too).
    assert [case.path for case, _ in cases] == ["split", "onchip"] and entered[0] is False and entered.count(True) == 1
    for case, case_jobs in cases:
        assert case.label == "64x512x7x7" and case_jobs and all(j.kept for j in case_jobs)
        assert {j.name for j in case_jobs} >= {"stats_partial", "normalize", "backward_partial", "backward_dx"}
    assert len(jobs) == len({job_key(j) for _, case_jobs in cases for j in case_jobs})


@functools.lru_cache(maxsize=None)
def _subset_rows():
    cases = []
    for shape, fmt in SUBSET:
        _, mine = shape_jobs(shapes=[shape], batches=(64,), formats=[fmt], first_config=True)
        cases += [(case, [j for j in case_jobs if j.variant == "train" and j.autotuned]) for case, case_jobs in mine
                  if case.path == "split"]  # the on-chip kernels have no main loop (tests/test_onchip.py)
    unique = list({job_key(j): j for _, case_jobs in cases for j in case_jobs}.values())
    return [with_budget(r) for r in case_rows(cases, unique, run_jobs(unique, workers=2))]


@needs_tools
def test_resnet50_subset_main_loops():
    rows = _subset_rows()
    assert len(rows) == 2 * len(TENSORS_MOVED), [(r["shape"], r["name"]) for r in rows]
    for row in rows:
        assert "error" not in row, row.get("error")
        where = f"{row['shape']} {row['dtype']} {row['name']} {row['config_label']}"
        assert row["spill_bytes"] == 0, where
        assert row["loop"] == ("loop" if row["name"] in REDUCTIONS else "kernel"), (where, row["loop_note"])
        assert row["unroll"] == 1 and not row["loop_note"], where
        assert row["instructions_per_element"] > 0 and row["loop_instructions"] > 0, where
        tile = dict(row["config"])["BLOCK_R"] * dict(row["config"])["BLOCK_K"]
        assert row["elements_per_iteration"] == tile / (32 * row["num_warps"]), where
        assert not row["loop_div"] and not row["div_calls"], where  # DENSE_ROWS: no division per row
        assert (row["tile_load_tensors"], row["tile_store_tensors"]) == TENSORS_MOVED[row["name"]], where
        assert row["budget"] == pytest.approx(budget(row["dtype"], sum(TENSORS_MOVED[row["name"]])))


def _probe_job(element: str) -> CompileJob:
    signature = (("x_ptr", f"*{element}"), ("y_ptr", f"*{element}"), ("n", "i32"), ("q", element),
                 ("x_k_stride", "constexpr"), ("BLOCK_R", "constexpr"), ("BLOCK_K", "constexpr"))
    return CompileJob(kernel="report_probe:divide_in_loop_kernel", name="probe", variant="probe", dtype=element,
                      layout="-", signature=signature, constexprs=(("x_k_stride", 1),), divisible=("x_ptr", "y_ptr"),
                      config=(("BLOCK_K", 128), ("BLOCK_R", 1)), num_warps=4, num_stages=3, autotuned=False,
                      kept=True, arch=90)


@needs_tools
def test_division_subroutine_detected_in_the_loop(monkeypatch):
    """Known positive: a 64-bit // in a loop calls ptxas's __cuda_sm20_div_s64 there; known
    negative: the same loop in 32 bits divides inline."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    wide, narrow = run_jobs([_probe_job("i64"), _probe_job("i32")], workers=2)
    for row in (wide, narrow):
        assert "error" not in row, row.get("error")
        assert row["loop"] == "loop" and row["loop_count"] == 1 and not row["loop_note"]
        # One element per thread per source iteration; ptxas unrolls the 32-bit loop (4x with
        # ptxas 13.4), which the tile-load bits of SASS against PTX detect.
        assert row["elements_per_iteration"] == row["unroll"] >= 1
        assert row["instructions_per_element"] == pytest.approx(row["loop_instructions"] / row["unroll"])
    assert wide["loop_div"] and any(c.endswith("__cuda_sm20_div_s64") for c in wide["loop_calls"]), wide["loop_calls"]
    assert not narrow["loop_div"] and narrow["loop_calls"] == [] and narrow["div_calls"] == []


def test_budget_per_element():
    assert instructions_per_byte() == pytest.approx(132 * 4 * 32 * 1.98e9 / (0.9 * 4.8e12))  # ~7.74
    assert budget("fp16", 1) == pytest.approx(2 * instructions_per_byte())  # stats: one fp16 read
    assert budget("fp32", 3) == pytest.approx(12 * instructions_per_byte())  # dx: two reads, one write
    assert budget("fp32", 0) is None


@needs_tools
def test_shapes_command_line(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "triton_bn.report", "--shapes", "resnet50", "--only", "512x7x7",
                          "--batch", "64", "--dtype", "fp32", "--layout", "NCHW", "--kernel", "normalize",
                          "--first-config", "--json", "--jobs", "1"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    # 512x7x7 at batch 64 NCHW fits on chip: there the training forward is the on-chip kernel,
    # so only eval's normalize is left on the on-chip path.
    assert {(r["name"], r["variant"], r["shape"], r["path"]) for r in rows} == {
        ("normalize", "train", "64x512x7x7", "split"), ("normalize", "eval", "64x512x7x7", "split"),
        ("normalize", "eval", "64x512x7x7", "onchip")}
    for row in rows:
        assert row["instructions_per_element"] > 0 and row["budget"] == pytest.approx(budget("fp32", 2))
        assert row["loop"] == "kernel" and row["loop_div"] is False and "over_budget" in row


@needs_tools
def test_masked_variants_compile_for_sm90_within_the_budget():
    """Masked batch norm's kernels (``--masked``), as the launchers dispatch them on two ResNet-50
    shapes (fp32 NCHW, fp16 NHWC) on both paths: they compile for sm_90 (the interpreter accepts
    what the GPU compiler refuses, e.g. a global that is not a tl.constexpr), do not spill, and
    stay within the instruction budget at bandwidth (shapes_table.with_budget)."""
    _, mine = shape_jobs(shapes=[(512, 7, 7), (64, 56, 56)], batches=(64,),
                         formats=[("fp32", "NCHW"), ("fp16", "NHWC")], first_config=True, masked=True)
    cases = [(case, [j for j in case_jobs if j.variant == "train-masked"]) for case, case_jobs in mine]
    unique = list({job_key(j): j for _, case_jobs in cases for j in case_jobs}.values())
    assert {j.name for j in unique} >= {"stats_partial", "backward_dx", "onchip_forward", "onchip_backward"}
    rows = [with_budget(r) for r in case_rows(cases, unique, run_jobs(unique, workers=2))]
    for row in rows:
        where = f"{row['path']} {row['shape']} {row['dtype']} {row['name']} {row['config_label']}"
        assert "error" not in row, (where, row.get("error"))
        assert row["spill_bytes"] == 0, where
        assert not row["over_budget"], (where, row["instructions_per_element"], row["budget"])


@needs_tools
def test_masked_cooperative_kernels_compile_for_sm90_at_their_register_cap():
    """The cooperative kernels with a mask (``--masked``, the switch on) compile for sm_90 within
    the 128 registers that keep two programs per SM (tuning.COOPERATIVE_MAX_REGISTERS)."""
    jobs = [j for j in compile_jobs(archs=(90,), dtypes=("fp16",), layouts=("NHWC", "NCHW"), kernels=["cooperative"],
                                    cooperative=True, masked=True) if j.variant == "train-masked"]
    assert {j.name for j in jobs} == {"cooperative_forward", "cooperative_backward"}
    for row in run_jobs(jobs, workers=2, sass=False):
        assert "error" not in row, row.get("error")
        assert row["regs"] <= 128 and not row["spill_bytes"], _describe(row)
