"""Everything about tuning in one place: autotune configs, keys, pruning, benchmarker, splits.

Tiles are ``[BLOCK_R, BLOCK_K]`` with ``BLOCK_K`` along the unit-stride axis. Each config is
a tile of ``BLOCK_R * BLOCK_K`` elements; pruning keeps the widest ``BLOCK_K`` that the
shape can fill (so no lanes idle on the vectorized axis) and the next narrower one, at a few
tile sizes. Under ``TRITON_INTERPRET=1`` there is no GPU benchmarker: ``do_bench`` runs each
candidate once (so every config path executes) and reports equal times, which makes the
autotuner keep the first, i.e. the preferred, config deterministically.

``TRITON_BN_PIN_CONFIG=1`` pins every autotuned kernel to its first pruned config.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

BLOCK_K_CHOICES = (16, 32, 64, 128, 256, 512, 1024)
TILE_ELEMENTS = (8192, 4096, 2048)
TUNING_KEY = ["N", "Q", "K", "CHANNELS_LAST"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pinned() -> bool:
    return os.environ.get("TRITON_BN_PIN_CONFIG", "0") == "1"


def _tile_configs():
    configs = []
    for tile in TILE_ELEMENTS:
        for block_k in BLOCK_K_CHOICES:
            if block_k > tile:
                continue
            configs.append(triton.Config({"BLOCK_R": tile // block_k, "BLOCK_K": block_k},
                                         num_warps=8 if tile >= 8192 else 4))
    return configs


TILE_CONFIGS = _tile_configs()


def _widest_block_k(K: int) -> int:
    return max(BLOCK_K_CHOICES[0], min(BLOCK_K_CHOICES[-1], triton.next_power_of_2(K)))


def prune_tile_configs(configs, named_args, **kwargs):
    """Keep tiles whose BLOCK_K fits the unit-stride extent K: the widest that K fills
    and half of it; under the interpreter only the largest tiles (per-op overhead dominates)."""
    K = named_args["K"]
    widest = _widest_block_k(K)
    wanted = (widest, widest // 2)
    kept = [c for c in configs if c.kwargs["BLOCK_K"] in wanted]
    if interpreting():
        kept = [c for c in kept if c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_K"] == TILE_ELEMENTS[0]]
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


def autotune_tiles():
    """The autotune decorator shared by the partial-reduction and elementwise kernels."""
    return triton.autotune(configs=TILE_CONFIGS, key=TUNING_KEY,
                           prune_configs_by={"early_config_prune": prune_tile_configs},
                           do_bench=do_bench)


# ---------------------------------------------------------------------------------------------
# How the statistics reduction is split over programs (fixed by the shape, not by the config,
# so the partial buffer can be allocated before the autotuner picks a tile).

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> tuple[int, int]:
    """(programs wanted in flight, minimum elements per program)."""
    if device.type == "cuda" and not interpreting():
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()), 16384
    return 4, 2048


def _round_up(x: int, multiple: int) -> int:
    return triton.cdiv(x, multiple) * multiple


class Splits:
    """A split of the reduction domain: program ``(pid_c, s)`` reduces rows
    ``[(s // splits_k) * rows_per_split, ...)`` and, channels-first, columns
    ``[(s % splits_k) * cols_per_split, ...)`` of its channel(s)."""

    def __init__(self, rows_per_split: int, cols_per_split: int, splits_r: int, splits_k: int):
        self.rows_per_split = rows_per_split
        self.cols_per_split = cols_per_split
        self.splits_k = splits_k
        self.num = splits_r * splits_k


def stats_splits(N: int, Q: int, K: int, channels_last: bool, device: torch.device,
                 splits: int | None = None) -> Splits:
    """``splits`` forces the number of splits per channel (block); else fill the device."""
    target, min_elements = _target_programs(device)
    if channels_last:
        rows = N * Q
        channel_blocks = triton.cdiv(K, 64)
        if splits is None:
            splits = min(triton.cdiv(target, channel_blocks),
                         max(1, rows * min(K, 64) // min_elements))
        rows_per_split = _round_up(triton.cdiv(rows, max(1, min(splits, 65535))), 16)
        return Splits(rows_per_split, K, triton.cdiv(rows, rows_per_split), 1)
    if splits is None:
        splits = min(triton.cdiv(target, Q), max(1, N * K // min_elements))
    splits = max(1, min(splits, 65535))
    rows_per_split = triton.cdiv(N, min(splits, N))
    splits_r = triton.cdiv(N, rows_per_split)
    splits_k = max(1, min(triton.cdiv(splits, splits_r), triton.cdiv(K, 128)))
    # Column chunks start on multiples of 128 elements so 16-byte vector alignment survives.
    cols_per_split = _round_up(triton.cdiv(K, splits_k), 128)
    return Splits(rows_per_split, cols_per_split, splits_r, triton.cdiv(K, cols_per_split))
