"""Layer 0: the torch and Triton versions in range (triton_bn/compat.py), and every internal of
theirs that triton_bn reads, checked on the installed pair: a release that drops or changes one
fails here, naming its version. .ci/versions.sh runs this file on the floor and newest pairs."""
import importlib.util
import inspect
import re
from pathlib import Path

import numpy
import pytest
import torch
import triton

from triton_bn import compat
from triton_bn.kernels import launch

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = f"torch {torch.__version__}, Triton {triton.__version__}"
# How a recorded plan launches on each Triton in range (read off each version's
# backends/nvidia/driver.py, CudaLauncher): its C launch function directly, in the signature
# of that version, or (a Triton whose signature nobody read) Triton's own kernel.run.
EXPECTED_LAUNCH_PATH = {(3, 5): "c:varargs", (3, 6): "c:varargs", (3, 7): "c:packed", (3, 8): "c:packed",
                        (3, 9): "c:packed"}
# The order in which each CudaLauncher.__call__ passes its arguments to the C launch function.
LAUNCH_CALL = {
    "varargs": ["gridX", "gridY", "gridZ", "stream", "function", "self.launch_cooperative_grid", "self.launch_pdl",
                "global_scratch", "profile_scratch", "*args"],
    "packed": ["gridX", "gridY", "gridZ", "stream", "function", "self.launch_cooperative_grid", "self.launch_pdl",
               "kernel_metadata", "launch_metadata", "launch_enter_hook", "launch_exit_hook", "global_scratch",
               "profile_scratch", "self.arg_annotations", "self.kernel_signature", "args|kernel_args"],
}


def expected_launch_path() -> str:
    version = compat.TRITON[:2]
    if version not in EXPECTED_LAUNCH_PATH:
        pytest.fail(f"Triton {triton.__version__} is outside the range triton_bn was checked on: read its "
                    "CudaLauncher (backends/nvidia/driver.py), add its C launch layout to compat.C_LAUNCH_LAYOUTS "
                    "and here")
    return EXPECTED_LAUNCH_PATH[version]


def test_installed_pair_is_in_the_supported_range():
    assert compat.TORCH[:2] >= compat.MIN_TORCH, INSTALLED
    assert compat.TRITON[:2] >= compat.MIN_TRITON, INSTALLED
    expected_launch_path()


def test_pyproject_declares_the_same_floors():
    text = (ROOT / "pyproject.toml").read_text()
    floors = {name: tuple(int(p) for p in version.split(".")) for name, version in
              re.findall(r'"(torch|triton)>=([0-9.]+)', text)}
    assert floors == {"torch": compat.MIN_TORCH, "triton": compat.MIN_TRITON}, floors


@pytest.mark.parametrize("text, version", [("2.9.1+cu128", (2, 9, 1)), ("3.6.0", (3, 6, 0)), ("2.15", (2, 15, 0)),
                                           ("3.10.0.dev20260101", (3, 10, 0))])
def test_version_tuple(text, version):
    assert compat.version_tuple(text) == version


def test_the_installed_triton_takes_its_launch_path():
    assert {"c:packed": "packed", "c:varargs": "varargs", "triton": None}[expected_launch_path()] \
        == compat.C_LAUNCH_LAYOUT, INSTALLED


def test_the_c_launch_layout_is_the_installed_tritons():
    """CudaLauncher.__call__ passes its C launch function the arguments in the order the layout
    assumes (a CPU-side check of what perf host runs for real against the stub driver)."""
    from triton.backends.nvidia.driver import CudaLauncher
    source = inspect.getsource(CudaLauncher.__call__)
    call = re.search(r"self\.launch\((.*?)\)\n", source, re.S)
    assert call is not None, f"Triton {triton.__version__}: no self.launch(...) call in CudaLauncher.__call__"
    arguments = [a.strip() for a in call.group(1).split(",")]
    expected = LAUNCH_CALL[compat.C_LAUNCH_LAYOUT]
    assert len(arguments) == len(expected), (INSTALLED, arguments)
    for got, want in zip(arguments, expected):
        assert got in want.split("|"), (INSTALLED, arguments)
    init = inspect.getsource(CudaLauncher.__init__)
    for name in launch._C_LAUNCH_NEEDS[compat.C_LAUNCH_LAYOUT]:
        assert f"self.{name} =" in init, (INSTALLED, name)


class _FakeRun:
    """A CudaLauncher's attributes, its C launch function recording its arguments."""

    def __init__(self, layout, **overrides):
        self.calls = []
        self.launch = lambda *args: self.calls.append(args)
        self.global_scratch_size = self.profile_scratch_size = 0
        self.launch_cooperative_grid, self.launch_pdl = False, True
        if layout == "packed":
            self.arg_annotations, self.kernel_signature = "annotations", b"signature"
        self.__dict__.update(overrides)


class _FakeKernel:
    def __init__(self, run):
        self.run, self.function, self.packed_metadata = run, 1234, (4, 1, 0)


