"""Masked cases (issue 20): the masks, the torch composition a user writes today, and the
implementations a masked case runs.

A masked case's mask marks the valid frames of N right-padded sequences (``make_mask``: per
sample lengths whose mean is the case's valid fraction). Torch has no masked batch norm
kernel, so its best alternative is a composition of torch ops, written here from the
semantics (not triton_bn.composite: the baseline must not come from the library under test):
the mean and the biased variance over counted positions with ``torch.where`` and sums in
float32, then normalize every position; the running statistics move by the unbiased variance
var * M / (M - 1).

Implementations on a masked case (``for_mask`` maps each of perf.impls' to its masked form):
  triton_bn      the layer-1 launchers with ``mask=``, the backward with ``mask=`` / ``inv_counts=``
  torch          the composition in eager mode; its backward through the autograd engine (the
                 only way to differentiate it), unlike the unmasked rows' direct aten calls
  torch_compile  the same composition under torch.compile(fullgraph=True, dynamic=False); its
                 backward is AOTAutograd's compiled graph, also run through the autograd engine
  torch_native   skipped: no masked kernel in torch
forward-eval is not measured on masked cases: eval normalizes from the running statistics, so
the mask does not enter it and the unmasked sweeps measure it.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .impls import EPS, MOMENTUM, Impl, TritonBN

EVAL_SKIPPED = "the mask does not enter eval (running statistics): the unmasked sweeps measure it"
NO_MASKED_KERNEL = ("no masked batch norm kernel in torch (aten / cuDNN batch_norm take no mask): "
                    "its masked alternative is the composition, rows torch and torch_compile")


def lengths(N: int, L: int, valid: float, generator: torch.Generator) -> torch.Tensor:
    """N lengths in [1, L] with mean valid * L (to rounding), spread evenly over valid * L +- half
    the room to the nearer end (a batch of unequal utterances), in a seeded order."""
    centre = valid * L
    half = max(0.0, min(centre - 1, L - centre)) / 2
    spread = torch.linspace(centre - half, centre + half, N, dtype=torch.float64)
    return spread.round().clamp(1, L).long()[torch.randperm(N, generator=generator)]


def make_mask(case, device, seed: int = 0) -> torch.Tensor:
    """The (N, L) bool mask of a masked (N, C, L) case: True on each sample's first frames."""
    from triton_bn import lengths_to_mask
    if len(case.shape) != 3:
        raise ValueError(f"masked cases are (N, C, L) BatchNorm1d inputs, got {case.shape_str}")
    N, _, L = case.shape
    g = torch.Generator().manual_seed(seed)
    return lengths_to_mask(lengths(N, L, case.valid, g).to(device), L)


def masked_batch_norm_train(x, mask, weight, bias, running_mean, running_var, momentum: float = MOMENTUM,
                            eps: float = EPS):
    """The torch composition: (y in x's dtype, mean, invstd) with mean / invstd float32 (float64
    for float64 x) of shape (1, C, 1, ...); the running statistics updated in place.
    Differentiable in x, weight, bias."""
    m = mask.unsqueeze(1)  # (N, 1, *spatial): broadcast over the channels
    dims = [0, *range(2, x.dim())]
    count = m.sum(dims, keepdim=True)
    # Sums in (at least) float32: half precision would lose small terms among M ~ 10^5 of them.
    acc = torch.promote_types(x.dtype, torch.float32)
    mean = torch.where(m, x, 0).sum(dims, keepdim=True, dtype=acc) / count
    centered = x.to(acc) - mean
    var = torch.where(m, centered.square(), 0).sum(dims, keepdim=True) / count
    invstd = torch.rsqrt(var + eps)
    y = centered * invstd * weight.view(mean.shape) + bias.view(mean.shape)
    with torch.no_grad():
        running_mean.lerp_(mean.flatten().to(running_mean.dtype), momentum)
        unbiased = var * count / (count - 1).clamp(min=1)
        running_var.lerp_(unbiased.flatten().to(running_var.dtype), momentum)
    return y.to(x.dtype), mean, invstd


