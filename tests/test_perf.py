"""The perf harness on this machine: bytes model, suites, the correctness gate, the CSV schema,
the plots and the labelling. Without CUDA this is the CPU-interpreter pipeline (tiny shapes)."""
import csv
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# perf/ is a top-level folder of the repository, not part of the installed package: it is
# importable through pyproject's pytest `pythonpath = ["."]`.
ROOT = Path(__file__).resolve().parents[1]

import perf  # noqa: E402,F401  (chooses the interpreter without CUDA, as conftest does)
from perf import bytes_model, env  # noqa: E402
from perf.__main__ import main  # noqa: E402
from perf.check import Reference, mismatch  # noqa: E402
from perf.harness import make_inputs, measure_case  # noqa: E402
from perf.impls import EPS, MOMENTUM, TorchEager, make_impls  # noqa: E402
from perf.results import COLUMNS, HEADER_KEYS, add_speedups, read_csv, write_csv  # noqa: E402
from perf.resnet50_layers import EXPECTED, LAYER_COUNT, LAYERS, SHAPES, bn_layers  # noqa: E402
from perf.suites import RESNET50_CHW, SUITES, TINY_RESNET50, Case, suite_cases  # noqa: E402
from perf.summary import geomean, goal_lines, summarize  # noqa: E402

ON_CPU = env.mode() == env.CPU_INTERPRETER


# ------------------------------------------------------------------------------------------ bytes model

