"""Layer 3: ``BatchNorm1d/2d/3d`` as subclasses of torch.nn's own classes (``convert_model``,
which swaps them into a model, is convert.py, above this layer and distributed.py).

Subclassing keeps everything a model relies on — constructor, parameters, buffers,
state_dict keys, ``reset_parameters``, ``_check_input_dim``, ``isinstance`` — and only the
forward changes, to the Triton kernels. momentum=None (cumulative moving average) reads
``num_batches_tracked`` on the device, so the forward never synchronizes with the host.

``torch.fx.symbolic_trace``: torch's default tracer keeps only ``torch.nn`` modules whole (a
``call_module`` node) and traces through every other one, and tracing through torch's own
forward fails (``_check_input_dim`` branches on the traced input). So, at the top of the
forward, a traced input (an ``fx.Proxy``, one isinstance test) makes a layer emit the
``call_module`` node itself: inside a traced model every triton_bn layer is a leaf, exactly as
torch's BatchNorm is, and the GraphModule calls the module, which reads its train/eval flag
(and SyncBatchNorm its process group) when it runs. Only a layer traced as the root (torch's
own BatchNorm cannot be) is traced through, into ``functional._batch_norm``: there, as for any
traced-through code, the train/eval flag and momentum are captured at trace time.

``torch.jit.trace`` (and the legacy ONNX exporter built on it) records torch's ops only: while
it traces, batch_norm computes with them (eager.computes), so a converted model exports as
torch's would.
"""
# No `from __future__ import annotations`: symbolic_trace copies forward's annotations into
# the graph, and a string one makes a traced root layer's GraphModule unpicklable.
from typing import Optional

import torch
import torch.fx
from torch import nn
from torch.fx import Proxy

from . import eager
from .functional import _batch_norm


def _check_rank(input: torch.Tensor, ranks: tuple) -> torch.Tensor:
    """torch's ``_check_input_dim`` as a node of a traced graph (the check itself cannot run on a
    Proxy): ``input`` if its rank is one of ``ranks`` (any rank >= 2 when empty)."""
    if (input.dim() not in ranks) if ranks else input.dim() < 2:
        expected = " or ".join(f"{r}D" for r in ranks) if ranks else "at least 2D"
        raise ValueError(f"expected {expected} input (got {input.dim()}D input)")
    return input


# Calls from this module's code with a Proxy argument become call_function nodes while
# symbolic_trace runs (a root layer traced through); any other call is the plain function.
torch.fx.wrap("_check_rank")
torch.fx.wrap("_batch_norm")


def _members(module: nn.Module) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked), read without
    nn.Module.__getattr__ (~0.7 us per parameter or buffer read): torch's BatchNorm registers
    all five, as None where absent; a module that moved one elsewhere gets getattr."""
    parameters, buffers = module._parameters, module._buffers
    try:
        return (parameters["weight"], parameters["bias"], buffers["running_mean"], buffers["running_var"],
                buffers["num_batches_tracked"])
    except KeyError:
        return tuple(getattr(module, name) for name in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))


class _TritonBatchNorm:
    """The forward shared by the BatchNorm*d classes; the rest comes from torch.nn."""

    #: The input ranks ``_check_input_dim`` accepts, for a traced root layer (empty: any >= 2).
    _RANKS: tuple = ()

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask`` (masked batch norm, triton_bn.mask): bool, the input's shape without the
        channel axis (or broadcastable to it), True where a position counts in the training
        statistics; the output covers every position, and eval ignores the mask."""
        if isinstance(input, Proxy):  # only a tracer makes Proxies: no private tracing flag to read
            leaf = self._fx_leaf(input, **({} if mask is None else {"mask": mask}))
            if leaf is not None:
                return leaf
            input = _check_rank(input, self._RANKS)  # the root: traced through, flags captured
        else:
            self._check_input_dim(input)
        return self._triton_forward(input) if mask is None else self._triton_forward(input, mask=mask)

    def _triton_forward(self, input: torch.Tensor, **fused) -> torch.Tensor:
        """The batch norm of a checked input; ``fused``: batch_norm's fused keyword arguments
        (activation, negative_slope, residual, save, inplace; fused_modules.py) and ``mask``."""
        momentum = 0.0 if self.momentum is None else self.momentum
        weight, bias, running_mean, running_var, counter = _members(self)
        training = self.training
        # The step counter moves only once the arguments have passed their checks.
        counting = training and self.track_running_stats and counter is not None
        # Batch statistics in training, and in eval when no running statistics exist.
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:  # batch statistics, no running update
            running_mean = running_var = None
        if not counting:
            counter = None
        if not fused:  # straight to the eager fast path (None: a traced call, or the general path's)
            y = eager.run(input, running_mean, running_var, weight, bias, bn_training, momentum, self.eps, counter,
                          self.momentum is None)
            if y is not None:
                return y
        return _batch_norm(input, running_mean, running_var, weight, bias, bn_training, momentum, self.eps, counter,
                           self.momentum is None, **fused)

    def _fx_leaf(self, input: Proxy, *extra, **keywords):
        """Under ``torch.fx.symbolic_trace``: this layer's ``call_module`` node, as the default
        tracer emits for torch's own layers, or None when it is the root of the trace."""
        tracer = input.tracer
        path = tracer.path_of_module(self)
        if path:
            return tracer.create_proxy("call_module", path, (input, *extra), keywords)
        if isinstance(self, nn.SyncBatchNorm):
            # Whether it synchronizes is decided when it runs; a traced-through graph would
            # freeze that decision (torch's SyncBatchNorm cannot be traced as the root either).
            raise RuntimeError(f"torch.fx.symbolic_trace: {type(self).__name__} cannot be traced as the root "
                               f"module; trace a model that contains it (it is then a call_module leaf)")
        return None


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: (N, C) or (N, C, L) input."""

    _RANKS = (2, 3)


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: (N, C, H, W) input, NCHW or channels_last."""

    _RANKS = (4,)


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: (N, C, D, H, W) input, NCDHW or channels_last_3d."""

    _RANKS = (5,)


#: torch's layer classes and triton_bn's drop-in for each (convert.py, interop.py, revert.py).
_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def with_class(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` sharing ``module``'s very parameters, buffers, hooks and flags (an optimizer
    holding them keeps working); the containers are copied, so the two do not alias each
    other's dicts. How every converter here changes a layer's class."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new
