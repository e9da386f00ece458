"""Layer 2b: eager batch norm's fast path (over layer 1, kernels/ and its replays): each call
signature checked once, then launched from its recordings.

An eager call (a plain ``torch.Tensor``, no tracer, no torch.func transform; save="input",
not in place) whose per-channel vectors are None or 1-D and contiguous is described
completely by its *signature*:

    input        shape, strides, dtype, device, 16-byte alignment
    each vector  running_mean, running_var, weight, bias, num_batches_tracked:
                 None, or dtype, device, shape, strides, 16-byte alignment
    residual     None, or as a vector
    the rest     training, momentum, eps, cumulative average (momentum=None), activation,
                 negative_slope

``checks.check_fused`` (without in-place, its one per-call case) and ``checks.check_args``
read nothing else, so a signature that passed them once passes again: later calls skip them.
Every decision the launchers make is a function of it too, so the signature is also the key
of their replays (``keyed``; kernels/replay.py): their own key, a ``_meta`` per argument, is
not computed again. A call then costs the signature, one dict lookup, the autograd node when
something needs a gradient, the allocations and the launches.

Anything else (a traced call, save="output" or in place, strided vectors, an empty input, a
device without kernels) gets ``None`` from ``run`` and takes functional.py's general
path, which makes the same checks and launches the same kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checks import check_args, check_fused
from .function import functorch_active, gradients, param_dtype, traced
from .kernels import bn_backward, bn_forward_eval, bn_forward_train
from .kernels.tuning import cpu_kernels

_CALLS: dict = {}
_MAX_CALLS = 4096  # signatures differ by value in momentum and eps: a schedule must not grow this forever
_GENERAL = object()  # a signature functional.py's general path serves
_jit_tracing = torch._C._is_tracing


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether ``x`` runs through the Triton kernels (vs. torch's fallback)."""
    return x.is_cuda or (cpu_kernels() and x.is_cpu)


def computes(input: torch.Tensor) -> bool:
    """Whether the kernels compute a batch norm of ``input``: at least 2-D, not empty (torch's
    own semantics serve those), on a device with kernels, and not while ``torch.jit`` traces:
    its tracer (the legacy ONNX exporter's) records torch's own ops only and cannot see into a
    Triton launch, so there the call computes with torch's ops (functional.py's fallback).
    ``torch.jit.is_tracing``, not the C++ flag it reads: torch.compile folds it to False."""
    return input.dim() >= 2 and input.numel() > 0 and uses_kernels(input) and not torch.jit.is_tracing()


def run(input, running_mean, running_var, weight, bias, training, momentum, eps, counter, cumulative_average,
        activation=None, negative_slope=0.01, residual=None) -> Optional[torch.Tensor]:
    """The batch norm, launched from the recordings of this call's signature (checked, and
    raising torch's error, the first time), or None when the general path must serve it. The
    caller passes save="input", inplace=False, no mask, and a float ``negative_slope`` and
    str-or-None ``activation`` (hashable). One function from the signature to the launcher:
    each Python frame between a module's forward and the replay is ~0.2 us a call."""
    # torch.jit's tracer (computes): its C++ flag, which torch.jit.is_tracing reads after a
    # scripting test; torch.compile never gets this far (traced).
    if traced(input) or functorch_active() or _jit_tracing():
        return None
    # Each vector's (dtype, device, shape, strides, alignment) written out: a helper function
    # per vector was ~0.1 us a call, 5 calls per signature.
    rm, rv, w, b, n, r = running_mean, running_var, weight, bias, counter, residual
    key = (input.shape, input.stride(), input.dtype, input.device, input.data_ptr() & 15, training, momentum, eps,
           cumulative_average, activation, negative_slope,
           None if rm is None else (rm.dtype, rm.device, rm.shape, rm.stride(), rm.data_ptr() & 15),
           None if rv is None else (rv.dtype, rv.device, rv.shape, rv.stride(), rv.data_ptr() & 15),
           None if w is None else (w.dtype, w.device, w.shape, w.stride(), w.data_ptr() & 15),
           None if b is None else (b.dtype, b.device, b.shape, b.stride(), b.data_ptr() & 15),
           None if n is None else (n.dtype, n.device, n.shape, n.stride(), n.data_ptr() & 15),
           None if r is None else (r.dtype, r.device, r.shape, r.stride(), r.data_ptr() & 15))
    call = _CALLS.get(key)
    if call is None:
        call = _prepare(key, input, running_mean, running_var, weight, bias, training, momentum, eps, counter,
                        cumulative_average, activation, negative_slope, residual)
        if len(_CALLS) >= _MAX_CALLS:
            _CALLS.clear()
        _CALLS[key] = call
    if call is _GENERAL:
        return None
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        return _apply(call, input, weight, bias, residual, (running_mean, running_var, counter))
    return call.forward(input, weight, bias, running_mean, running_var, counter, residual)[0]


class _Signature(tuple):
    """A call signature that hashes once: the launchers' replay keys (replay.py) hold it and
    are looked up on every call."""

    def __new__(cls, key: tuple):
        signature = super().__new__(cls, key)
        signature._hash = tuple.__hash__(signature)
        return signature

    def __hash__(self):
        return self._hash


