"""Host benchmark, the driver: Triton's real CUDA driver over a libcuda that launches nothing.

``install()`` makes every Triton kernel call in this process do on the host exactly what it
does on an H200, except the launch:

- Triton compiles each kernel for sm_90 for real (ptxas ships with the triton wheel), caches
  it, and autotunes / binds arguments as usual;
- Triton's own launcher (``backends/nvidia/driver.c``, built by Triton as ``cuda_utils``) runs,
  packing every argument in C, but it is linked against ``libcuda_stub.c`` instead of NVIDIA's
  libcuda.so.1: cuLaunchKernelEx only counts, module loading hands out dummy handles, the
  device reports compute capability 9.0 and 132 SMs, and pointer queries accept host
  pointers (so CPU tensors pass where CUDA tensors would; nothing is ever dereferenced).

The driver's device and stream queries are driver.c's (C calls into the stub), where a GPU
process with torch would use torch.cuda's; both are a fraction of a microsecond.

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
SONAME = "libcuda.so.1"  # the name driver.c links and dlopen()s


def _nvidia_include() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "include"


def build_stub() -> Path:
    """Compile libcuda_stub.c once into Triton's cache; the path of the resulting libcuda.so.1."""
    from triton.runtime.cache import get_cache_manager
    include = _nvidia_include()
    source = STUB_SOURCE.read_bytes()
    key = hashlib.sha256(b"triton_bn libcuda stub" + source + (include / "cuda.h").read_bytes()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file(SONAME)
    if cached:
        return Path(cached)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("the host benchmark needs a C compiler (as Triton does on a GPU machine): set CC")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / SONAME
        subprocess.run([cc, str(STUB_SOURCE), "-O2", "-shared", "-fPIC", f"-Wl,-soname,{SONAME}",
                        f"-I{include}", "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
        return Path(cache.put(out.read_bytes(), SONAME, binary=True))


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
        """CudaDriver as Triton builds it in a process without torch: every query goes to
        (stub) libcuda, none to torch.cuda, which has no device here."""

        def __init__(self):
            self.utils = CudaUtils()
            self.launcher_cls = CudaLauncher
            self.get_device_capability = self.utils.get_device_capability
            self.get_current_stream = self.utils.get_default_stream
            self.get_current_device = self.utils.get_current_device
            self.set_current_device = self.utils.set_current_device

    return StubCudaDriver


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
    stub = _stub_driver_class()()
    driver.set_active(stub)
    target = stub.get_current_target()
    if (target.backend, target.arch) != ("cuda", 90):
        raise RuntimeError(f"stub driver reports {target}, expected cuda sm_90")
    return LaunchCounter(library)
