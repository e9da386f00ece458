"""The perf harness's masked cases (issue 20): suites, masks, bytes, the float64 masked reference
and the torch composition baseline, wrong masked results as error rows, and the tiny masked
sweep through the whole pipeline (on the interpreter without CUDA)."""
import pytest
import torch

import perf  # noqa: F401  (chooses the interpreter without CUDA, as conftest does)
from perf import bytes_model, env, masked
from perf.__main__ import main
from perf.check import Reference
from perf.harness import Outcome, make_inputs, make_row, measure_case
from perf.impls import EPS, MOMENTUM, make_impls
from perf.results import add_speedups, read_csv, write_csv
from perf.suites import Case, suite_cases
from perf.summary import masked_lines, summarize
from perf.timing import Timing

ON_CPU = env.mode() == env.CPU_INTERPRETER
TRAIN_OPS = ("forward-train", "backward", "fwd+bwd")


def _silent_timer(fn):
    fn()
    return Timing(1.0, 0.9, 1.1)


# ------------------------------------------------------------------------------------------ suites, masks, bytes

def test_masked_sweep_in_every_suite():
    for suite in ("tiny", "quick", "default", "full"):
        cases = [c for c in suite_cases(suite) if c.sweep == "masked"]
        assert cases and all(c.valid is not None and len(c.shape) == 3 and c.layers == 0 for c in cases), suite
        assert all(c.valid is None for c in suite_cases(suite) if c.sweep != "masked")
    default = [c for c in suite_cases("default") if c.sweep == "masked"]
    assert (32, 512, 1500) in {c.shape for c in default}
    assert {c.valid for c in default} >= {0.2, 1.0}
    assert {(c.dtype, c.layout) for c in default} == {
        (d, l) for d in ("float16", "bfloat16") for l in ("nchw", "channels_last")}
    assert len(suite_cases("quick")) <= 10, "gpu_check.sh gives the quick suite 2.5 minutes"
    assert suite_cases("quick")[-1].sweep == "masked", "last: a quick run cut short loses only it"
    assert str(Case("masked", (2, 3, 4), "float16", "nchw", valid=0.5)) == "masked 2x3x4 float16 nchw valid 50%"
    assert [c.sweep for c in suite_cases("default", sweeps=["masked"])] == ["masked"] * len(default)
    with pytest.raises(KeyError, match="no sweep"):
        suite_cases("tiny", sweeps=["nope"])


@pytest.mark.parametrize("valid", [0.2, 0.35, 0.5, 0.9, 1.0])
def test_mask_is_right_padded_with_the_mean_valid_fraction(valid):
    case = Case("masked", (32, 8, 1500), "float16", "nchw", valid=valid)
    mask = masked.make_mask(case, "cpu")
    assert mask.shape == (32, 1500) and mask.dtype == torch.bool
    lengths = mask.sum(1)
    assert abs(lengths.double().mean().item() - valid * 1500) <= 1.0
    assert bool((lengths >= 1).all()) and bool((mask == (torch.arange(1500) < lengths[:, None])).all())
    assert (len(set(lengths.tolist())) == 1) == (valid == 1.0), "unequal lengths below 100%"
    assert torch.equal(mask, masked.make_mask(case, "cpu")), "seeded"


def test_masked_bytes_add_the_mask_once_per_pass_that_reads_it():
    T, S = 32 * 512 * 1500, 32 * 1500
    for op, passes in (("forward-train", 1), ("forward-eval", 0), ("backward", 1), ("fwd+bwd", 2), ("copy", 0)):
        plain = bytes_model.unique_bytes(op, T, "float16")
        assert bytes_model.unique_bytes(op, T, "float16", S) == plain + passes * S
        assert bytes_model.moved_bytes(op, T, "float16", S) == bytes_model.moved_bytes(op, T, "float16") + passes * S
    case = Case("masked", (32, 512, 1500), "float16", "channels_last", valid=0.2)
    row = make_row("s", case, "fwd+bwd", "triton_bn", Outcome("ok", timing=Timing(1.0, 1.0, 1.0)), 100.0)
    assert row["valid"] == 0.2 and row["unique_bytes"] == 5 * T * 2 + 2 * S
    assert row["gbps"] == pytest.approx(row["unique_bytes"] / 1e-3 / 1e9)


