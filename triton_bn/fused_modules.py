"""Layer 3: batch norm with a fused activation (and residual add) as modules.

``BatchNormAct1d/2d/3d`` subclass ``torch.nn.BatchNorm*d`` (timm's ``BatchNormAct2d`` shape):
parameters, buffers and state_dict keys are BatchNorm's, so checkpoints load both ways with
torch's, timm's and triton_bn's classes. ``forward(x, residual=None)`` computes
``act(BN(x) + residual)`` in one kernel per step (see functional.batch_norm).

``FrozenBatchNorm2d`` is torchvision's (``torchvision.ops.FrozenBatchNorm2d``): fixed
statistics and affine, stored as buffers ``weight``, ``bias``, ``running_mean``,
``running_var`` (the same state_dict keys), always normalizing with the running statistics
(the forward_eval kernel), with an optional fused activation and residual.

A ``drop`` child module (timm's norm-act layers carry one: DropBlock, DropPath, dropout), when
present, is applied to the fused output. timm applies it between the batch norm and the
activation; convert.py only moves it after an activation it commutes with (timm_layers.py).
``_origin``, when set, is the (class, modules) a converter built the layer from (revert.py).
"""
# No `from __future__ import annotations` (see modules.py: FX copies forward's annotations).
from typing import Optional, Union

import torch
import torch.fx
from torch import nn
from torch.fx import Proxy

from .functional import _batch_norm
from .kernels.activation import NAMES, activation_code, invertible
from .modules import _check_rank, _TritonBatchNorm, with_class

torch.fx.wrap("_batch_norm")
torch.fx.wrap("_check_rank")

# torch's activation modules that a fused layer can take the place of (their defaults only:
# ELU with alpha 1). ``activation_of`` reads a module's name and negative slope.
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                       nn.ELU: "elu", nn.Identity: None}


def activation_of(module: nn.Module):
    """(name, negative_slope) of an activation module the fused kernels compute, else None."""
    name = _ACTIVATION_MODULES.get(type(module), "?")
    if name == "?" or (isinstance(module, nn.ELU) and module.alpha != 1.0):
        return None
    return name, float(getattr(module, "negative_slope", 0.01))


def _activation_name(act_layer) -> Optional[str]:
    """act_layer as a name: None, a name, or one of torch's activation classes or modules."""
    if isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
        act_layer = act_layer()
    if isinstance(act_layer, nn.Module):
        found = activation_of(act_layer)
        if found is None:
            raise ValueError(f"act_layer: {type(act_layer).__name__} has no fused kernel; expected one of "
                             f"{', '.join(t.__name__ for t in _ACTIVATION_MODULES)} or a name")
        return found[0]
    activation_code(act_layer)  # ValueError naming the choices
    return act_layer


class _FusedForward:
    """forward(x, residual=None, mask=None) = act(BN(x) + residual), the batch statistics over
    the positions ``mask`` counts (modules.py); FX sees a call_module leaf."""

    act_layer: Optional[str]
    negative_slope: float
    save: str
    inplace: bool

    def _setup_fused(self, act_layer, negative_slope: float, save: str, inplace: bool):
        self.act_layer = _activation_name(act_layer)
        self.negative_slope = float(negative_slope)
        if save not in ("input", "output"):
            raise ValueError(f"save must be 'input' or 'output', got {save!r}")
        if save == "output" and not invertible(activation_code(self.act_layer), self.negative_slope):
            raise ValueError(f"save='output' needs an invertible activation (None, 'leaky_relu' with "
                             f"negative_slope > 0, 'elu'); got act_layer={self.act_layer!r}")
        if inplace and save != "output":
            raise ValueError("inplace=True needs save='output'")
        self.save, self.inplace = save, inplace

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(input, Proxy):  # only a tracer makes Proxies: no private tracing flag to read
            leaf = self._fx_leaf(input, *(() if residual is None else (residual,)),
                                 **({} if mask is None else {"mask": mask}))
            if leaf is not None:
                return leaf
            input = _check_rank(input, self._RANKS)
        else:
            self._check_input_dim(input)
        return _dropped(self, self._triton_forward(input, activation=self.act_layer,
                                                   negative_slope=self.negative_slope, residual=residual,
                                                   save=self.save, inplace=self.inplace, mask=mask))

    def extra_repr(self) -> str:
        extra = f", act_layer={self.act_layer!r}"
        if self.act_layer == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.save != "input":
            extra += f", save={self.save!r}"
        if self.inplace:
            extra += ", inplace=True"
        return super().extra_repr() + extra