def _prepare(key, input, running_mean, running_var, weight, bias, training, momentum, eps, counter,
             cumulative_average, activation, negative_slope, residual):
    vectors = (running_mean, running_var, weight, bias)
    code = check_fused(input, activation, negative_slope, residual, "input", False)  # raises: nothing kept
    if not computes(input) or any(t is not None and not (t.dim() == 1 and t.is_contiguous()) for t in vectors):
        return _GENERAL
    check_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    fused = None if code == 0 and residual is None else dict(activation=code, negative_slope=float(negative_slope))
    return _Call(_Signature(key), training, None if cumulative_average and counter is not None else float(momentum),
                 float(eps), param_dtype(weight, bias, input), fused)


class _Call:
    """One checked signature: the launchers' scalar arguments and the forward's replay key
    (the backward's holds it: EagerBatchNormFunction.backward).
    ``fused``: the epilogue's keyword arguments (activation code, negative_slope), or None
    for plain batch norm, whose launches take positional arguments only. ``keeps_residual``:
    the backward reads the residual back (z needs it under an activation)."""

    __slots__ = ("key", "training", "momentum", "eps", "param_dtype", "fused", "keeps_residual")

    def __init__(self, key, training, momentum, eps, param_dtype, fused):
        self.key, self.training, self.momentum, self.eps = key, training, momentum, eps
        self.param_dtype, self.fused = param_dtype, fused
        self.keeps_residual = fused is not None and fused["activation"] != 0

    def forward(self, input, weight, bias, running_mean, running_var, counter, residual):
        """(y, mean, stat): save_mean and save_invstd in training, the running statistics in
        eval (what the backward reads). The statistics kernel counts the step (training only)."""
        fused = self.fused
        if self.training:
            if fused is None:
                return bn_forward_train.keyed(self.key, input, weight, bias, running_mean, running_var,
                                              self.momentum, self.eps, counter)
            return bn_forward_train.keyed(self.key, input, weight, bias, running_mean, running_var, self.momentum,
                                          self.eps, counter, residual=residual, **fused)
        if fused is None:
            y = bn_forward_eval.keyed(self.key, input, weight, bias, running_mean, running_var, self.eps)
        else:
            y = bn_forward_eval.keyed(self.key, input, weight, bias, running_mean, running_var, self.eps,
                                      residual=residual, **fused)
        return y, running_mean, running_var


class EagerBatchNormFunction(torch.autograd.Function):
    """BatchNormFunction's eager twin, for calls outside tracers and torch.func: one output
    (the statistics are saved, not returned), ``forward(ctx, ...)`` with no setup_context, the
    checked call as its first argument: autograd wraps one tensor and makes one Python call
    per direction."""

    @staticmethod
    def forward(ctx, call, input, weight, bias, residual, statistics):
        # statistics: (running_mean, running_var, counter), one argument that autograd does not
        # look into (none of them gets a gradient): ~0.1 us per tensor argument of apply.
        y, mean, stat = call.forward(input, weight, bias, *statistics, residual)
        ctx.save_for_backward(input, weight, bias, mean, stat, residual if call.keeps_residual else None)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx, grad_output):
        """(dx, dweight, dbias, dresidual) where ``needs_input_grad`` asks for them; the residual
        saved only where an activation reads it back."""
        input, weight, bias, mean, stat, residual = ctx.saved_tensors
        n, call = ctx.needs_input_grad, ctx.call
        needs, fused = (n[1], n[2], n[3], n[4]), call.fused
        if torch.is_grad_enabled() or traced(grad_output):  # double backward, or a traced backward
            dx, dw, db, dr = gradients(grad_output, input, weight, bias, mean, stat, needs, call.training, call.eps,
                                       call.param_dtype, residual, **(fused or {}))
            return None, dx, dw, db, dr, None
        # autograd hands a gradient of y's shape, dtype and device; its strides and alignment are
        # its own. The saved x is the forward's unless a saved-tensors hook made a copy (new
        # strides); mean and invstd are fresh allocations (allocator-aligned) or the running
        # statistics, whose metadata is in the forward's key, as is the residual's.
        key = (call.key, grad_output.stride(), grad_output.dtype, grad_output.data_ptr() & 15, input.stride(),
               input.data_ptr() & 15, needs)
        if fused is None:
            dx, dw, db = bn_backward.keyed(key, grad_output, input, weight, mean, stat, call.eps, call.training,
                                           needs[:3], None, call.param_dtype)
            return None, dx, dw, db, None, None
        dx, dw, db, dr = bn_backward.keyed(key, grad_output, input, weight, mean, stat, call.eps, call.training,
                                           needs, None, call.param_dtype, bias=bias, residual=residual, **fused)
        return None, dx, dw, db, dr, None


# Straight to the C++ apply: Function.apply's Python (functorch unwrapping) has nothing to do
# here, run() having turned torch.func transforms away.
_apply = super(torch.autograd.Function, EagerBatchNormFunction).apply
