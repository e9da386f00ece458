"""Tuning files applied (triton_bn.use_tuning, TRITON_BN_TUNING): no benchmarking for the keys
in the file, clear errors for bad files, warnings (or strict refusal) for other machines,
interpreter files never applied on a GPU, stale entries named and skipped."""
import json
import subprocess
import sys
import textwrap

import pytest

from triton_bn.kernels.tuning import autotuned_kernels
from triton_bn.tune import TuningFileError, TuningWarning, use_tuning
from triton_bn.tune import machine, store

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
    # TRITON_BN_ONCHIP=0: these small shapes would otherwise take the on-chip kernels, which
    # are not autotuned (the tuning file is about the split path's autotuned kernels).
    env = _subprocess_env(TRITON_BN_INTERPRET_GPU_PRUNING="1", TRITON_BN_ONCHIP="0",
                          **({"TRITON_BN_TUNING": str(path)} if with_file else {}))
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
                "['N', 'Q', 'K', 'CHANNELS_LAST', 'STAT_IS_VAR', 'FLAT'], the file's is ['N', 'Q', 'K'])")
    with pytest.warns(TuningWarning) as warned:
        report = use_tuning(path)
    assert [str(w.message) for w in warned] == [expected]
    assert report.applied == 1 and len(report.skipped) == 3
    assert tuple(key) in autotuned_kernels()[KERNELS[0]].cache
    assert tuple(key) not in autotuned_kernels()[KERNELS[2]].cache
