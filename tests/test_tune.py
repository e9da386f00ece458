"""The tuning workflow (triton_bn.tune, docs/tuning.md): tune, keep the file, load it, look at it.

On the CPU every kernel runs through Triton's interpreter, whose benchmarker returns 0 ms:
nothing here checks a timing, only what is benchmarked, recorded, applied, refused and drawn.
``TRITON_BN_INTERPRET_GPU_PRUNING=1`` keeps several candidates per key (as on a GPU) where a
test needs the benchmarker to be called at all.
"""
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_bn.kernels.tuning import autotuned_kernels
from triton_bn.tune import TuningWarning, use_tuning
from triton_bn.tune import machine, store
from triton_bn.tune.__main__ import main
from triton_bn.tune.bench import tune
from triton_bn.tune.progress import Progress
from triton_bn.tune.shapes import Shape, ShapeSourceError, collect_shapes, parse_shapes, shapes_from_model
from triton_bn.tune.table import shape_table

from tests.tune_fixtures import keep_autotune_caches, tuned  # noqa: F401  (pytest fixtures)
from tests.tune_fixtures import (
    KERNELS,
    REPO,
    SHAPES,
    _entry,
    _file,
    _subprocess_env,
    _tile,
    _write,
)


# ---------------------------------------------------------------------------------------------
# perf/resnet50.py: the model --model resnet50 tunes (and other tools reuse)