@pytest.mark.parametrize("dtype, e", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_bytes_model_counts_unique_bytes(dtype, e):
    T = 1000
    assert bytes_model.unique_bytes("forward-train", T, dtype) == 2 * T * e
    assert bytes_model.unique_bytes("forward-eval", T, dtype) == 2 * T * e
    assert bytes_model.unique_bytes("backward", T, dtype) == 3 * T * e
    assert bytes_model.unique_bytes("fwd+bwd", T, dtype) == 5 * T * e
    assert bytes_model.unique_bytes("copy", T, dtype) == 2 * T * e
    assert bytes_model.moved_bytes("forward-train", T, dtype) == 3 * T * e
    assert bytes_model.moved_bytes("backward", T, dtype) == 5 * T * e
    assert bytes_model.intensity("forward-eval", dtype) == pytest.approx(3 / (2 * e))


def test_bytes_model_predictions_and_rate():
    assert bytes_model.best_share_of_copy("forward-train") == pytest.approx(2 / 3)
    assert bytes_model.best_share_of_copy("forward-eval") == 1.0
    assert bytes_model.best_share_of_copy("backward") == pytest.approx(0.6)
    assert bytes_model.gbps(4e9, 1000.0) == pytest.approx(4.0)  # 4 GB in 1 s
    assert bytes_model.flops("fwd+bwd", 10) == 10 * (bytes_model.flops("forward-train", 1)
                                                      + bytes_model.flops("backward", 1))


# ------------------------------------------------------------------------------------------ suites

# ------------------------------------------------------------------------------------------ ResNet-50 layers

def test_resnet50_has_53_bn_layers_in_12_shapes():
    assert len(LAYERS) == 53 and len(SHAPES) == 12 == len(RESNET50_CHW)
    assert dict(LAYER_COUNT) == EXPECTED and sum(EXPECTED.values()) == 53
    names = [layer.name for layer in LAYERS]
    assert names[:5] == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.bn3", "layer1.0.downsample.1"]
    assert names[-1] == "layer4.2.bn3" and len(set(names)) == 53
    # The stride sits on conv2 (v1.5): a downsampling block's bn1 still sees the previous size.
    by_name = {layer.name: layer.chw for layer in LAYERS}
    assert by_name["layer2.0.bn1"] == (128, 56, 56) and by_name["layer2.0.bn2"] == (128, 28, 28)
    assert by_name["layer4.0.downsample.1"] == (2048, 7, 7)
    assert [layer.chw for layer in bn_layers(448)][0] == (64, 224, 224)  # sizes follow the input


def test_resnet50_layers_match_the_model_module_for_module():
    """Against perf/resnet50.py's own model (written separately, from the architecture)."""
    model = pytest.importorskip("perf.resnet50")
    shapes = getattr(model, "bn_input_shapes", None)
    if shapes is None:
        pytest.skip("perf.resnet50 has no bn_input_shapes")
    assert [(name, tuple(shape[1:])) for name, shape in shapes(batch=2)] == [(l.name, l.chw) for l in LAYERS]


# ------------------------------------------------------------------------------------------ suites

def test_suites_cover_the_issue_sweeps():
    full = suite_cases("full")
    resnet = {c.shape for c in full if c.sweep == "resnet50"}
    assert resnet == {(b, *chw) for b in (64, 256) for chw in RESNET50_CHW}
    default = [c for c in suite_cases("default") if c.sweep == "resnet50"]
    assert {c.shape for c in default} == resnet, "the default suite covers every shape at batch 64 and 256"
    assert all(c.layers == LAYER_COUNT[c.shape[1:]] for c in default)
    assert {c.sweep for c in suite_cases("default")} == {"resnet50", "size", "channels", "bn1d", "masked"}
    assert all(c.layers == 0 for c in full if c.sweep != "resnet50"), "only ResNet-50 shapes carry a weight"
    tiny = [c for c in suite_cases("tiny") if c.sweep == "resnet50"]
    assert tiny and all(c.layers == LAYER_COUNT[TINY_RESNET50[c.shape]] for c in tiny)
    for dtype in ("float32", "float16", "bfloat16"):
        sizes = [c.numel * bytes_model.ELEMENT_SIZE[c.dtype] for c in full if c.sweep == "size" and c.dtype == dtype]
        assert min(sizes) <= 1 << 20 and max(sizes) >= 2 << 30
        sizes = [c.numel * bytes_model.ELEMENT_SIZE[c.dtype] for c in full if c.sweep == "channels"
                 and c.dtype == dtype]
        assert max(sizes) / min(sizes) < 1.1, "channel sweep must hold the total size fixed"
    assert {c.C for c in full if c.sweep == "channels"} >= {3, 4096}
    assert max(c.N for c in full if c.sweep == "bn1d") == 10 ** 6
    for sweep in ("resnet50", "size", "channels"):
        assert {(c.dtype, c.layout) for c in full if c.sweep == sweep} == {
            (d, l) for d in ("float32", "float16", "bfloat16") for l in ("nchw", "channels_last")}
    assert set(SUITES) >= {"tiny", "quick", "default", "full"}
    quick = suite_cases("quick")
    assert len(quick) <= 10, "gpu_check.sh gives the quick suite 2.5 minutes"
    assert all(c.layers > 0 for c in quick if c.sweep == "resnet50")
    assert all(c.numel <= 1 << 14 for c in suite_cases("tiny")), "tiny must stay interpreter-sized"


# ------------------------------------------------------------------------------------------ correctness gate

def test_reference_matches_torch_float64(device):
    case = Case("t", (3, 4, 5, 6), "float32", "channels_last")
    x, dy, w, b, rm, rv = make_inputs(case, device, seed=3)
    assert x.is_contiguous(memory_format=torch.channels_last)
    ref = Reference(x, dy, w, b, rm, rv, MOMENTUM, EPS)
    x64 = x.double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    rm64, rv64 = rm.double(), rv.double()
    y64 = F.batch_norm(x64, rm64, rv64, w64, b64, True, MOMENTUM, EPS)
    y64.backward(dy.double())
    mean = x64.detach().mean((0, 2, 3))
    invstd = (x64.detach().var((0, 2, 3), unbiased=False) + EPS).rsqrt()
    assert ref.check_train(y64.detach().float(), mean, invstd, rm64, rv64) is None
    assert ref.check_backward(x64.grad.float(), w64.grad, b64.grad) is None
    y_eval = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False, MOMENTUM, EPS)
    assert ref.check_eval(y_eval.float()) is None


def test_mismatch_reports_wrong_values_nan_and_dtype():
    expected = torch.linspace(-2, 2, 100, dtype=torch.float64)
    assert mismatch("y", expected.float(), expected) is None
    wrong = expected.float().clone()
    wrong[17] += 0.01
    message = mismatch("y", wrong, expected)
    assert message and "y: max abs error" in message and "flat index 17" in message
    wrong[3] = float("nan")
    assert "non-finite" in mismatch("y", wrong, expected)
    assert "dtype" in mismatch("y", expected.half(), expected, torch.float32)
    assert "shape" in mismatch("y", expected[:5].float(), expected)


class _WrongBackward(TorchEager):
    """A 'fast' implementation whose dx is 1% off: must be reported as an error, never timed."""

    def __init__(self):
        super().__init__(cudnn_enabled=False)
        self.name = "wrong_backward"

    def backward(self, dy, x, weight, saved):
        dx, dw, db = super().backward(dy, x, weight, saved)
        return dx * 1.01, dw, db


