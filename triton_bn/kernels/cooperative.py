"""Layer 1: one-read batch norm where one program cannot hold a slab: a cooperative grid (issue 21);
its kernels and barrier in cooperative_kernels.py.

onchip.py reads x once where one program holds a channel (block)'s whole slab. Here the slab
is split over G programs, each holding its [BLOCK_R, BLOCK_K] part in registers, and the G
programs of a channel (block) meet at grid barriers (docs/cooperative.md):

    forward, training   x -> part moments -> | owners merge, running stats | -> y          2·T·e
    backward            x (or y), dy [, r] -> part sums -> | owners add, dgamma, dbeta | -> dx   3·T·e

Phase 1 writes each part's (shifted mean, M2, count, pivot) (backward: sum dz, sum dz (x - mean))
to a [fields, G, C] buffer, the split path's layout; phase 2: the owner of a channel, program
``channel % G`` of its block, merges that channel's G parts with the split path's own code
(combine._combine_channels: save_mean, save_invstd, the running statistics exactly once;
backward._combine_sums: the sums, dgamma, dbeta); phase 3 normalizes (forms dx) from the
registers. The numerics are the split path's for its split into these G parts; the step counter
moves by helpers._count_step, as in onchip.py.

PHASE: 0 on a GPU, all three phases in one cooperative launch with a barrier between them; 1, 2,
3 under the interpreter, which runs programs one at a time (a barrier there would wait forever):
three launches over the same buffers, the same arithmetic, phase 3 reloading what a GPU keeps
in registers. The barriers' counters come from tickets.py (one per channel block, zero between
launches: the last program to leave resets it), so CUDA graphs and zero_after_error hold as
for the other kernels. Not autotuned (the running statistics move in place); the plan
(cooperative_plan_for) is a function of the shape and the SM count.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from .cooperative_kernels import _bn_cooperative_backward_kernel, _bn_cooperative_forward_kernel
from .helpers import _combine_block, split_float
from .launch import Launch, fresh, tensor_key
from .stats import acc_dtype, tl_dtype
from .tickets import tickets as _tickets
from .onchip import one_read_outputs
from .tuning import (COOPERATIVE_MAX_REGISTERS, COOPERATIVE_VALUES_PER_THREAD, COOPERATIVE_WARPS, SM_COUNT_ASSUMED,
                     _sm_count, cdiv, co_resident_programs, cooperative_enabled, interpreting)
from .view import NQKView, addressing, empty_output, mask_strides, mergeable, nqk_view, output_geometry


_FORWARD = Launch(_bn_cooperative_forward_kernel)
_BACKWARD = Launch(_bn_cooperative_backward_kernel)


@functools.lru_cache(maxsize=4096)
def cooperative_tile(N: int, Q: int, K: int, channels_last: bool, itemsize: int, sm_count: int, elements: int = 0):
    """(BLOCK_R, BLOCK_K, num_warps, G, channel blocks) of the cooperative kernels for this [N, Q, K]
    view, or None when the G x channel-blocks programs cannot all be resident on ``sm_count`` SMs
    (tuning.co_resident_programs). ``elements``: padded elements per program (default: the values
    per thread of tuning on its warps; tests pass small ones for many programs on small inputs).
    Channels-last: 128 bytes of channels per block, its N * Q rows split; channels-first: the
    channel's N x K slab in [BLOCK_R, BLOCK_K] parts, BLOCK_K = next_pow2(K) up to the part size."""
    if N <= 0 or Q <= 0 or K <= 0:
        return None
    values = COOPERATIVE_VALUES_PER_THREAD // (2 if itemsize == 8 else 1)
    elements = elements or values * 32 * COOPERATIVE_WARPS
    if channels_last:
        block_k = min(triton.next_power_of_2(K), max(1, 128 // itemsize), elements)
        block_r = min(elements // block_k, triton.next_power_of_2(N * Q))
        splits, channel_blocks = cdiv(N * Q, block_r), cdiv(K, block_k)
    else:
        block_k = min(triton.next_power_of_2(K), elements)
        block_r = min(elements // block_k, triton.next_power_of_2(N))
        splits, channel_blocks = cdiv(N, block_r) * cdiv(K, block_k), Q
    num_warps = max(1, min(COOPERATIVE_WARPS, block_r * block_k // (32 * values)))
    if splits * channel_blocks > co_resident_programs(sm_count, num_warps):
        return None
    return block_r, block_k, num_warps, splits, channel_blocks


def device_sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not interpreting():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return SM_COUNT_ASSUMED


def cooperative_plan_for(view: NQKView, elements: int = 0) -> Optional[tuple]:
    """The plan (cooperative_tile) when the switch is on (tuning.cooperative_enabled) and the
    view's grid can be co-resident on its device, else None (then the split path serves)."""
    if not cooperative_enabled.on:
        return None
    x = view.tensor
    return cooperative_tile(view.N, view.Q, view.K, view.channels_last, x.element_size(), device_sm_count(x.device),
                            elements)


def _phases(exchange: bool) -> tuple:
    """One launch with barriers on a GPU; the interpreter runs the phases as launches of their own."""
    if not interpreting():
        return (0,)
    return (1, 2, 3) if exchange else (3,)


def _launch_options(phase: int, num_warps: int) -> dict:
    """A barrier launch must be co-resident: cooperative (CUDA refuses a grid that is not), and
    the registers capped so that tuning.co_resident_programs holds for every compiled variant."""
    if phase != 0:
        return dict(num_warps=num_warps)
    return dict(num_warps=num_warps, maxnreg=COOPERATIVE_MAX_REGISTERS, launch_cooperative_grid=True)


def bn_cooperative_forward(view: NQKView, plan: tuple, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                           momentum: Optional[float], eps: float, num_batches_tracked: Optional[torch.Tensor] = None,
                           *, activation: int = 0, negative_slope: float = 0.01,
                           residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                           mask: Optional[NQKView] = None):
    """(y, save_mean, save_invstd), x read once; running statistics (contiguous) updated in place
    once. ``plan`` from cooperative_plan_for(view); the rest as kernels.bn_forward_train
    (``mask``, view.mask_view: (y, save_mean, save_invstd, inv_counts) as onchip.bn_onchip_forward)."""
    x = view.tensor
    block_r, block_k, num_warps, G, blocks = plan
    y = fresh(empty_output(view)) if out is None else out
    y_view = NQKView(y, *output_geometry(view, y, allocated=out is None))
    r_view = None if residual is None else nqk_view(mergeable(residual), view.channels_last)
    residual = None if r_view is None else r_view.tensor
    acc = acc_dtype(x.dtype)
    partial = fresh(torch.empty((4, G, view.C), dtype=acc, device=x.device))
    mean = fresh(torch.empty(view.C, dtype=acc, device=x.device))
    invstd = fresh(torch.empty_like(mean))
    m = None if mask is None else mask.tensor
    inv_counts = None if mask is None else fresh(torch.empty((view.C, 2), dtype=torch.float32, device=x.device))
    update, count, cumulative = running_mean is not None, num_batches_tracked is not None, momentum is None
    tickets = _tickets(x.device, blocks + 1)
    tensors = tuple(t for t in (x, residual, y, partial, mean, invstd, inv_counts, m, weight, bias, running_mean,
                                running_var, num_batches_tracked, tickets) if t is not None)
    key = (view[1:], y_view[1:], None if r_view is None else r_view[1:], activation, update, count, plan,
           tensor_key(x, residual, y, weight, bias, running_mean, running_var, num_batches_tracked, m),
           momentum, eps, negative_slope, None if mask is None else mask[1:])
    for phase in _phases(True):
        def build(phase=phase):
            args = (x, residual, y, partial, mean, invstd, inv_counts, m, weight, bias, running_mean, running_var,
                    num_batches_tracked, tickets, view.N, view.Q, view.K, view.C, G, *view.strides,
                    *(view.strides if r_view is None else r_view.strides), *y_view.strides, *mask_strides(mask),
                    *split_float(0.0 if cumulative else momentum), float(eps), *split_float(negative_slope))
            constexprs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE_RUNNING=update,
                              COUNT_STEP=count, CUMULATIVE_AVERAGE=cumulative, CHANNELS_LAST=view.channels_last,
                              ACC_DTYPE=tl_dtype(x.dtype), ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
                              **addressing(view, y_view, r_view, mask), MASKED=m is not None, PHASE=phase,
                              BLOCK_P=_combine_block(block_r, block_k, view.channels_last), BLOCK_R=block_r,
                              BLOCK_K=block_k, **_launch_options(phase, num_warps))
            return (G * blocks,), args, constexprs, ()
        _FORWARD.run(key + (phase,), tensors, build)
    return (y, mean, invstd) if m is None else (y, mean, invstd, inv_counts)


def bn_cooperative_backward(view: NQKView, plan: tuple, dy: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor,
                            weight: Optional[torch.Tensor], eps: float, training: bool, needs: tuple,
                            param_dtype: Optional[torch.dtype] = None, *, bias: Optional[torch.Tensor] = None,
                            activation: int = 0, negative_slope: float = 0.01,
                            residual: Optional[torch.Tensor] = None, from_output: bool = False,
                            mask: Optional[NQKView] = None, inv_counts: Optional[torch.Tensor] = None):
    """(dx, dweight, dbias, dresidual), each None where ``needs`` (need_dx, need_dw, need_db,
    need_dr) says no; x (or y), dy [, r] read once; arguments as kernels.bn_backward (``mask``
    and ``inv_counts``: a masked training forward's, as onchip.bn_onchip_backward)."""
    need_dx, need_dw, need_db, need_dr = needs
    if not (need_dx or need_dw or need_db or need_dr):
        return None, None, None, None
    x = view.tensor
    block_r, block_k, num_warps, G, blocks = plan
    fused, bias, residual, dy_view, r_view, dx, dr, dx_view, d_weight, d_bias = one_read_outputs(
        view, dy, weight, bias, residual, activation, from_output, needs, param_dtype)
    sums_needed = training or need_dw or need_db
    acc = acc_dtype(x.dtype)
    partial = fresh(torch.empty((2, G, view.C), dtype=acc, device=x.device)) if sums_needed else None
    sums = fresh(torch.empty((2, view.C), dtype=acc, device=x.device)) if sums_needed else None
    tickets = _tickets(x.device, blocks) if sums_needed else None
    masked = mask is not None and training and need_dx
    m, inv_counts = (mask.tensor, inv_counts) if masked else (None, None)
    tensors = tuple(t for t in (x, dy, residual, dx, dr, partial, sums, mean, stat, inv_counts, m, weight, bias,
                                d_weight, d_bias, tickets) if t is not None)
    key = (view[1:], dy_view[1:], dx_view[1:], None if r_view is None else r_view[1:], training, activation,
           from_output, need_dx, need_dr, plan, tensor_key(x, dy, residual, dx, dr, mean, stat, weight, bias, d_weight,
                                                           d_bias, m, inv_counts), eps, negative_slope,
           mask[1:] if masked else None)
    for phase in _phases(sums_needed):
        def build(phase=phase):
            args = (x, dy, residual, dx, dr, partial, sums, mean, stat, inv_counts, m, weight, bias, d_weight, d_bias,
                    tickets, view.N, view.Q, view.K, view.C, G, *view.strides, *dy_view.strides,
                    *(view.strides if r_view is None else r_view.strides), *dx_view.strides,
                    *mask_strides(mask if masked else None),
                    *split_float(1.0 / max(view.per_channel, 1)), float(eps), *split_float(negative_slope))
            constexprs = dict(TRAINING=training, STAT_IS_VAR=not training, HAS_WEIGHT=weight is not None,
                              HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_RESIDUAL=residual is not None,
                              FROM_OUTPUT=from_output, FUSED=fused, WRITE_DX=need_dx, WRITE_DRESIDUAL=need_dr,
                              HAS_GRAD_WEIGHT=need_dw, HAS_GRAD_BIAS=need_db, CHANNELS_LAST=view.channels_last,
                              ACC_DTYPE=tl_dtype(x.dtype), **addressing(view, dy_view, dx_view, r_view,
                                                                        mask if masked else None),
                              MASKED=masked, PHASE=phase,
                              BLOCK_P=_combine_block(block_r, block_k, view.channels_last), BLOCK_R=block_r,
                              BLOCK_K=block_k, **_launch_options(phase, num_warps))
            return (G * blocks,), args, constexprs, ()
        _BACKWARD.run(key + (phase,), tensors, build)
    return dx, d_weight, d_bias, dr