def _dropped(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """y through the layer's ``drop`` module, where it has one (see the module docstring)."""
    drop = layer._modules.get("drop")
    return y if drop is None else drop(y)


class _BatchNormAct(_FusedForward, _TritonBatchNorm):
    """The constructor shared by BatchNormAct1d/2d/3d: BatchNorm's arguments, then the fused ones."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, act_layer: Union[str, type, nn.Module, None] = "relu",
                 negative_slope: float = 0.01, save: str = "input", inplace: bool = False, device=None, dtype=None,
                 **kwargs):
        # kwargs: torch's keyword-only extras (``bias=False`` in torch >= 2.12).
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self._setup_fused(act_layer, negative_slope, save, inplace)


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """act(BatchNorm1d(x) + residual) for (N, C) or (N, C, L) input."""

    _RANKS = (2, 3)


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """act(BatchNorm2d(x) + residual) for (N, C, H, W) input, NCHW or channels_last."""

    _RANKS = (4,)


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    """act(BatchNorm3d(x) + residual) for (N, C, D, H, W) input, NCDHW or channels_last_3d."""

    _RANKS = (5,)


FUSED_CLASSES = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d}


def fused_from(bn: nn.modules.batchnorm._BatchNorm, act_layer=None, negative_slope: float = 0.01,
               save: str = "input", inplace: bool = False) -> nn.Module:
    """A BatchNormAct*d sharing ``bn``'s parameters, buffers, hooks and train/eval state."""
    for torch_cls, fused_cls in FUSED_CLASSES.items():
        if isinstance(bn, torch_cls):
            new = with_class(bn, fused_cls)
            new._setup_fused(act_layer, negative_slope, save, inplace)
            return new
    raise TypeError(f"fused_from: {type(bn).__name__} is not a BatchNorm1d/2d/3d")


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d (fixed statistics and affine, buffers ``weight``,
    ``bias``, ``running_mean``, ``running_var``), computed by the eval kernel, with an optional
    fused activation: ``forward(x, residual=None) = act(BN_eval(x) + residual)``. Gradients
    flow to x and the residual only."""

    def __init__(self, num_features: int, eps: float = 1e-5, act_layer=None, negative_slope: float = 0.01):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.act_layer = _activation_name(act_layer)
        self.negative_slope = float(negative_slope)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # as torchvision: a BN checkpoint loads
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, act_layer=..., negative_slope: Optional[float] = None):
        """A frozen copy of a BatchNorm2d's current parameters and running statistics.

        ``act_layer`` (and ``negative_slope``) default to the layer's own fused activation (a
        BatchNormAct's; None for a plain BatchNorm), so a fused layer freezes with its
        activation, and, its forward taking ``(x, residual)`` as theirs, with its residual add.
        Its ``drop`` module, if any, is kept (shared)."""
        if act_layer is ...:
            act_layer = getattr(bn, "act_layer", None)
        if negative_slope is None:
            negative_slope = getattr(bn, "negative_slope", 0.01)
        frozen = cls(bn.num_features, bn.eps, act_layer, negative_slope)
        if "drop" in bn._modules:
            frozen.drop = bn._modules["drop"]
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen.to(bn.running_mean.device)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask`` is accepted as the other layers accept it and, as in their eval mode, changes
        nothing: a frozen layer normalizes with its running statistics."""
        input = _check_rank(input, (4,))
        return _dropped(self, _batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                                          0.0, self.eps, activation=self.act_layer,
                                          negative_slope=self.negative_slope, residual=residual))

    def extra_repr(self) -> str:
        act = "" if self.act_layer is None else f", act_layer={self.act_layer!r}"
        return f"{self.num_features}, eps={self.eps}{act}"


__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "FrozenBatchNorm2d", "fused_from", "activation_of",
           "NAMES"]