def test_resnet50_is_torchvisions_architecture():
    from perf.resnet50 import bn_input_shapes, resnet50

    torch.manual_seed(0)
    model = resnet50()
    bns = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 53
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision.models.resnet50()
    assert len(model.state_dict()) == 320
    # one ReLU module per block, applied three times, as torchvision does
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 1 + 16
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5

    seen = []
    with torch.device("meta"):
        meta = resnet50()
    for name, m in meta.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, tuple(args[0].shape))))
    assert meta(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)
    assert seen == bn_input_shapes(2, 224), "the computed shapes must be the forward's, in order"
    assert [name for name, _ in seen] == bns
    assert {dims[1:] for _, dims in seen} == {
        (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
        (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7)}


# ---------------------------------------------------------------------------------------------
# the command line, end to end

def test_cli_tunes_resnet50_with_progress_and_tables(tmp_path):
    out = tmp_path / "t.json"
    # 32x32 images keep ResNet-50's 12 shapes and channel counts but interpret quickly
    run = subprocess.run([sys.executable, "-m", "triton_bn.tune", "--model", "resnet50", "--batch", "2",
                          "--image-size", "32", "--channels-last", "--out", str(out)],
                         cwd=REPO, env=_subprocess_env(), capture_output=True, timeout=600)
    stdout, stderr = run.stdout.decode(), run.stderr.decode()  # bytes: text mode would turn \r into \n
    assert run.returncode == 0, stderr[-3000:]
    assert "\r[36/36] 2x2048x1x1 fp32 NHWC backward" in stderr  # the one-line progress
    tables = stdout.split("\n\n")
    assert len([t for t in tables if "  kernel " in t]) == 12
    assert stdout.count("CPU interpreter \N{EM DASH} not a measurement") >= 12
    assert re.search(r"^  stats partial +\* \d+x\d+ w\d+ ", stdout, re.M), stdout[:2000]

    data = store.load(out)
    assert (data["version"], data["measured"], data["interpreter"]) == (1, False, True)
    assert data["machine"]["device"] == machine.INTERPRETER_DEVICE
    assert "not a measurement" in data["note"] and data["copy_gbps"] is None
    assert len(data["shapes"]) == 12
    assert sorted(layer for s in data["shapes"] for layer in s["layers"]) == \
        sorted(name for name, _ in __import__("perf.resnet50").resnet50.bn_input_shapes(2, 32))
    for record in data["shapes"]:
        assert record["channels_last"] and record["layout"] == "NHWC"
        kernels = {data["entries"][i]["kernel"] for i in record["entries"]}
        assert kernels == set(KERNELS), record
    for entry in data["entries"]:
        assert entry["winner"] in [c["config"] for c in entry["candidates"]]


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "2,x,3"], "--shapes: '2,x,3' is not N,C[,spatial...] of positive integers"),
    (["--shapes", "2,8", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["--shapes", "2,8", "--ops", "forward,sideways"], "unknown op 'sideways'"),
    (["--from-model", "no_such_module_xyz:build"], "--from-model 'no_such_module_xyz:build': cannot import"),
    (["--from-model", "builder"], "expected module:function"),
    (["--plot", "missing.json"], "tuning file missing.json: no such file"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "t.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------------------------------------
# the file: what tune() records

def test_tune_records_every_candidate_and_the_winner(tuned):
    data, _ = tuned
    assert [s["shape"] for s in data["shapes"]] == [list(s.dims) for s in SHAPES]
    benchmarked = [e for e in data["entries"] if len(e["candidates"]) > 1]
    assert benchmarked, "GPU pruning keeps several candidates per key"
    for entry in data["entries"]:
        assert entry["kernel"] in KERNELS and entry["key_names"] == autotuned_kernels()[entry["kernel"]].keys
        configs = [c["config"] for c in entry["candidates"]]
        assert entry["winner"] == configs[0], "equal (0 ms) times: the autotuner keeps the first"
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    for entry in benchmarked:
        assert all(c["ms"] == 0.0 and c["wall_ms"] > 0 for c in entry["candidates"])
    # bytes per call: normalize reads x and writes y
    first = data["shapes"][0]
    normalize = next(data["entries"][i] for i in first["entries"] if data["entries"][i]["kernel"] == KERNELS[1])
    assert normalize["bytes"] == 2 * 2 * 8 * 10 * 10 * 4
    assert normalize["key"][:4] == [2, 8, 100, False]
    fp16 = data["shapes"][2]
    assert {tuple(data["entries"][i]["key"][:4]) for i in fp16["entries"]} == {(2, 9, 16, True)}
    assert "torch.float16" in data["entries"][fp16["entries"][0]]["key"]


def test_one_value_per_channel_tunes_eval_only():
    # torch refuses training on (N=1, C) / 1x1 inputs; the tool does not launch it either
    data = tune([Shape((1, 4)), Shape((1, 3, 1, 1))], ops=("forward", "eval", "backward"))
    assert {e["kernel"] for e in data["entries"]} == {KERNELS[1]}
    assert [len(s["entries"]) for s in data["shapes"]] == [1, 1]


def test_tuning_leaves_the_callers_caches_and_adds_the_winners(tuned):
    data, path = tuned
    use_tuning(path)
    for entry in data["entries"]:
        kernel = autotuned_kernels()[entry["kernel"]]
        chosen = kernel.cache[tuple(entry["key"])]
        assert chosen in kernel.configs and store.config_to_json(chosen) == entry["winner"]


@pytest.mark.parametrize("key", [(2, 64, 3136, False, "torch.float32"), (1, 1, 1, True, "torch.bfloat16", 2.5, None)])
def test_keys_round_trip_through_json(key):
    assert store.key_from_json(json.loads(json.dumps(store.key_to_json(key)))) == key


def test_a_key_json_cannot_carry_is_kept_but_never_applied(tmp_path):
    entry = _entry(KERNELS[1], [2, 8, 100, False], _tile(0))
    entry["key"] = store.key_to_json((2, 8, 100, False, object()))
    path = _write(tmp_path, _file([entry]))
    with pytest.warns(TuningWarning, match=re.escape(f"tuning file {path}: skipped 1 of 1 entries: "
                                                     f"{KERNELS[1]} (its key holds a value JSON cannot carry)")):
        assert use_tuning(path).applied == 0


# ---------------------------------------------------------------------------------------------
# shapes: --shapes and --from-model

def test_parse_shapes_merges_duplicates_and_knows_layouts():
    shapes = parse_shapes("2,8,4,4; 2x8x4x4; 5,3,7; 6,4", torch.float16, channels_last=True)
    assert [(s.dims, s.layout, s.dtype, s.param_dtype) for s in shapes] == [
        ((2, 8, 4, 4), "NHWC", torch.float16, torch.float32), ((5, 3, 7), "NLC", torch.float16, torch.float32),
        ((6, 4), "NC", torch.float16, torch.float32)]


def _write_model_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return f"{name}:build"


@pytest.mark.parametrize("channels_last", [False, True])
def test_from_model_records_every_batch_norm_on_the_meta_device(tmp_path, monkeypatch, channels_last):
    spec = _write_model_module(tmp_path, "tune_test_model_meta", """
        import torch, triton_bn
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.bn = nn.BatchNorm2d(8, affine=False)  # no weight, no bias: another autotune key
                self.keras = triton_bn.BatchNorm(8, axis=-1)  # sees (N, H, W, C) -> kernels' (N, C, H, W)
                self.fc = nn.Linear(8, 4)
                self.bn1d = nn.BatchNorm1d(4).half()

            def forward(self, x):
                x = self.bn(self.conv(x))
                x = self.keras(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)
                return self.bn1d(self.fc(x.mean((2, 3))).half())

        def build():
            return Net()
    """)
    monkeypatch.chdir(tmp_path)
    shapes, where = shapes_from_model(spec, (2, 3, 6, 5), channels_last=channels_last)
    assert where == "meta"
    assert [(s.dims, s.layout, s.dtype, s.param_dtype, s.layers, s.has_weight, s.has_bias) for s in shapes] == [
        ((2, 8, 6, 5), "NHWC" if channels_last else "NCHW", torch.float32, torch.float32, ("bn",), False, False),
        ((2, 8, 6, 5), "NHWC", torch.float32, torch.float32, ("keras",), True, True),  # axis=-1: no copy
        ((2, 4), "NC", torch.float16, torch.float16, ("bn1d",), True, True)]
    assert shapes[0].label() == f"2x8x6x5 fp32 {'NHWC' if channels_last else 'NCHW'} no weight/bias"


def test_from_model_falls_back_to_a_real_forward_without_moving_running_stats(tmp_path, monkeypatch):
    spec = _write_model_module(tmp_path, "tune_test_model_cpu", """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn = nn.BatchNorm1d(4)

            def forward(self, x):
                if x.abs().sum().item() < 0:  # .item() has no meta implementation
                    x = -x
                return self.bn(x)

        def build():
            return Net()
    """)
    monkeypatch.chdir(tmp_path)
    shapes, where = shapes_from_model(spec, (5, 4, 3))
    assert where == "cpu" and [s.dims for s in shapes] == [(5, 4, 3)]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).train()
    collect_shapes(model, torch.randn(2, 3, 4, 4) * 5 + 3)
    bn = model[0]
    assert model.training and bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_from_model_without_batch_norm_is_an_error():
    with pytest.raises(ShapeSourceError, match="Linear has no BatchNorm layer"):
        collect_shapes(torch.nn.Linear(3, 3), torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------
# reading the results: tables, progress, pictures

def _measured(data, copy_gbps=1000.0):
    """The tuned file with made-up GPU times: exercises the measured paths, is not a measurement."""
    data = json.loads(json.dumps(data))
    data.update(measured=True, interpreter=False, copy_gbps=copy_gbps)
    data["machine"].update(device="Made-up GPU", interpreter=False)
    for entry in data["entries"]:
        for rank, candidate in enumerate(entry["candidates"]):
            candidate["ms"] = 0.010 * (1 + rank / 4)
    return data


def test_table_marks_the_winner_and_computes_gbps_and_percent_of_copy(tuned):
    data = _measured(tuned[0])
    table = shape_table(data, data["shapes"][0])
    bytes_ = 2 * 2 * 8 * 10 * 10 * 4
    gbps = bytes_ / 0.010 / 1e6
    winner = store.config_label(next(e for e in data["entries"] if e["kernel"] == KERNELS[1])["winner"])
    assert re.search(rf"^  normalize +\* {winner} +0\.0100 +{gbps:.0f} +{100 * gbps / 1000:.1f}$", table, re.M), table
    assert "not a measurement" not in table
    interpreted = shape_table(tuned[0], tuned[0]["shapes"][0])
    assert "CPU interpreter \N{EM DASH} not a measurement" in interpreted and "wall ms" in interpreted


def test_progress_is_one_rewritten_line():
    import io
    stream = io.StringIO()
    progress = Progress(2, stream=stream)
    progress.step("a long first step")
    progress.detail("candidate 1/3")
    progress.step("b")
    progress.done()
    first = "[1/2] a long first step"
    longest = len(first + ": candidate 1/3")
    assert stream.getvalue() == (f"\r{first}\r{first}: candidate 1/3\r{'[2/2] b'.ljust(longest)}"
                                 f"\r{'[2/2] done'.ljust(longest)}\n")


def _captured_figures(monkeypatch):
    from triton_bn.tune import plots
    figures = []
    real_save = plots._save

    def save(fig, plt, path):
        figures.append([t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes])
        return real_save(fig, plt, path)
    monkeypatch.setattr(plots, "_save", save)
    return figures


def test_plot_and_compare_interpreter_files_are_labelled(tuned, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    figures = _captured_figures(monkeypatch)
    _, path = tuned
    assert main(["--plot", str(path), "--plot-dir", str(tmp_path)]) == 0
    assert (tmp_path / "t-heatmap.png").stat().st_size > 10_000
    assert not (tmp_path / "t-copy.png").exists(), "no copy ceiling under the interpreter"
    assert "not a measurement" in capsys.readouterr().out
    other = store.write(json.loads(path.read_text()), tmp_path / "u.json")
    assert main(["--compare", str(path), str(other), "--plot-dir", str(tmp_path)]) == 0
    assert (tmp_path / "compare-t-vs-u.png").stat().st_size > 10_000
    assert len(figures) == 2
    for texts in figures:
        assert any("not a measurement" in t for t in texts), texts


def test_the_committed_example_is_labelled_as_not_a_measurement():
    example = REPO / "plots" / "tuning-example-interpreter.json"
    data = store.load(example)
    assert (data["measured"], data["interpreter"], data["copy_gbps"]) == (False, True, None)
    assert data["machine"]["device"] == machine.INTERPRETER_DEVICE and "not a measurement" in data["note"]
    assert all(c["ms"] in (0.0, None) for e in data["entries"] for c in e["candidates"])
    for png in ("tuning-example-interpreter-heatmap.png",
                "compare-tuning-example-interpreter-vs-tuning-example-interpreter-rerun.png"):
        assert (REPO / "plots" / png).stat().st_size > 10_000


def test_copy_bars_and_compare_of_measured_files(tuned, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from triton_bn.tune import plots
    figures = _captured_figures(monkeypatch)
    a = _measured(tuned[0])
    b = _measured(tuned[0])
    for entry in b["entries"]:
        for candidate in entry["candidates"]:
            candidate["ms"] /= 2
    assert plots.copy_bars(a, tmp_path / "copy.png").stat().st_size > 10_000
    rows = plots.comparison(a, b)
    assert all(r["speedup"] == pytest.approx(2.0) for r in rows), rows
    assert len(rows) == len(SHAPES) * (len(KERNELS) + 1)
    plots.compare_plot(a, b, ("a", "b"), tmp_path / "cmp.png")
    assert not any("not a measurement" in t for texts in figures for t in texts)
    with pytest.raises(ValueError, match="cannot compare a measured file with one made by the CPU interpreter"):
        plots.comparison(a, tuned[0])