class MaskedImpl(Impl):
    """An implementation of masked cases, bound to one case's mask by ``bound``."""
    mask: Optional[torch.Tensor] = None

    def bound(self, mask: torch.Tensor) -> "MaskedImpl":
        impl = copy.copy(self)
        impl.mask = mask
        return impl

    def forward_eval(self, x, weight, bias, running_mean, running_var):
        raise NotImplementedError(EVAL_SKIPPED)


class TritonMasked(MaskedImpl, TritonBN):
    description = ("triton_bn layer-1 launchers with mask= (statistics over counted positions) and the "
                   "backward with mask= / inv_counts=; the unmasked launch counts")

    def forward_train(self, x, weight, bias, running_mean, running_var):
        from triton_bn.kernels import bn_forward_train
        y, mean, invstd, inv_counts = bn_forward_train(x, weight, bias, running_mean, running_var, MOMENTUM, EPS,
                                                       mask=self.mask)
        return y, (mean, invstd, inv_counts)

    def backward(self, dy, x, weight, saved):
        from triton_bn.kernels import bn_backward
        mean, invstd, inv_counts = saved
        return bn_backward(dy, x, weight, mean, invstd, EPS, True, mask=self.mask, inv_counts=inv_counts)


class TorchComposition(MaskedImpl):
    """The composition in eager mode: forward_train records the autograd graph a training step
    records (x, weight, bias as leaves that require grad); backward runs it (retain_graph, so
    that the backward alone can be timed again and again on one forward's graph)."""
    name = "torch"
    description = ("torch composition, eager: masked mean/var with torch.where and float32 sums, then "
                   "normalize; backward through the autograd engine (no masked aten op to call)")

    def _run(self, *args):
        return masked_batch_norm_train(*args)

    def forward_train(self, x, weight, bias, running_mean, running_var):
        leaves = tuple(t.detach().requires_grad_() for t in (x, weight, bias))
        y, mean, invstd = self._run(leaves[0], self.mask, leaves[1], leaves[2], running_mean, running_var)
        return y, (mean.detach().flatten(), invstd.detach().flatten(), y, leaves)

    def backward(self, dy, x, weight, saved):
        *_, y, leaves = saved
        return torch.autograd.grad(y, leaves, dy, retain_graph=True)

    def config(self, op: str) -> str:
        return "eager torch ops + autograd"


class CompiledComposition(TorchComposition):
    """The composition compiled whole (forward and, through AOTAutograd, backward); the graphs
    are dropped between cases, as perf.impls.TorchCompile's are."""
    name = "torch_compile"
    description = ("the torch composition under torch.compile(fullgraph=True, dynamic=False) (Inductor); "
                   "its AOTAutograd backward run through the autograd engine")

    def __init__(self, unmasked: Optional[Impl] = None):
        self.unmasked = unmasked  # perf.impls.TorchCompile: when it is skipped, so is this
        self._compiled = None

    def unavailable(self) -> Optional[str]:
        return self.unmasked.unavailable() if self.unmasked is not None else None

    def prepare(self) -> None:
        torch._dynamo.reset()
        self._compiled = torch.compile(masked_batch_norm_train, dynamic=False, fullgraph=True)

    def _run(self, *args):
        return self._compiled(*args)

    def config(self, op: str) -> str:
        return "torch.compile(mode=default, dynamic=False, fullgraph=True) + AOTAutograd backward"


class NoMaskedKernel(MaskedImpl):
    def __init__(self, name: str):
        self.name = name

    def unavailable(self) -> Optional[str]:
        return NO_MASKED_KERNEL


MASKED_FORMS = {"triton_bn": lambda impl: TritonMasked(), "torch": lambda impl: TorchComposition(),
                "torch_compile": CompiledComposition}


def for_mask(impl: Impl, mask: torch.Tensor) -> MaskedImpl:
    """``impl``'s masked form bound to ``mask`` (a masked implementation is bound as it is)."""
    if not isinstance(impl, MaskedImpl):
        impl = MASKED_FORMS.get(impl.name, lambda impl: NoMaskedKernel(impl.name))(impl)
    return impl.bound(mask)