@pytest.mark.parametrize("layout", ["varargs", "packed"])
def test_c_launcher_passes_each_layouts_arguments(layout):
    run = _FakeRun(layout)
    go = launch._c_launcher(_FakeKernel(run), (3, 2, 1), layout)
    assert go.path == f"c:{layout}"
    go(77, ("x", 5, 0.5))
    (call,) = run.calls
    head = (3, 2, 1, 77, 1234, False, True)
    if layout == "varargs":
        assert call == (*head, None, None, (4, 1, 0), None, None, None, "x", 5, 0.5)
    else:
        assert call == (*head, (4, 1, 0), None, None, None, None, None, "annotations", b"signature", ("x", 5, 0.5))


@pytest.mark.parametrize("layout, overrides", [
    (None, {}),  # a Triton whose signature is not known
    ("varargs", {"global_scratch_size": 64}), ("packed", {"profile_scratch_size": 8}),
    ("packed", {"gsan_enabled": True}),
    ("packed", {"kernel_signature": None}),  # attribute present: fine; removed below
])
def test_c_launcher_falls_back_to_tritons_launch(layout, overrides):
    run = _FakeRun(layout or "packed", **overrides)
    go = launch._c_launcher(_FakeKernel(run), (1, 1, 1), layout)
    if layout == "packed" and overrides == {"kernel_signature": None}:
        assert go is not None
        del run.kernel_signature
        go = launch._c_launcher(_FakeKernel(run), (1, 1, 1), layout)
    assert go is None


def test_triton_launcher_calls_kernel_run():
    calls = []

    class Kernel:
        function, packed_metadata = 9, (1, 1, 0)

        def run(self, *args):
            calls.append(args)
    go = launch._triton_launcher(Kernel(), (2, 1, 1))
    assert go.path == "triton"
    go(5, ("x", 3))
    assert calls == [(2, 1, 1, 5, 9, (1, 1, 0), None, None, None, "x", 3)]


def test_triton_internals_triton_bn_reads():
    """What kernels/launch.py, tune/ and report/ read of Triton, on the installed version."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton_bn.kernels.tuning import autotuned_kernels
    assert callable(triton.constexpr_function), INSTALLED
    assert hasattr(knobs.runtime, "launch_enter_hook"), INSTALLED
    assert hasattr(type(driver), "active") and hasattr(driver, "set_active"), INSTALLED  # no GPU: not driver.active
    kernels = autotuned_kernels()
    assert kernels, "no autotuned kernel registered"
    for name, kernel in kernels.items():
        assert isinstance(kernel, Autotuner), (name, INSTALLED)
        assert isinstance(kernel.cache, dict) and kernel.configs, (name, INSTALLED)
        assert kernel.fn.arg_names and callable(kernel.fn.fn), (name, INSTALLED)
        assert "best_config" in inspect.getsource(Autotuner.run), INSTALLED
    assert "packed_metadata" in inspect.getsource(importlib.import_module("triton.compiler.compiler")), INSTALLED


def test_best_config_is_set_by_a_launch(device):
    """Launch._first reads Autotuner.best_config after Triton's own launch."""
    import triton_bn
    from triton_bn.kernels.launch import all_launches
    from triton_bn.kernels.tuning import use_onchip
    x = torch.randn(4, 3, 5, device=device)
    with use_onchip(False):  # the split path's kernels are autotuned
        triton_bn.batch_norm(x, None, None, training=True)
    tuned = [entry.fn for entry in all_launches() if hasattr(entry.fn, "configs")]
    assert tuned and any(getattr(fn, "best_config", None) is not None for fn in tuned), INSTALLED


def test_dispatch_stack_length_and_its_fallback():
    from torch.utils._python_dispatch import TorchDispatchMode
    import torch.utils._python_dispatch as python_dispatch

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    fallback = compat._pick_len_dispatch_stack(object(), python_dispatch)
    assert compat.len_dispatch_stack is torch._C._len_torch_dispatch_stack, INSTALLED
    for count in (compat.len_dispatch_stack, fallback):
        assert count() == 0
        with Mode():
            assert count() == 1
    with pytest.raises(ImportError, match="torch"):
        compat._pick_len_dispatch_stack(object(), object())


def test_functorch_query_and_its_fallback():
    seen = []

    def f(x):
        seen.append(compat.functorch_transforms_active())
        return x.sin().sum()
    assert compat.functorch_transforms_active() is False
    torch.func.grad(f)(torch.ones(2))
    assert seen == [True]
    assert compat._pick_functorch_active(object())() is True


def _import_compat_copy():
    spec = importlib.util.spec_from_file_location("compat_copy", ROOT / "triton_bn" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_triton_below_the_floor_is_named(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    with pytest.raises(ImportError, match=r"Triton >= 3\.5 .*Triton 3\.4\.0"):
        _import_compat_copy()


@pytest.mark.parametrize("triton_version, numpy_version, interpret, fails", [
    ("3.6.0", "2.4.0", "1", True), ("3.5.1", "2.5.1", "1", True), ("3.6.0", "2.3.5", "1", False),
    ("3.6.0", "2.4.0", "0", False), ("3.7.1", "2.4.0", "1", False)])
def test_the_interpreters_numpy_bound_is_named(monkeypatch, triton_version, numpy_version, interpret, fails):
    """Triton 3.5/3.6's interpreter int()s 1-element arrays, a TypeError since numpy 2.4."""
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    if fails:
        with pytest.raises(ImportError, match=r"numpy < ?2\.4|numpy<2\.4"):
            _import_compat_copy()
    else:
        assert _import_compat_copy().TRITON == compat.version_tuple(triton_version)
