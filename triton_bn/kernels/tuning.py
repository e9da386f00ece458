"""Everything about tuning in one place: autotune configs, keys, pruning, benchmarker, splits.

Tiles are ``[BLOCK_R, BLOCK_K]`` with ``BLOCK_K`` along the unit-stride axis. Each config is
a tile of ``BLOCK_R * BLOCK_K`` elements; pruning keeps the widest ``BLOCK_K`` that the
shape can fill (so no lanes idle on the vectorized axis) and the next narrower one, at a few
tile sizes. Under ``TRITON_INTERPRET=1`` there is no GPU benchmarker: ``do_bench`` runs each
candidate once (so every config path executes) and reports equal times, which makes the
autotuner keep the first, i.e. the preferred, config deterministically.

``TRITON_BN_PIN_CONFIG=1`` pins every autotuned kernel to its first pruned config.
``TRITON_BN_INTERPRET_GPU_PRUNING=1`` makes the interpreter keep the candidates a GPU keeps
(several per key), so the tuning workflow (``python -m triton_bn.tune``, docs/tuning.md) and
its tests exercise the benchmarking path on the CPU.

Every autotuned kernel is registered by name (``autotuned_kernels()``): the tuning tool
enumerates them, reads their candidate configs and pre-fills their autotune caches.

The config list is checked against the machine code (``python -m triton_bn.report``,
guarded by tests/test_report.py): no shipped config spills registers, and every one reaches
16-byte (LDG/STG.128) accesses on the unit-stride axis for 16-byte-aligned inputs, in all
four autotuned kernels, fp32/fp16/bf16, channels-first and channels-last, sm_90 and sm_80.
Rows of a length Triton cannot prove 16-byte aligned (K % 16 != 0) get 16-byte accesses in the
elementwise kernels through their flat walk (``flat_walk``) when the tensors are dense.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

BLOCK_K_CHOICES = (16, 32, 64, 128, 256, 512, 1024)
TILE_ELEMENTS = (4096, 2048, 1024)
MIN_TILE_ELEMENTS = 2048  # what pruning keeps for a 2-D tile when the shape allows (prune_tile_configs)
# At most 16 elements per thread. At 32 (8192 elements on 8 warps) the statistics kernel
# reaches ptxas 13's 128-register ceiling on sm_90 and spills up to 32 bytes (stats_partial
# fp16 NCHW, BLOCK_K=1024: 128 regs, 22 spill instructions); 8192 on 16 warps spills on sm_80,
# where ptxas 12.9 holds 512-thread blocks to 64 registers.
TILE_WARPS = {4096: 8, 2048: 4, 1024: 4}
# (tile elements, BLOCK_K) that spill 8-24 bytes in some kernel/dtype/layout on sm_90 or
# sm_80 at 64-80 registers: an effect of the --regAllocOptLevel=2 Triton passes to ptxas
# (the same PTX allocates spill-free without it). Found by python -m triton_bn.report
# --arch 90,80 (triton 3.9: ptxas-blackwell 13.4 for sm_90, ptxas 12.9 for sm_80).
# (2048, 64): stats_partial fp32 channels-last, 80 regs + 8 bytes of stack since its per-lane
# register sums (two [BLOCK_R, BLOCK_K] accumulators) replaced the per-tile reductions.
# (2048, 512), (2048, 1024): backward_partial fp16/bf16 NCHW, 56-64 regs + 8 bytes of stack
# with 32-bit addressing (the same --regAllocOptLevel=2 effect).
SPILLING_TILES = {(4096, 16), (4096, 32), (4096, 128), (4096, 256), (4096, 512), (2048, 256), (2048, 64),
                  (2048, 512), (2048, 1024), (1024, 1024)}
TUNING_KEY = ["N", "Q", "K", "CHANNELS_LAST"]
# Channels-last partial reductions: a program reduces a block of at most this many channels
# (64 fp16 channels = 128 bytes per row: whole cache lines). stats_splits sizes the grid,
# cdiv(C, PARTIAL_BLOCK_K) x splits, for a few waves on the GPU; wider tiles (up to 1024) would
# launch 2-4 channel blocks x the same splits, e.g. 34 programs on 132 SMs at C = 2048.
PARTIAL_BLOCK_K = 64


# Read once: Triton itself decides at import whether @triton.jit functions are interpreted.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CPU_KERNELS = _INTERPRETING or os.environ.get("TRITON_BN_CPU_KERNELS", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def cpu_kernels() -> bool:
    """Whether CPU tensors run the Triton kernels: under the interpreter, or with
    TRITON_BN_CPU_KERNELS=1, set by tools whose Triton driver takes CPU pointers (perf's
    host-cost benchmark stubs the launch)."""
    return _CPU_KERNELS


def pinned() -> bool:
    return os.environ.get("TRITON_BN_PIN_CONFIG", "0") == "1"


def gpu_pruning() -> bool:
    return not interpreting() or os.environ.get("TRITON_BN_INTERPRET_GPU_PRUNING", "0") == "1"


def _tile_configs():
    """Largest tiles first, narrowest BLOCK_K first: the order pruning and pinning prefer."""
    return [triton.Config({"BLOCK_R": tile // block_k, "BLOCK_K": block_k}, num_warps=TILE_WARPS[tile])
            for tile in TILE_ELEMENTS for block_k in BLOCK_K_CHOICES
            if block_k <= tile and (tile, block_k) not in SPILLING_TILES]


TILE_CONFIGS = _tile_configs()


def _widest_block_k(K: int) -> int:
    return max(BLOCK_K_CHOICES[0], min(BLOCK_K_CHOICES[-1], triton.next_power_of_2(K)))


def _tile_elements(config) -> int:
    return config.kwargs["BLOCK_R"] * config.kwargs["BLOCK_K"]


def prune_tile_configs(configs, named_args, **kwargs):
    """Keep tiles whose BLOCK_K fits the unit-stride extent K: the widest that K fills
    and half of it; under the interpreter only the largest tiles (per-op overhead dominates)
    unless TRITON_BN_INTERPRET_GPU_PRUNING=1. A FLAT launch (flat_walk) walks blocks of
    BLOCK_R * BLOCK_K elements whatever the split: one config per tile size."""
    if kwargs.get("FLAT", named_args.get("FLAT")):
        sizes = {}
        for c in configs:
            sizes.setdefault(_tile_elements(c), c)
        kept = list(sizes.values())
    else:
        K = named_args["K"]
        widest = _widest_block_k(K)
        if "rows_per_split" in named_args and kwargs.get("CHANNELS_LAST", named_args.get("CHANNELS_LAST")):
            widest = min(widest, PARTIAL_BLOCK_K)  # the width stats_splits sized the grid for
        wanted = (widest, widest // 2)
        kept = [c for c in configs if c.kwargs["BLOCK_K"] in wanted]
        # 8 elements per thread (1024-element tiles) cost more instructions per element than an
        # H200 can issue at full bandwidth in eval normalize/dx (fp16/bf16 channels-last) and the
        # bf16 backward partial (python -m triton_bn.report --shapes resnet50): only where no
        # larger tile is offered.
        if any(_tile_elements(c) >= MIN_TILE_ELEMENTS for c in kept):
            kept = [c for c in kept if _tile_elements(c) >= MIN_TILE_ELEMENTS]
    if not gpu_pruning() and kept:
        largest = max(_tile_elements(c) for c in kept)
        kept = [c for c in kept if _tile_elements(c) == largest]
    if pinned():
        kept = kept[:1]
    return kept or configs[:1]


def _interpreter_do_bench(kernel_call, quantiles=None, **kwargs):
    kernel_call()
    return [0.0, 0.0, 0.0] if quantiles else 0.0


def _gpu_do_bench(kernel_call, quantiles=None, **kwargs):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def do_bench(kernel_call, quantiles=None, **kwargs):
    bench = _interpreter_do_bench if interpreting() else _gpu_do_bench
    return bench(kernel_call, quantiles=quantiles, **kwargs)


# Kernel name -> its triton Autotuner, filled by autotune_tiles() as the kernel modules load.
_AUTOTUNED: dict = {}


def autotuned_kernels() -> dict:
    """{kernel function name: Autotuner} of every autotuned kernel (``.configs`` are the
    candidates, ``.cache`` maps an autotune key to the chosen config)."""
    return dict(_AUTOTUNED)


def autotune_tiles(*extra_key: str):
    """The autotune decorator shared by the partial-reduction and elementwise kernels.
    ``extra_key``: constexpr flags that change the work per element enough to want their own
    config (eval's normalize computes invstd per tile; training's dx reads x as well)."""
    autotune = triton.autotune(configs=TILE_CONFIGS, key=TUNING_KEY + list(extra_key),
                               prune_configs_by={"early_config_prune": prune_tile_configs},
                               do_bench=do_bench)

    def register(fn):
        kernel = autotune(fn)
        _AUTOTUNED[kernel.base_fn.__name__] = kernel
        return kernel
    return register


# ---------------------------------------------------------------------------------------------
# The elementwise kernels' flat walk (helpers._flat_tile).

# Triton specializes an int argument on its divisibility by 16 (elements), nothing finer: the
# 2-D tile's rows start at r * K, provably 16-byte aligned only when K % 16 == 0. Any other
# row length (NCHW 7x7 and 14x14: K = S = 49, 196; channels-last C = 3) compiles to 16/32-bit
# accesses and, channels-first, to per-row channel arithmetic that costs registers.
ROW_DIVISIBILITY = 16
_NO_FLAT = {"FLAT": False, "FLAT_INNER": 1, "FLAT_C": 1}


def _dense(geometry) -> bool:
    """Strides (Q*K, K, 1) up to size-1 axes: contiguous NCHW, or channels-last contiguous."""
    N, Q, K, n_stride, q_stride, k_stride, _ = geometry
    return (K == 1 or k_stride == 1) and (Q == 1 or q_stride == K) and (N == 1 or n_stride == Q * K)


@functools.lru_cache(maxsize=4096)
def flat_walk(geometries: tuple) -> dict:
    """The FLAT constexprs of an elementwise launch over views with these geometries (each an
    NQKView[1:], all of one shape and orientation; None entries skipped).

    FLAT when every view is dense with the same strides (so one flat offset addresses all of
    them) and the 2-D tile could not get 16-byte accesses (K % 16 != 0). Element i then
    belongs to channel (i // FLAT_INNER) % FLAT_C: FLAT_INNER = S, FLAT_C = C channels-first
    (K = S, Q = C); FLAT_INNER = 1, FLAT_C = C = K channels-last. Both are constexprs (a
    compiled variant per channel count and spatial size, a few per network) so that the
    division is a multiply-high. Everything else keeps the 2-D tile, which reaches 128-bit
    accesses and needs no per-element channel gathers."""
    views = [g for g in geometries if g is not None]
    first = views[0]
    N, Q, K, *_, channels_last = first
    if K % ROW_DIVISIBILITY == 0 or not all(_dense(g) and g[:3] == first[:3] for g in views):
        return _NO_FLAT
    return {"FLAT": True, "FLAT_INNER": 1 if channels_last else K, "FLAT_C": K if channels_last else Q}


def flat_elementwise(*geometries) -> bool:
    """Whether an elementwise launch over views of these geometries walks them flat."""
    return flat_walk(tuple(geometries))["FLAT"]


# ---------------------------------------------------------------------------------------------
# How the statistics reduction is split over programs (fixed by the shape, not by the config,
# so the partial buffer can be allocated before the autotuner picks a tile).

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gpu_target_programs(sm_count: int) -> tuple[int, int]:
    """(programs wanted in flight, minimum elements per program) on a GPU with sm_count SMs."""
    return 4 * sm_count, 16384


def _target_programs(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda" and not interpreting():
        return gpu_target_programs(_sm_count(device.index if device.index is not None
                                             else torch.cuda.current_device()))
    return 4, 2048


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a constexpr function, ~100x slower to call)."""
    return -(-a // b)


def _round_up(x: int, multiple: int) -> int:
    return cdiv(x, multiple) * multiple


class Splits:
    """A split of the reduction domain: program ``(pid_c, s)`` reduces rows
    ``[(s // splits_k) * rows_per_split, ...)`` and, channels-first, columns
    ``[(s % splits_k) * cols_per_split, ...)`` of its channel(s)."""

    def __init__(self, rows_per_split: int, cols_per_split: int, splits_r: int, splits_k: int):
        self.rows_per_split = rows_per_split
        self.cols_per_split = cols_per_split
        self.splits_r = splits_r
        self.splits_k = splits_k
        self.num = splits_r * splits_k

    def extents(self, C: int, fields: int) -> tuple:
        """The largest indices a reduction over this split forms (view.split_addressing): the end
        of the last row range and of the last column range (rounded up past N*Q or K), and the
        element count of its [fields, P, C] partial buffer."""
        return self.splits_r * self.rows_per_split, self.splits_k * self.cols_per_split, fields * self.num * C


@functools.lru_cache(maxsize=4096)
def stats_splits(N: int, Q: int, K: int, channels_last: bool, device: torch.device,
                 splits: int | None = None) -> Splits:
    """``splits`` forces the number of splits per channel (block); else fill the device."""
    target, min_elements = _target_programs(device)
    if channels_last:
        rows = N * Q
        channel_blocks = cdiv(K, PARTIAL_BLOCK_K)
        if splits is None:
            splits = min(cdiv(target, channel_blocks),
                         max(1, rows * min(K, PARTIAL_BLOCK_K) // min_elements))
        rows_per_split = _round_up(cdiv(rows, max(1, min(splits, 65535))), 16)
        return Splits(rows_per_split, K, cdiv(rows, rows_per_split), 1)
    if splits is None:
        splits = min(cdiv(target, Q), max(1, N * K // min_elements))
    splits = max(1, min(splits, 65535))
    rows_per_split = cdiv(N, min(splits, N))
    splits_r = cdiv(N, rows_per_split)
    splits_k = max(1, min(cdiv(splits, splits_r), cdiv(K, 128)))
    # Column chunks start on multiples of 128 elements so 16-byte vector alignment survives.
    cols_per_split = _round_up(cdiv(K, splits_k), 128)
    return Splits(rows_per_split, cols_per_split, splits_r, cdiv(K, cols_per_split))


# ---------------------------------------------------------------------------------------------
# L2-resident second passes (split path). The statistics (backward partial) pass reads x (x, dy)
# in split-major order, which for the dense layouts is increasing address order (helpers._walk_pid);
# normalize (dx) then reads the same bytes again. Where the first pass's reads fit in L2 they load
# with evict_last, so the second pass's output stream does not push them out; the second pass walks
# its tiles in reverse, so it reads first what the first pass read last (what L2 still holds even
# when the tensor does not fit), and loads with evict_first: a line it has read is dead, the
# preferred victim. A prediction until a GPU run checks it (perf/NOTES.md, 2026-12-07).

L2_BYTES_SM90 = 50 * 2 ** 20  # H100 / H200; the interpreter and the report (sm_90) assume it
# evict_last only where the first pass's reads take at most this share of L2: the rest holds the
# partials, the second pass's output lines as they stream through, and other kernels' data.
L2_RESIDENT_FRACTION = 0.75
# The reversed walk only where L2 holds at least 1/8 of the first pass's reads: beyond, the
# saving (at most one L2 of a GB-sized pass) is lost in run-to-run noise, and the tuned variant stays.
L2_USEFUL_MULTIPLE = 8


@functools.lru_cache(maxsize=None)
def _l2_cache_size(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda" and not interpreting():
        return _l2_cache_size(device.index if device.index is not None else torch.cuda.current_device())
    return L2_BYTES_SM90


def l2_passes(first_pass_bytes: int, device: torch.device) -> tuple[bool, bool]:
    """(EVICT_LAST of the first pass, L2_REVERSED of the second) for a split-path pass pair whose
    first pass reads ``first_pass_bytes``. Never for a second pass without a first (eval), nor
    with the switch off (l2_hints_enabled)."""
    return _l2_passes(first_pass_bytes, device) if l2_hints_enabled.on else (False, False)


@functools.lru_cache(maxsize=4096)
def _l2_passes(first_pass_bytes: int, device: torch.device) -> tuple[bool, bool]:
    l2 = l2_bytes(device)
    return first_pass_bytes <= L2_RESIDENT_FRACTION * l2, first_pass_bytes <= L2_USEFUL_MULTIPLE * l2


# ---------------------------------------------------------------------------------------------
# The on-chip path (onchip.py): one program holds a channel's whole slab in registers. Not
# autotuned (an autotuner would rerun the in-place running-statistics update): the tile and
# num_warps are functions of the shape.

# 8192 padded elements on 16 warps is 16 values per thread per tile, the autotuned kernels'
# bound (see TILE_WARPS); the backward keeps three such tiles (x, dy, dz; four with a
# residual) live at once, and a 512-thread block gets at most 128 registers per thread on
# sm_90. At the bound both kernels, plain and with the heaviest epilogue (leaky_relu, residual,
# from the output, dresidual), take 52-88 registers and spill nothing on sm_90 or sm_80, fp32/
# fp16/bf16, NCHW/NHWC/NC (python -m triton_bn.report --kernel onchip: it compiles them on
# 64 x 128 and 2048 x 4 / 1024 x 8 slabs; guarded by tests/test_report.py). fp64 is not in
# the report. A larger slab needs more values per thread live (32 at 16384: spill risk,
# unchecked) or a shared-memory-resident slab (not built).
ONCHIP_MAX_ELEMENTS = 8192
ONCHIP_VALUES_PER_THREAD = 16
# (BLOCK_R, BLOCK_K, element size) the channels-last widening skips: onchip_forward fp16 at
# [64, 128] takes 64 registers + 8 bytes of stack on sm_90 (the --regAllocOptLevel=2 effect
# of SPILLING_TILES). Found by compiling every bound-filling channels-last tile (BLOCK_R 8 to
# 2048, fp32/fp16/bf16, plain and fused, sm_90 and sm_80) and channels-first tile (BLOCK_R 2
# to 4096) with python -m triton_bn.report's machinery: the only spill.
ONCHIP_SPILLING_TILES = {(64, 128, 2)}
class _Switch:
    """A launcher-wide on/off setting: its environment variable ("0" turns it off) read once, like
    TRITON_INTERPRET (the dispatch must cost no environment lookup per call); ``use(enabled)``
    sets it inside a block (tests, tools, A/B runs). replay.py keys its replays on every switch."""

    def __init__(self, variable: str, default: str = "1"):
        self.on = os.environ.get(variable, default) != "0"

    def __call__(self) -> bool:
        return self.on

    @contextlib.contextmanager
    def use(self, enabled: bool):
        saved, self.on = self.on, bool(enabled)
        try:
            yield
        finally:
            self.on = saved


#: Whether forward-train and backward may take the on-chip path (TRITON_BN_ONCHIP=0: never).
onchip_enabled = _Switch("TRITON_BN_ONCHIP")
use_onchip = onchip_enabled.use
#: Whether l2_passes may set its hints (TRITON_BN_L2_HINTS=0: never): unmeasured until a GPU run
#: compares the two (perf/NOTES.md, 2026-12-07).
l2_hints_enabled = _Switch("TRITON_BN_L2_HINTS")
use_l2_hints = l2_hints_enabled.use
#: Whether the launchers may take the cooperative path (TRITON_BN_COOPERATIVE=1: yes); off until a
#: GPU run has measured it (perf/NOTES.md, 2026-12-08).
cooperative_enabled = _Switch("TRITON_BN_COOPERATIVE", default="0")
use_cooperative = cooperative_enabled.use


@functools.lru_cache(maxsize=4096)
def onchip_tile(N: int, Q: int, K: int, channels_last: bool, dtype: torch.dtype):
    """(BLOCK_R, BLOCK_K, num_warps) of the on-chip kernels for this [N, Q, K] view, or None
    when a program's slab (padded to powers of two) exceeds ONCHIP_MAX_ELEMENTS.

    Channels-first: one channel per program, rows the N samples, cols the K = S positions.
    Channels-last: BLOCK_K channels per program, rows the N * Q (sample, position) pairs;
    BLOCK_K spans at least 16 bytes on the unit-stride channel axis (narrower would waste the
    vector accesses) and at most next_power_of_2(K) channels, else None. Within that, the
    widest block the bound allows: each row's access covers whole 32-byte sectors sooner, and
    fewer programs (the interpreter pays per program)."""
    if N <= 0 or Q <= 0 or K <= 0:
        return None
    if channels_last:
        block_r = triton.next_power_of_2(N * Q)
        block_k = max(1, 16 // dtype.itemsize)
        widest = triton.next_power_of_2(K)
        if block_k > widest:
            return None
        while (block_k < widest and block_r * block_k * 2 <= ONCHIP_MAX_ELEMENTS
               and (block_r, block_k * 2, dtype.itemsize) not in ONCHIP_SPILLING_TILES):
            block_k *= 2
    else:
        block_r, block_k = triton.next_power_of_2(N), triton.next_power_of_2(K)
    elements = block_r * block_k
    if elements > ONCHIP_MAX_ELEMENTS:
        return None
    num_warps = max(1, min(16, elements // (32 * ONCHIP_VALUES_PER_THREAD)))
    return block_r, block_k, num_warps



# The cooperative path (cooperative.py): every program of a launch waits at grid barriers, so all
# must be resident at once. ptxas is held to COOPERATIVE_MAX_REGISTERS (.maxnreg), so programs per
# SM follow from the launch alone: 65536 / (128 x 256 threads) = 2; its few KB of reduction scratch
# fit twice on sm_80 and sm_90 (python -m triton_bn.report --kernel cooperative shows both).
COOPERATIVE_WARPS, COOPERATIVE_MAX_REGISTERS = 8, 128
COOPERATIVE_VALUES_PER_THREAD = 32  # of one [N, Q, K] tile; fp64 half (two registers a value)
SM_COUNT_ASSUMED = 132  # H100 SXM / H200, where no GPU is asked (the interpreter, the report)


def co_resident_programs(sm_count: int, num_warps: int, registers: int = COOPERATIVE_MAX_REGISTERS) -> int:
    threads = 32 * num_warps
    return sm_count * min(2048 // threads, 65536 // (registers * threads), 32)