# ------------------------------------------------------------------------------------------ correctness gate

def _masked_inputs(layout="channels_last", valid=0.5, dtype="float32", shape=(5, 3, 12)):
    case = Case("masked", shape, dtype, layout, valid=valid)
    return case, make_inputs(case, "cpu", seed=2), masked.make_mask(case, "cpu")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_masked_reference_matches_autograd_of_the_float64_composition(layout):
    """The reference's closed-form dx against autograd through the composition (both float64),
    and its statistics against counted positions picked out by hand."""
    _, inputs, mask = _masked_inputs(layout)
    x, dy, w, b, rm, rv = (t.double() for t in inputs)  # float64 throughout: checked to 1e-9
    ref = Reference(x, dy, w, b, rm, rv, MOMENTUM, EPS, mask=mask)
    x64, w64, b64 = (t.clone().requires_grad_() for t in (x, w, b))
    rm64, rv64 = rm.clone(), rv.clone()
    y, mean, invstd = masked.masked_batch_norm_train(x64, mask, w64, b64, rm64, rv64)
    dx, dw, db = torch.autograd.grad(y, (x64, w64, b64), dy)
    picked = x.movedim(1, -1)[mask]  # (M, C): the counted positions
    assert ref.count == picked.shape[0] < x.numel() // x.shape[1]
    assert torch.allclose(ref.stats()[0], picked.mean(0))
    assert torch.allclose(ref.stats()[1], picked.var(0, correction=0))
    assert ref.check_train(y, mean.flatten(), invstd.flatten(), rm64, rv64) is None
    assert ref.check_backward(dx, dw, db) is None
    plain = Reference(x, dy, w, b, rm, rv, MOMENTUM, EPS)
    assert plain.check_train(y, mean.flatten(), invstd.flatten(), rm64, rv64) is not None, "the mask matters"


class _IgnoresMask(masked.TorchComposition):
    """Statistics over every position, as if the mask were all True."""
    name = "ignores_mask"

    def bound(self, mask):
        return super().bound(torch.ones_like(mask))


class _DxEverywhere(masked.TorchComposition):
    """The right statistics, but dx's correction applied at padded positions too (m left out)."""
    name = "dx_everywhere"

    def backward(self, dy, x, weight, saved):
        mean, invstd, *_ = saved
        dx, dw, db = super().backward(dy, x, weight, saved)
        M = self.mask.sum()
        shape = (1, -1, 1)
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        correction = (db.view(shape) + xhat * dw.view(shape)) / M
        padded = ~self.mask.unsqueeze(1)
        return dx - torch.where(padded, (weight * invstd).view(shape) * correction, 0).to(dx.dtype), dw, db


def test_wrong_masked_results_become_error_rows():
    case, _, mask = _masked_inputs()
    impls = make_impls(["triton_bn", "torch", "torch_native"]) + [_IgnoresMask(), _DxEverywhere()]
    rows = measure_case("t", case, impls, bytes_model.OPS, 100.0, torch.device("cpu"), _silent_timer,
                        log=lambda s: None)
    by = {(r["impl"], r["op"]): r for r in rows}
    for impl in ("triton_bn", "torch"):
        assert all(by[(impl, op)]["status"] == "ok" for op in TRAIN_OPS), [by[(impl, op)] for op in TRAIN_OPS]
        assert by[(impl, "forward-eval")]["status"] == "skipped"
        assert by[(impl, "forward-eval")]["detail"] == masked.EVAL_SKIPPED
    assert all(by[("torch_native", op)]["status"] == "skipped" and "no masked batch norm kernel"
               in by[("torch_native", op)]["detail"] for op in bytes_model.OPS)
    for op in TRAIN_OPS:
        wrong = by[("ignores_mask", op)]
        assert wrong["status"] == "error" and "save_mean" in wrong["detail"] and wrong.get("time_ms") is None
    assert by[("dx_everywhere", "forward-train")]["status"] == "ok"
    for op in ("backward", "fwd+bwd"):
        assert by[("dx_everywhere", op)]["status"] == "error" and "dx:" in by[("dx_everywhere", op)]["detail"]