class _Crashing(TorchEager):
    def __init__(self):
        super().__init__(cudnn_enabled=False)
        self.name = "crashing"

    def forward_eval(self, *args):
        raise RuntimeError("kernel exploded")


class _Unavailable(TorchEager):
    def __init__(self):
        super().__init__(cudnn_enabled=False)
        self.name = "unavailable"

    def unavailable(self):
        return "not here"


def test_wrong_or_failing_implementations_become_error_rows(device):
    case = Case("t", (4, 3, 6, 5), "float32", "nchw")
    calls = []

    def timer(fn):
        calls.append(fn)
        fn()
        from perf.timing import Timing
        return Timing(1.0, 0.9, 1.1)

    impls = [TorchEager(False), _WrongBackward(), _Crashing(), _Unavailable()]
    rows = measure_case("t", case, impls, bytes_model.OPS, 100.0, torch.device(device), timer, log=lambda s: None)
    by = {(r["impl"], r["op"]): r for r in rows}
    assert by[("copy", "copy")]["status"] == "ok"
    assert all(by[("torch_native", op)]["status"] == "ok" for op in bytes_model.OPS)
    assert by[("wrong_backward", "forward-train")]["status"] == "ok"
    for op in ("backward", "fwd+bwd"):
        row = by[("wrong_backward", op)]
        assert row["status"] == "error" and "dx: max abs error" in row["detail"]
        assert row.get("time_ms") is None and row.get("gbps") is None
    assert by[("crashing", "forward-eval")]["status"] == "error"
    assert "RuntimeError: kernel exploded" in by[("crashing", "forward-eval")]["detail"]
    assert by[("crashing", "backward")]["status"] == "ok"
    assert all(by[("unavailable", op)]["status"] == "skipped" and by[("unavailable", op)]["detail"] == "not here"
               for op in bytes_model.OPS)
    timed = sum(1 for r in rows if r["status"] == "ok")
    assert len(calls) == timed, "only correct results are timed"
    ok = by[("torch_native", "backward")]
    assert ok["gbps"] == pytest.approx(bytes_model.unique_bytes("backward", case.numel, "float32") / 1e-3 / 1e9)
    assert ok["pct_of_ceiling"] == pytest.approx(100 * ok["gbps"] / 100.0)


@pytest.mark.skipif(not ON_CPU, reason="torch.compile is measured on a GPU")
def test_torch_compile_is_skipped_with_a_reason_under_the_interpreter():
    compile_impl = make_impls()[-1]
    assert compile_impl.name == "torch_compile" and "interpreter" in compile_impl.unavailable()
    assert make_impls(["torch_compile"])[0].unavailable() is None  # named explicitly: tried


# ------------------------------------------------------------------------------------------ CSV

def _fake_rows():
    rows = []
    for impl, t in (("triton_bn", 1.0), ("torch", 2.0), ("torch_native", 4.0)):
        rows.append({"suite": "s", "sweep": "resnet50", "op": "backward", "impl": impl, "status": "ok",
                     "shape": "2x3x4x4", "N": 2, "C": 3, "spatial": 16, "numel": 96, "dtype": "float16",
                     "layout": "nchw", "unique_bytes": 576, "time_ms": t, "gbps": 576 / t / 1e6,
                     "config": "BLOCK_K=64, w=4", "detail": ""})
    rows.append(dict(rows[0], impl="torch_compile", status="error", time_ms=None, gbps=None,
                     detail="dx: max abs error, \"quoted\""))
    return rows


def test_csv_round_trip_and_schema(tmp_path):
    rows = _fake_rows()
    add_speedups(rows)
    assert rows[0]["speedup_vs_torch"] == pytest.approx(2.0)
    assert rows[0]["speedup_vs_torch_native"] == pytest.approx(4.0)
    assert rows[0]["speedup_vs_torch_compile"] is None  # the baseline failed: no number
    meta = {"label": env.CPU_LABEL, "mode": env.CPU_INTERPRETER, "device": "cpu", "suite": "s",
            "copy_ceiling_gbps": "10.0"}
    path = write_csv(tmp_path / "s.csv", meta, rows)
    lines = path.read_text().splitlines()
    assert [line.split(":")[0][2:] for line in lines[:len(HEADER_KEYS)]] == list(HEADER_KEYS)
    assert next(csv.reader([lines[len(HEADER_KEYS)]])) == list(COLUMNS)
    meta2, rows2 = read_csv(path)
    assert meta2["label"] == env.CPU_LABEL and meta2["copy_ceiling_gbps"] == "10.0"
    assert len(rows2) == 4 and rows2[0]["time_ms"] == 1.0 and rows2[0]["numel"] == 96
    assert rows2[3]["detail"] == rows[3]["detail"] and rows2[3]["time_ms"] is None
    text = summarize(meta2, rows2)
    assert env.CPU_LABEL in text and "errors: 1 rows" in text
    assert "no speed is scored" in text and "2.00" not in text and "goal:" not in text, "a CPU run scores nothing"
    assert "2.00" in summarize(dict(meta2, mode="gpu", label=""), rows2)


