"""The tuning workflow (triton_bn.tune, docs/tuning.md): tune, keep the file, load it, look at it.

On the CPU every kernel runs through Triton's interpreter, whose benchmarker returns 0 ms:
nothing here checks a timing, only what is benchmarked, recorded, applied, refused and drawn.
``TRITON_BN_INTERPRET_GPU_PRUNING=1`` keeps several candidates per key (as on a GPU) where a
test needs the benchmarker to be called at all.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from triton_bn.kernels.tuning import autotuned_kernels
from triton_bn.tune import TuningFileError, TuningWarning, use_tuning
from triton_bn.tune import machine, store
from triton_bn.tune.__main__ import main
from triton_bn.tune.bench import tune
from triton_bn.tune.progress import Progress
from triton_bn.tune.shapes import Shape, ShapeSourceError, collect_shapes, parse_shapes, shapes_from_model
from triton_bn.tune.table import shape_table

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("_bn_stats_partial_kernel", "_bn_normalize_kernel", "_bn_backward_partial_kernel", "_bn_backward_dx_kernel")
# Tiny, varied: channels-first 4-D, channels-last 3-D, fp16 channels-last 4-D.
SHAPES = [Shape((2, 8, 10, 10)), Shape((3, 16, 5), channels_last=True),
          Shape((2, 16, 3, 3), torch.float16, channels_last=True)]


@pytest.fixture(autouse=True)
def keep_autotune_caches():
    """Tests apply files and tune: give every other test the caches it had."""
    saved = {name: dict(kernel.cache) for name, kernel in autotuned_kernels().items()}
    yield
    for name, kernel in autotuned_kernels().items():
        kernel.cache.clear()
        kernel.cache.update(saved[name])


def _subprocess_env(**extra):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    for name in ("TRITON_BN_TUNING", "TRITON_BN_TUNING_STRICT", "TRITON_BN_INTERPRET_GPU_PRUNING",
                 "TRITON_BN_PIN_CONFIG"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """SHAPES tuned with several candidates per key (GPU pruning), written to a file."""
    saved = {name: dict(kernel.cache) for name, kernel in autotuned_kernels().items()}
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TRITON_BN_INTERPRET_GPU_PRUNING", "1")
            env.delenv("TRITON_BN_PIN_CONFIG", raising=False)  # one candidate per key would benchmark nothing
            data = tune(SHAPES, command="test_tune")
    finally:
        for name, kernel in autotuned_kernels().items():
            kernel.cache.clear()
            kernel.cache.update(saved[name])
    path = store.write(data, tmp_path_factory.mktemp("tuned") / "t.json")
    return data, path


def _file(entries, device=None, triton_version=None, interpreter=None, sm_count=None):
    """A minimal tuning file made on this machine unless told otherwise."""
    here = machine.describe()
    here.update({k: v for k, v in (("device", device), ("triton", triton_version), ("sm_count", sm_count))
                 if v is not None})
    if interpreter is not None:
        here["interpreter"] = interpreter
    return {"format": store.FORMAT, "version": store.VERSION, "measured": not here["interpreter"],
            "interpreter": here["interpreter"], "machine": here, "date": machine.utc_now(), "command": "test",
            "copy_gbps": None, "shapes": [], "entries": entries}


def _entry(kernel, key, config):
    return {"kernel": kernel, "key_names": ["N", "Q", "K", "CHANNELS_LAST"], "key": list(key), "bytes": None,
            "winner": config, "candidates": [{"config": config, "ms": None}]}


def _tile(i):
    """The i-th candidate config (the list is the library's to change)."""
    return store.config_to_json(autotuned_kernels()[KERNELS[0]].configs[i])


def _write(tmp_path, data, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


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
# a later process uses the file: no benchmarking

_COUNT_BENCHMARKS = textwrap.dedent("""
    import json, torch, triton_bn
    from triton_bn.kernels.tuning import autotuned_kernels

    calls = []
    for name, kernel in autotuned_kernels().items():
        bench = kernel.do_bench  # the library's benchmarker, as the Autotuner calls it
        def counted(fn, *args, _bench=bench, _name=name, **kwargs):
            calls.append(_name)
            return _bench(fn, *args, **kwargs)
        vars(kernel)["do_bench"] = counted

    torch.manual_seed(0)
    for dims, dtype, channels_last in json.loads(SHAPES):
        dtype = getattr(torch, dtype)
        order = [0, *range(2, len(dims)), 1] if channels_last else list(range(len(dims)))
        x = torch.randn([dims[i] for i in order], dtype=dtype)
        x = x.permute(*sorted(range(len(dims)), key=order.__getitem__)).requires_grad_()
        C = dims[1]
        weight, bias = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        running_mean, running_var = torch.zeros(C), torch.ones(C)
        y = triton_bn.batch_norm(x, running_mean, running_var, weight, bias, training=True)
        (y.float() * torch.randn(y.shape)).sum().backward()
        triton_bn.batch_norm(x.detach(), running_mean, running_var, weight, bias, training=False)
    print(json.dumps(calls))
""")


@pytest.mark.parametrize("with_file", [True, False])
def test_a_second_process_with_the_file_never_benchmarks(tuned, with_file):
    _, path = tuned
    shapes = json.dumps([[list(s.dims), str(s.dtype).replace("torch.", ""), s.channels_last] for s in SHAPES])
    env = _subprocess_env(TRITON_BN_INTERPRET_GPU_PRUNING="1", **({"TRITON_BN_TUNING": str(path)} if with_file else {}))
    run = subprocess.run([sys.executable, "-c", _COUNT_BENCHMARKS.replace("SHAPES", repr(shapes))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    calls = json.loads(run.stdout.strip().splitlines()[-1])
    if with_file:
        assert calls == [], f"benchmarked despite TRITON_BN_TUNING: {calls}"
    else:  # the same launches without the file do call the benchmarker: the count can fail
        assert set(calls) == set(KERNELS), calls


# ---------------------------------------------------------------------------------------------
# bad files: a clear error naming the file, before any kernel runs

TRUNCATED = '{"format": "triton_bn tuning file", "version": 1, "entr'


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("", "empty"),
    (TRUNCATED, "not valid JSON, truncated or corrupted (Unterminated string starting at: line 1 column 51)"),
    ("[1, 2]", "expected a JSON object at the top, found a list"),
    ('{"version": 1}', 'not a triton_bn tuning file (no "format": "triton_bn tuning file")'),
    ({"version": 2}, "format version 2 is newer than this triton_bn reads (1); update triton_bn or tune again"),
    ({"version": "1"}, 'file.version: expected an integer, found "1"'),
    ({"machine": {"device": "x"}}, 'machine: missing "triton"'),
    ({"entries": [{"kernel": "k"}]}, 'entries[0]: missing "key_names"'),
    ({"winner_warps": "8"}, 'entries[0].winner.num_warps: expected an integer, found "8"'),
    ({"shape": [2, 0, 3]}, "shapes[0].shape: expected a list of positive sizes, found [2, 0, 3]"),
    ({"shape_entry": 7}, "shapes[0].entries: 7 is not an index into entries"),
])
def test_bad_files_raise_naming_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "t.json"
    if isinstance(content, dict):  # a valid file with one thing broken
        data = _file([_entry(KERNELS[1], [2, 8, 100, False], _tile(0))])
        data["shapes"] = [{"shape": [2, 8, 10, 10], "dtype": "float32", "channels_last": False, "entries": [0]}]
        if "winner_warps" in content:
            data["entries"][0]["winner"]["num_warps"] = content["winner_warps"]
        elif "shape" in content:
            data["shapes"][0]["shape"] = content["shape"]
        elif "shape_entry" in content:
            data["shapes"][0]["entries"] = [content["shape_entry"]]
        elif "machine" in content:
            data["machine"] = content["machine"]
        else:
            data.update(content)
        content = json.dumps(data)
    if content is not None:
        path.write_text(content)
    with pytest.raises(TuningFileError) as error:
        use_tuning(path)
    assert str(error.value) == f"tuning file {path}: {problem}"
    assert isinstance(error.value, ValueError)


def test_a_bad_file_in_the_environment_fails_the_import(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(TRUNCATED)
    run = subprocess.run([sys.executable, "-c", "import triton_bn"], cwd=REPO,
                         env=_subprocess_env(TRITON_BN_TUNING=str(path)), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"triton_bn.tune.store.TuningFileError: tuning file {path}: not valid JSON" in run.stderr


# ---------------------------------------------------------------------------------------------
# other machines, interpreter files, stale entries

H200 = {"device": "NVIDIA H200", "sm_count": 132, "interpreter": False, "triton": "3.9.0"}


@pytest.mark.parametrize("made, mismatch", [
    ({"device": "NVIDIA A100", "triton_version": "3.8.0", "sm_count": 108},
     "was made on 'NVIDIA A100' with triton 3.8.0; this is 'NVIDIA H200' with triton 3.9.0"),
    ({"device": "NVIDIA H200", "triton_version": "3.8.0", "sm_count": 132},
     "was made on 'NVIDIA H200' with triton 3.8.0; this is 'NVIDIA H200' with triton 3.9.0"),
    ({"device": "NVIDIA H200", "triton_version": "3.9.0", "sm_count": 66},
     "was made on 'NVIDIA H200' (66 SMs) with triton 3.9.0; this is 'NVIDIA H200' (132 SMs) with triton 3.9.0"),
])
@pytest.mark.parametrize("strict", [False, True])
def test_a_file_from_another_gpu_or_triton_warns_or_is_ignored(tmp_path, monkeypatch, made, mismatch, strict):
    monkeypatch.setattr(machine, "describe", lambda: dict(H200))
    key = (2, 8, 100, False, "torch.float32", "torch.float32")
    path = _write(tmp_path, _file([_entry(KERNELS[0], key, _tile(1))], interpreter=False, **made))
    outcome = "ignoring it (strict)" if strict else "using it anyway"
    with pytest.warns(TuningWarning) as warned:
        report = use_tuning(path, strict=strict)
    assert [str(w.message) for w in warned] == [f"tuning file {path} {mismatch}: {outcome}"]
    stats = autotuned_kernels()[KERNELS[0]]
    assert report.applied == (0 if strict else 1)
    assert (key in stats.cache) == (not strict)


def test_the_same_machine_applies_silently(tmp_path, recwarn):
    key = (2, 8, 100, False, "torch.float32", "torch.float32")
    report = use_tuning(_write(tmp_path, _file([_entry(KERNELS[0], key, _tile(1))])))
    assert (report.applied, report.skipped, report.ignored) == (1, [], None)
    assert not [w for w in recwarn if issubclass(w.category, TuningWarning)]
    assert store.config_to_json(autotuned_kernels()[KERNELS[0]].cache[key]) == _tile(1)


@pytest.mark.parametrize("strict", [False, True])
def test_an_interpreter_file_is_never_applied_on_a_gpu(tuned, monkeypatch, strict):
    _, path = tuned
    monkeypatch.setattr(machine, "describe", lambda: dict(H200))
    message = (f"tuning file {path} was made by the Triton CPU interpreter (its times are not measurements): "
               "not applying it on 'NVIDIA H200'")
    before = {name: dict(k.cache) for name, k in autotuned_kernels().items()}
    with pytest.warns(TuningWarning) as warned:
        report = use_tuning(path, strict=strict)
    assert [str(w.message) for w in warned] == [message] and report.ignored == message
    assert {name: dict(k.cache) for name, k in autotuned_kernels().items()} == before


def test_stale_entries_are_named_and_skipped_the_rest_applied(tmp_path):
    key = [2, 8, 100, False, "torch.float32", "torch.float32"]
    good = _entry(KERNELS[0], key, _tile(1))
    gone = _entry("_bn_gone_kernel", key, _tile(1))
    not_a_candidate = _entry(KERNELS[2], key, {**_tile(1), "kwargs": {"BLOCK_R": 3, "BLOCK_K": 64}})  # never a tile
    new_key = dict(_entry(KERNELS[1], key, _tile(1)), key_names=["N", "Q", "K"])
    path = _write(tmp_path, _file([gone, good, not_a_candidate, new_key]))
    key_text = "(2, 8, 100, False, 'torch.float32', 'torch.float32')"
    expected = (f"tuning file {path}: skipped 3 of 4 entries: _bn_gone_kernel (no such autotuned kernel); "
                f"{KERNELS[2]} {key_text} (config BLOCK_R=3, BLOCK_K=64, num_warps={_tile(1)['num_warps']} "
                "is not among its candidates); "
                f"{KERNELS[1]} {key_text} (the kernel's autotune key is now "
                "['N', 'Q', 'K', 'CHANNELS_LAST', 'STAT_IS_VAR'], the file's is ['N', 'Q', 'K'])")
    with pytest.warns(TuningWarning) as warned:
        report = use_tuning(path)
    assert [str(w.message) for w in warned] == [expected]
    assert report.applied == 1 and len(report.skipped) == 3
    assert tuple(key) in autotuned_kernels()[KERNELS[0]].cache
    assert tuple(key) not in autotuned_kernels()[KERNELS[2]].cache


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