def test_the_composition_in_half_precision_passes_the_gate():
    case, inputs, mask = _masked_inputs("nchw", 0.35, "bfloat16", (4, 6, 40))
    rows = measure_case("t", case, make_impls(["torch"]), TRAIN_OPS, 1.0, torch.device("cpu"), _silent_timer,
                        log=lambda s: None)
    assert all(r["status"] == "ok" for r in rows), [r["detail"] for r in rows]


# ------------------------------------------------------------------------------------------ summary, pipeline

def _synthetic_masked_rows():
    rows = []
    for case in suite_cases("default", dtypes=["float16"], layouts=["channels_last"], sweeps=["masked"]):
        for impl, t in (("triton_bn", 1.0), ("torch", 4.0 * case.valid + 1), ("torch_compile", 2.0)):
            for op in TRAIN_OPS:
                rows.append(make_row("default", case, op, impl, Outcome("ok", timing=Timing(t, t, t)), 3000.0))
    add_speedups(rows)
    return rows


def test_gpu_summary_shows_the_ratio_to_the_composition_per_valid_fraction():
    rows = _synthetic_masked_rows()
    lines = masked_lines(rows)
    assert "speedup over the torch composition" in lines[0]
    assert [f"{v:.0%} valid" in lines[1] for v in (0.2, 0.5, 0.8, 1.0)] == [True] * 4
    fwd = next(line for line in lines if line.startswith("forward-train"))
    assert fwd.split()[3:] == ["1.80", "/", "2.00", "3.00", "/", "2.00", "4.20", "/", "2.00", "5.00", "/", "2.00"]
    text = summarize({"mode": "gpu", "suite": "default"}, rows)
    assert "sweep masked: triton_bn's speedup" in text and "the torch composition" in text
    assert "speedup over the torch composition" not in summarize({"mode": "cpu-interpreter"}, rows)


def test_gpu_csv_of_the_masked_sweep_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from perf.plot import plot_csv
    meta = {"mode": "gpu", "device": "synthetic", "suite": "default", "copy_ceiling_gbps": "3000"}
    pngs = plot_csv(write_csv(tmp_path / "m.csv", meta, _synthetic_masked_rows()), tmp_path)
    assert sorted(p.name for p in pngs) == [f"m-{kind}-float16.png" for kind in (
        "bandwidth-masked", "roofline", "speedup-masked")]


def test_python_m_perf_runs_the_tiny_masked_sweep(tmp_path, capsys):
    out = tmp_path / "plots"
    status = main(["--suite", "tiny", "--sweeps", "masked", "--out", str(out), "--rep-ms", "5", "--warmup-ms", "2",
                   "--impls", "triton_bn,torch,torch_native"] + (["--no-plots"] if not _has_matplotlib() else []))
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "valid 50%" in printed
    stem = f"tiny-{env.slug(env.device_name())}"
    _, rows = read_csv(out / f"{stem}.csv")
    cases = suite_cases("tiny", sweeps=["masked"])
    assert {(r["shape"], r["layout"], r["valid"]) for r in rows} == {(c.shape_str, c.layout, c.valid) for c in cases}
    for r in rows:
        expected = {"copy": "ok", "torch_native": "skipped"}.get(r["impl"], "ok" if r["op"] in TRAIN_OPS else "skipped")
        assert r["status"] == expected, r
        assert r["unique_bytes"] == bytes_model.unique_bytes(r["op"], r["numel"], r["dtype"], r["N"] * r["spatial"])
    assert all(r["speedup_vs_torch"] for r in rows if r["impl"] == "triton_bn" and r["status"] == "ok")
    summary = (out / f"{stem}-summary.txt").read_text()
    assert f"{len(cases) * len(TRAIN_OPS)} (op, shape, dtype, layout) cases" in summary
    if _has_matplotlib():
        assert (out / f"{stem}-bandwidth-masked-float32.png").exists()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False
