"""Correctness before timing: every implementation's outputs against a float64 reference.

A fast wrong kernel must show up as an error, never as a number. The reference is the math of
design.md evaluated in float64 on the upcast inputs (not torch's batch_norm, which is one of
the implementations under test):

    mean, var (biased) over all but dim 1;  invstd = 1 / sqrt(var + eps);  xhat = (x - mean) invstd
    y = xhat w + b;  running_mean' = (1-m) rm + m mean;  running_var' = (1-m) rv + m var M/(M-1)
    y_eval = (x - rm) / sqrt(rv + eps) w + b
    db = sum dy;  dw = sum dy xhat;  dx = w invstd (dy - db/M - xhat dw/M)

With a mask (issue 20; m = 1 where a position counts, 0 where not, M = sum m per channel) the
statistics and the running update are over counted positions only, y and eval are unchanged,
and so are db and dw (sums over ALL positions: y depends on every dy); dx is the exact gradient
of that function: dx = w invstd (dy - m (db/M + xhat dw/M)).

Tolerances are relative to max(1, max|reference|) and loose enough for any correct
implementation (fp32 accumulation, output rounding) yet far below what a wrong one produces.
"""
from __future__ import annotations

from typing import Optional

import torch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}


def mismatch(name: str, actual: Optional[torch.Tensor], expected: torch.Tensor,
             dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when ``actual`` matches, else a sentence saying where and by how much.

    ``dtype``, when given, is the dtype ``actual`` must have (outputs keep the input's). The
    tolerance follows ``actual``'s own dtype: an implementation may keep its saved statistics
    in half precision (Inductor does for half input), which is its choice, not an error.
    """
    if actual is None:
        return f"{name}: missing"
    if dtype is not None and actual.dtype != dtype:
        return f"{name}: dtype {actual.dtype}, expected {dtype}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return None
    relative_tol = TOLERANCE.get(actual.dtype, TOLERANCE[torch.float32])
    actual = actual.detach().to(torch.float64)
    bad = ~torch.isfinite(actual)
    if bad.any():
        return f"{name}: {int(bad.sum())} non-finite elements"
    tol = relative_tol * max(1.0, expected.abs().max().item())
    err = (actual - expected).abs()
    worst = err.max().item()
    if worst <= tol:
        return None
    flat = int(err.argmax())
    return (f"{name}: max abs error {worst:.3e} > {tol:.1e} at flat index {flat} "
            f"(got {actual.flatten()[flat].item():.6g}, expected {expected.flatten()[flat].item():.6g}); "
            f"{int((err > tol).sum())} of {err.numel()} elements off")


def first_mismatch(pairs) -> Optional[str]:
    for name, actual, expected in pairs:
        problem = mismatch(name, actual, expected)
        if problem:
            return problem
    return None


class Reference:
    """float64 results for one case's inputs, computed on first use and kept until ``clear``."""

    def __init__(self, x, dy, weight, bias, running_mean, running_var, momentum: float, eps: float,
                 mask: Optional[torch.Tensor] = None):
        self.x, self.dy = x, dy
        self.weight, self.bias = weight.double(), bias.double()
        self.running_mean, self.running_var = running_mean.double(), running_var.double()
        self.momentum, self.eps = momentum, eps
        self.dims = [d for d in range(x.dim()) if d != 1]
        # mask (N, *spatial) bool -> m (N, 1, *spatial) of 0 / 1, broadcast over the channels
        self.m = None if mask is None else mask.unsqueeze(1).double()
        self.count = x.numel() // x.shape[1] if mask is None else int(mask.sum())
        self._stats = None

    def _per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.view([1, -1] + [1] * (self.x.dim() - 2))

    def stats(self):
        if self._stats is None:
            x64 = self.x.double()
            if self.m is None:
                mean = x64.mean(self.dims)
                var = x64.var(self.dims, correction=0)
            else:
                mean = (x64 * self.m).sum(self.dims) / self.count
                var = ((x64 - self._per_channel(mean)).square() * self.m).sum(self.dims) / self.count
            self._stats = mean, var, (var + self.eps).rsqrt()
        return self._stats

    def _xhat(self):
        mean, _, invstd = self.stats()
        return (self.x.double() - self._per_channel(mean)) * self._per_channel(invstd)

    def check_train(self, y, save_mean, save_invstd, running_mean, running_var) -> Optional[str]:
        mean, var, invstd = self.stats()
        m = self.momentum
        expected_rm = (1 - m) * self.running_mean + m * mean
        expected_rv = (1 - m) * self.running_var + m * var * self.count / max(self.count - 1, 1)
        problem = first_mismatch([("save_mean", save_mean, mean), ("save_invstd", save_invstd, invstd),
                                  ("running_mean", running_mean, expected_rm),
                                  ("running_var", running_var, expected_rv)])
        if problem:
            return problem
        y_ref = self._xhat() * self._per_channel(self.weight) + self._per_channel(self.bias)
        return mismatch("y", y, y_ref, self.x.dtype)

    def check_eval(self, y) -> Optional[str]:
        scale = (self.running_var + self.eps).rsqrt() * self.weight
        y_ref = (self.x.double() - self._per_channel(self.running_mean)) * self._per_channel(scale) \
            + self._per_channel(self.bias)
        return mismatch("y (eval)", y, y_ref, self.x.dtype)

    def check_backward(self, dx, dweight, dbias) -> Optional[str]:
        _, _, invstd = self.stats()
        dy64 = self.dy.double()
        xhat = self._xhat()
        db = dy64.sum(self.dims)
        dw = (dy64 * xhat).sum(self.dims)
        problem = first_mismatch([("dbias", dbias, db), ("dweight", dweight, dw)])
        if problem:
            return problem
        correction = self._per_channel(db / self.count) + xhat * self._per_channel(dw / self.count)
        dx_ref = self._per_channel(self.weight * invstd) * (
            dy64 - (correction if self.m is None else self.m * correction))
        return mismatch("dx", dx, dx_ref, self.x.dtype)
