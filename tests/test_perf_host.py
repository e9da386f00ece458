"""The host-cost benchmark (python -m perf host): it runs without a GPU, writes a complete CSV,
and counts exactly the launches the library makes. Timings are never asserted: they are host
cost on a shared machine, and the benchmark's job is to report them, not to meet them."""
import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perf  # noqa: F401  (chooses the interpreter in this process without CUDA, as conftest does)
from perf import env, host, host_driver
from perf.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
needs_cc = pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("clang")),
                              reason="the stub libcuda is compiled with the system C compiler")


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    """One small run of the benchmark (a fresh process, as a user starts it): (meta, rows, output)."""
    out = tmp_path_factory.mktemp("host")
    done = subprocess.run([sys.executable, "-m", "perf", "host", "--out", str(out), "--reps", "20",
                           "--warmup", "2", "--timeout", "300"], cwd=ROOT, capture_output=True, text=True,
                          timeout=360)
    assert done.returncode == 0, done.stdout + done.stderr
    paths = list(out.glob("host-cost-*.csv"))
    assert len(paths) == 1, (paths, done.stdout)
    meta, lines = {}, []
    for line in paths[0].read_text().splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            meta[key] = value
        else:
            lines.append(line)
    return meta, list(csv.DictReader(lines)), done.stdout


@needs_cc
def test_host_benchmark_writes_every_op_and_api_with_sane_columns(host_run):
    meta, rows, printed = host_run
    assert meta["label"] == host.LABEL == "host cost per call, launch stubbed, not GPU time"
    assert host.LABEL in printed and "ratio" in printed
    assert {(r["op"], r["api"]) for r in rows} == {(op, api) for op in host.OPS for api in host.APIS}
    assert len(rows) == len(host.OPS) * len(host.APIS)
    assert list(rows[0]) == list(host.COLUMNS)
    for row in rows:
        for column in ("triton_bn_us", "triton_bn_p20_us", "triton_bn_p80_us", "torch_us", "torch_p20_us",
                       "torch_p80_us", "ratio"):
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (row["op"], row["api"], column, value)
        assert float(row["triton_bn_p20_us"]) <= float(row["triton_bn_us"]) <= float(row["triton_bn_p80_us"])
        # Each of the three is written to 4 significant digits: up to 5e-4 relative rounding each.
        assert float(row["ratio"]) == pytest.approx(float(row["triton_bn_us"]) / float(row["torch_us"]), rel=2e-3)
        assert int(row["reps"]) == 20 and row["shape"] == "2x8x4x4"


@needs_cc
def test_host_csv_records_the_versions_and_the_launch_path(host_run):
    """The plans launch through the C launch function on every Triton whose signature is known
    (tests/test_versions.py's table), and the CSV says which path and which versions."""
    import triton
    from test_versions import expected_launch_path
    meta, _, printed = host_run
    assert (meta["torch"], meta["triton"]) == (torch.__version__, triton.__version__)
    assert meta["launch_path"] == expected_launch_path(), meta
    assert host.LAUNCH_PATHS[meta["launch_path"]] in meta["triton_bn"]
    assert f"launch path: {meta['launch_path']}" in printed


def test_stub_is_built_under_every_link_name():
    """Triton 3.5/3.6 link their launchers with -lcuda (libcuda.so), later ones libcuda.so.1."""
    if not (shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("the stub libcuda is compiled with the system C compiler")
    path = host_driver.build_stub()
    assert path.name == host_driver.SONAME
    for name in host_driver.LINK_NAMES:
        assert (path.parent / name).read_bytes() == path.read_bytes()


def test_untimed_bench_runs_the_call_once():
    calls = []
    assert host_driver._untimed_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    assert host_driver._untimed_bench(lambda: calls.append(1)) == 1.0
    assert len(calls) == 2


def _interpreter_launches(call) -> int:
    """Kernel launches of one call of ``call`` through this process's interpreter (after a
    first call, which autotunes: tuning runs candidates, which are launches of their own).
    Every interpreted launch runs a GridExecutor (Triton 3.5's InterpretedFunction has no run
    method: its kernel[grid] goes to the executor directly)."""
    from triton.runtime.interpreter import GridExecutor
    call()
    launched = []
    original = GridExecutor.__call__

    def counting(self, *args, **kwargs):
        launched.append(self.fn)
        return original(self, *args, **kwargs)

    GridExecutor.__call__ = counting
    try:
        call()
    finally:
        GridExecutor.__call__ = original
    return len(launched)


def _library_call(op: str):
    """``op`` once through triton_bn.BatchNorm2d and autograd, as the benchmark's module api."""
    import triton_bn
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    dy = torch.randn(2, 8, 4, 4)
    bn = triton_bn.BatchNorm2d(8)
    inputs = (x, bn.weight, bn.bias)
    if op == "forward-train":
        return lambda: bn(x)
    if op == "forward-eval":
        bn.eval()
        return lambda: bn(x.detach())
    if op == "backward":
        y = bn(x)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(bn(x), inputs, dy)


@needs_cc
@pytest.mark.skipif(torch.cuda.is_available(), reason="counts launches through the CPU interpreter")
@pytest.mark.parametrize("op", host.OPS)
def test_launches_per_op_are_the_librarys(host_run, op):
    """The stub counts what the compiled path launches; the interpreter counts the same call
    independently (today: forward-train 3, eval 1, backward 3, fwd+bwd 6)."""
    _, rows, _ = host_run
    expected = _interpreter_launches(_library_call(op))
    assert expected >= 1
    counted = {r["api"]: int(r["launches"]) for r in rows if r["op"] == op}
    assert counted == {api: expected for api in host.APIS}


def test_worker_refuses_an_unprepared_process(monkeypatch, capsys):
    """Started without `python -m perf host`'s environment, the worker measures nothing."""
    monkeypatch.delenv("TRITON_BN_CPU_KERNELS", raising=False)
    assert host.worker([]) == 2
    assert "python -m perf host" in capsys.readouterr().err


def test_stub_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        host_driver.install()


@pytest.mark.parametrize("argv, message", [(["--shape", "2x8x4"], "4 positive"), (["--reps", "0"], "at least 1")])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        host.parse(argv)
    assert message in capsys.readouterr().err


def test_host_is_a_listed_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["host", "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "launch stubbed" in printed or "cuLaunchKernelEx" in printed
    assert "--reps" in printed and "--out" in printed


@pytest.mark.parametrize("name, slug", [("AMD EPYC", "amd-epyc"), ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13"),
                                        ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "intel-xeon-platinum-8481c"),
                                        ("", "cpu")])
def test_cpu_names_make_csv_names(name, slug):
    """host-cost-<slug>.csv: one file per processor model."""
    assert env.file_slug(name) == slug
