"""Host benchmark, the driver: Triton's real CUDA driver over a libcuda that launches nothing.

``install()`` makes every Triton kernel call in this process do on the host exactly what it
does on an H200, except the launch:

- Triton compiles each kernel for sm_90 for real (ptxas ships with the triton wheel), caches
  it, and autotunes / binds arguments as usual;
- Triton's own launcher (``backends/nvidia/driver.c``, built by Triton as ``cuda_utils``; on
  Triton 3.5 and 3.6 a C launcher generated and compiled per kernel) runs, packing every
  argument in C, but it is linked against ``libcuda_stub.c`` instead of NVIDIA's libcuda.so.1:
  cuLaunchKernelEx only counts, module loading hands out dummy handles, the device reports
  compute capability 9.0 and 132 SMs, and pointer queries accept host pointers (so CPU
  tensors pass where CUDA tensors would; nothing is ever dereferenced).

The driver's device and stream queries are driver.c's (C calls into the stub; on Triton 3.5 -
3.7, whose driver.c has none, constants), where a GPU process with torch would use
torch.cuda's; both are a fraction of a microsecond.

Must run in a process that never imported triton with ``TRITON_INTERPRET=1`` (the flag picks
interpreted kernels when they are defined) and that loads no real libcuda: ``perf/host.py``
starts a fresh one.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STUB_SOURCE = Path(__file__).with_name("libcuda_stub.c")
SONAME = "libcuda.so.1"  # the name the launchers load (their dlopen()s, and the soname a link records)
# The names Triton links against: Triton >= 3.7 links driver.c with -l:libcuda.so.1; 3.5 and
# 3.6 link each kernel's launcher with -lcuda, which looks for libcuda.so. Both files are the
# stub, whose soname is libcuda.so.1: either link loads the one already in this process.
LINK_NAMES = (SONAME, "libcuda.so")
# cuda.h's CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR and _MINOR.
_CAPABILITY_MAJOR, _CAPABILITY_MINOR = 75, 76


def _nvidia_include() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "include"


def build_stub() -> Path:
    """Compile libcuda_stub.c once into Triton's cache; the path of the resulting libcuda.so.1
    (libcuda.so, the same library, lies beside it: LINK_NAMES)."""
    from triton.runtime.cache import get_cache_manager
    include = _nvidia_include()
    source = STUB_SOURCE.read_bytes()
    key = hashlib.sha256(b"triton_bn libcuda stub" + source + (include / "cuda.h").read_bytes()).hexdigest()
    cache = get_cache_manager(key)
    cached = [cache.get_file(name) for name in LINK_NAMES]
    if all(cached):
        return Path(cached[0])
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("the host benchmark needs a C compiler (as Triton does on a GPU machine): set CC")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / SONAME
        subprocess.run([cc, str(STUB_SOURCE), "-O2", "-shared", "-fPIC", f"-Wl,-soname,{SONAME}",
                        f"-I{include}", "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
        paths = [cache.put(out.read_bytes(), name, binary=True) for name in LINK_NAMES]
        return Path(paths[0])


class LaunchCounter:
    """The stub's count of cuLaunchKernelEx calls in this process."""

    def __init__(self, library: ctypes.CDLL):
        self._count = library.triton_bn_stub_launches
        self._count.restype = ctypes.c_ulonglong

    def __call__(self) -> int:
        return int(self._count())


def _stub_driver_class():
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher, CudaUtils

    class StubCudaDriver(CudaDriver):
        """CudaDriver as Triton >= 3.8 builds it in a process without torch: every query goes to
        (stub) libcuda, none to torch.cuda, which has no device here. Triton 3.5 - 3.7's driver.c
        has no device or stream queries (their CudaDriver asks torch.cuda): there the device is
        0 (the stub's only one), the stream the default one (0), and the capability is asked
        of the stub through ctypes."""

        def __init__(self, library: ctypes.CDLL):
            self.utils = CudaUtils()
            self.launcher_cls = CudaLauncher
            utils = self.utils
            self.get_device_capability = getattr(utils, "get_device_capability", None) or _capability(library)
            self.get_current_stream = getattr(utils, "get_default_stream", None) or (lambda device: 0)
            self.get_current_device = getattr(utils, "get_current_device", None) or (lambda: 0)
            self.set_current_device = getattr(utils, "set_current_device", None) or (lambda device: None)

    return StubCudaDriver


def _capability(library: ctypes.CDLL):
    """get_device_capability through the stub's cuDeviceGetAttribute: (major, minor)."""
    get = library.cuDeviceGetAttribute
    get.argtypes = (ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int)

    def capability(device):
        values = []
        for attribute in (_CAPABILITY_MAJOR, _CAPABILITY_MINOR):
            value = ctypes.c_int()
            if get(ctypes.byref(value), attribute, int(device)) != 0:
                raise RuntimeError("the libcuda stub refused cuDeviceGetAttribute")
            values.append(value.value)
        return tuple(values)
    return capability


def _untimed_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
    """triton.testing.do_bench without a GPU timer: one call, a constant time. The autotuner of
    Triton 3.5 - 3.7 benchmarks even a single candidate (a config pinned by
    TRITON_BN_PIN_CONFIG=1), through torch.cuda's events, which have no device here."""
    fn()
    return [1.0] * len(quantiles) if quantiles else 1.0


def _mapped_libcuda() -> list:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing to check
        return []
    return sorted({line.split()[-1] for line in maps.splitlines() if "/libcuda.so" in line})


def install() -> LaunchCounter:
    """Load the stub as this process's libcuda.so.1 and make Triton's active driver use it."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the host benchmark needs compiled kernels (unset it)")
    if any(m.startswith("triton_bn") for m in sys.modules):
        raise RuntimeError("install() must run before triton_bn is imported (its kernels are defined then)")
    path = build_stub()
    already = _mapped_libcuda()
    if already:
        raise RuntimeError(f"a libcuda is already loaded in this process ({', '.join(already)}): the stub "
                           "must be the only one (start a fresh process with CUDA_VISIBLE_DEVICES='')")
    # Loaded first and globally, the stub is the libcuda.so.1 that cuda_utils links to and
    # that driver.c's dlopen("libcuda.so.1") finds: the loader matches the soname.
    library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    os.environ["TRITON_LIBCUDA_PATH"] = str(path.parent)  # where cuda_utils is linked (-L)
    from triton.runtime import driver
    stub = _stub_driver_class()(library)
    driver.set_active(stub)
    import triton.testing
    triton.testing.do_bench = _untimed_bench
    target = stub.get_current_target()
    if (target.backend, target.arch) != ("cuda", 90):
        raise RuntimeError(f"stub driver reports {target}, expected cuda sm_90")
    return LaunchCounter(library)
