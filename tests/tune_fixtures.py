"""Shared by tests/test_tune.py and tests/test_tune_apply.py: the shapes tuned, a module-scoped
tuning run, tuning-file builders, and the autotune caches given back after every test."""
import json
import os
from pathlib import Path

import pytest
import torch

from triton_bn.kernels.tuning import autotuned_kernels
from triton_bn.tune import machine, store
from triton_bn.tune.bench import tune
from triton_bn.tune.shapes import Shape

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