# ------------------------------------------------------------------------------------------ summary

def _goal_row(sweep, shape, speedup, layers=None, op="fwd+bwd"):
    N, C, *spatial = (int(d) for d in shape.split("x"))
    return {"impl": "triton_bn", "status": "ok", "op": op, "sweep": sweep, "shape": shape, "N": N, "C": C,
            "spatial": spatial[0] * spatial[1], "dtype": "float16", "layout": "channels_last", "layers": layers,
            "speedup_vs_torch": speedup, "speedup_vs_torch_native": speedup, "speedup_vs_torch_compile": None,
            "pct_of_ceiling": 50.0}


def test_goals_use_resnet50_shapes_only_weighted_by_layer_count():
    rows = [_goal_row("resnet50", "64x256x14x14", 2.0, layers=11),  # 11 of ResNet-50's layers
            _goal_row("resnet50", "64x64x112x112", 0.5, layers=1),
            _goal_row("channels", "32x3x1024x1024", 100.0)]  # torch's weak spot: must not count
    weighted = 2.0 ** (10 / 12)  # (11 ln 2 + 1 ln 0.5) / 12
    assert geomean([2.0, 0.5], [11, 1]) == pytest.approx(weighted)
    assert geomean([2.0, 0.5]) == pytest.approx(1.0)
    lines = goal_lines(rows)
    assert "2 of 12 shapes, 12 of 53 BN layers" in lines[0]
    every, below = lines[1], lines[2]
    assert "1 of 2 (op, shape) rows meet it" in every and "MET" not in every
    assert "64x64x112x112" in below and "0.50x" in below and "(1 layers)" in below
    fwd_bwd = next(line for line in lines if line.startswith("goal: geomean fwd+bwd"))
    assert f"{weighted:.2f}x -- MET" in fwd_bwd
    text = summarize({"mode": "gpu", "suite": "s"}, rows)
    assert "sweep channels: triton_bn's speedup, plain geomean over shapes (not in the goals)" in text
    assert "100.00" in text.split("sweep channels")[1], "the channel sweep is reported, apart"


def test_goals_are_not_evaluated_without_resnet50_rows():
    assert "not evaluated" in goal_lines([_goal_row("channels", "32x3x64x64", 2.0)])[0]


def test_read_csv_rejects_other_csv(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_csv(path)


# ------------------------------------------------------------------------------------------ end to end

def _png_text(path):
    from PIL import Image
    with Image.open(path) as image:
        return dict(image.text)


def test_python_m_perf_writes_labelled_csv_summary_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    status = main(["--suite", "tiny", "--out", str(out), "--dtypes", "bfloat16", "--layouts", "channels_last",
                   "--impls", "triton_bn,torch,torch_native", "--rep-ms", "5", "--warmup-ms", "2"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"[  1/{len(TINY_RESNET50)}]" in printed and "triton_bn" in printed  # per-shape progress
    stem = f"tiny-{env.slug(env.device_name())}"
    if ON_CPU:
        assert stem == "tiny-cpu-interpreter"
        assert env.CPU_LABEL in printed
    meta, rows = read_csv(out / f"{stem}.csv")
    assert meta["suite"] == "tiny" and meta["torch"] == torch.__version__
    assert (meta["label"] == env.CPU_LABEL) == ON_CPU
    assert {(r["impl"], r["op"]) for r in rows} == {("copy", "copy")} | {
        (i, op) for i in ("triton_bn", "torch", "torch_native") for op in bytes_model.OPS}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["gbps"] > 0 for r in rows)
    ours = [r for r in rows if r["impl"] == "triton_bn"]
    assert all("BLOCK_K=" in r["config"] for r in ours), "autotuned config recorded"
    assert all(r["speedup_vs_torch"] > 0 for r in ours)
    summary = (out / f"{stem}-summary.txt").read_text()
    assert ("pipeline check" in summary) == ON_CPU
    assert ("sweep resnet50: triton_bn's speedup" in summary) != ON_CPU
    assert ("goals on ResNet-50 shapes only" in summary) != ON_CPU
    assert ("no speed is scored" in summary) == ON_CPU
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{stem}-{kind}-bfloat16.png"
                          for kind in ("bandwidth-resnet50", "speedup-resnet50", "roofline"))
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        text = _png_text(out / name)
        assert ("bfloat16" in text["Title"]) and (env.CPU_LABEL in text["Title"]) == ON_CPU
        assert (text["Description"] == env.CPU_LABEL) == ON_CPU
        if ON_CPU and "bandwidth" in name:
            assert "not bandwidth" in text["Title"] and "Effective bandwidth" not in text["Title"]
        if ON_CPU and "speedup" in name:
            assert "NOT speed-ups" in text["Title"]

    # CSV -> plots again, elsewhere, without measuring: the same figures.
    again = tmp_path / "again"
    assert main(["plot", str(out / f"{stem}.csv"), "--out", str(again)]) == 0
    assert sorted(p.name for p in again.glob("*.png")) == pngs
    assert main(["summary", str(out / f"{stem}.csv")]) == 0
    assert ("sweep resnet50: triton_bn's speedup" in capsys.readouterr().out) != ON_CPU


def test_gpu_csv_draws_bandwidth_and_speedups(tmp_path):
    """The GPU drawing path, from a synthetic GPU CSV (no GPU here): GB/s and speedups, no label."""
    pytest.importorskip("matplotlib")
    from perf.harness import Outcome, make_row
    from perf.plot import plot_csv
    from perf.timing import Timing
    rows = []
    for i, case in enumerate(suite_cases("quick", ["float16"])):
        for k, impl in enumerate(("copy", "triton_bn", "torch", "torch_native")):
            for op in (("copy",) if impl == "copy" else bytes_model.OPS):
                t = bytes_model.unique_bytes(op, case.numel, case.dtype) / (2e9 + 3e8 * k + 1e8 * i)
                rows.append(make_row("quick", case, op, impl, Outcome("ok", timing=Timing(t, t, t)), 4300.0))
    add_speedups(rows)
    meta = {"mode": "gpu", "device": "synthetic", "suite": "quick", "copy_ceiling_gbps": "4300",
            "peak_fp32_gflops": "66900"}
    pngs = plot_csv(write_csv(tmp_path / "quick-synthetic.csv", meta, rows), tmp_path)
    names = sorted(p.name for p in pngs)
    assert names == sorted(f"quick-synthetic-{kind}-float16.png" for kind in (
        "bandwidth-resnet50", "bandwidth-channels", "bandwidth-bn1d", "bandwidth-masked", "speedup-resnet50",
        "speedup-masked", "roofline"))
    for path in pngs:
        title = _png_text(path)["Title"]
        assert env.CPU_LABEL not in title and "synthetic" in title
        assert ("Effective bandwidth" in title) == ("bandwidth" in path.name)


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_lists_the_run_options_and_the_commands(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    for option in ("--suite", "--out", "--impls", "--ops", "--dtypes", "--layouts", "--rep-ms", "--list"):
        assert option in printed
    for command in ("python -m perf plot", "python -m perf summary", "python -m perf host"):
        assert command in printed


def test_cpu_run_of_a_gpu_suite_falls_back_to_tiny(capsys):
    if not ON_CPU:
        pytest.skip("GPU: the named suite runs")
    assert main(["--suite", "full", "--list"]) == 0
    printed = capsys.readouterr().out
    assert "instead of 'full'" in printed
    assert printed.count("\n") == len(suite_cases("tiny")) + 1


def test_gpu_check_script_is_valid_bash():
    script = ROOT / "perf" / "gpu_check.sh"
    assert script.exists()
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_gpu_naming_and_ceilings(monkeypatch):
    monkeypatch.setattr(env, "mode", lambda: env.GPU)
    assert env.slug("NVIDIA H200") == "h200"
    assert env.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert env.peak_fp32_gflops("NVIDIA H200")[0] == pytest.approx(66900.0)
    assert env.peak_fp32_gflops("NVIDIA GH200 480GB")[0] == pytest.approx(66900.0)
    monkeypatch.setattr(env, "mode", lambda: env.CPU_INTERPRETER)
    assert env.slug("anything") == "cpu-interpreter"
    assert env.peak_fp32_gflops("NVIDIA H200")[0] is None
