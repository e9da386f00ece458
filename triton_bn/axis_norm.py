"""``BatchNorm``: batch normalization over any feature axis, with Keras' options.

Keras' ``BatchNormalization`` normalizes over every axis but ``axis`` (default -1), and
creates γ and β independently (``scale``, ``center``), each from an initializer; PyTorch's
``BatchNorm*d`` fix the feature axis at 1 and tie γ and β together (``affine``). This module
offers the Keras options with PyTorch's names, rules and state_dict keys:

    Keras                          triton_bn.BatchNorm
    axis=-1                        axis=-1        (any axis but 0, the batch axis)
    momentum=0.99                  momentum=0.01  (running = (1 - m)·running + m·batch)
    epsilon=1e-3                   eps=1e-3
    center / scale                 center / scale (β = ``bias``, γ = ``weight``)
    gamma/beta_initializer         weight_init / bias_init
    moving_mean/variance_init..    running_mean_init / running_var_init

``BatchNorm.from_keras(...)`` takes Keras' own arguments and defaults. Regularizers and
constraints are PyTorch idioms (optimizer parameter groups, ``torch.nn.utils.parametrize``);
see docs/keras.md.

An (N, ..., C) tensor with ``axis=-1`` is seen by the kernels through a ``movedim`` view:
a contiguous one is exactly their channels-last case, read and written in place, and the
output is a contiguous (N, ..., C) tensor again. No transpose, no copy.
"""
# No `from __future__ import annotations`: symbolic_trace copies forward's annotations into
# the graph, and a string one makes a traced root layer's GraphModule unpicklable.
import numbers
from typing import Callable, Optional, Union

import torch
import torch.fx
from torch.fx import Proxy
from torch.nn import Parameter
from torch.nn.modules.batchnorm import _NormBase

from .functional import feature_axis
from .modules import _check_rank, _TritonBatchNorm

torch.fx.wrap("_check_rank")  # a node when called here on a Proxy, as in modules.py

#: A value to fill with, or a callable given the tensor: either torch.nn.init style (fills
#: it in place, e.g. ``torch.nn.init.normal_``) or one returning the values to copy in.
Initializer = Union[float, Callable[[torch.Tensor], Optional[torch.Tensor]]]

# Keras' initializer names that are constants; anything else is passed as a callable.
_KERAS_CONSTANT_INITIALIZERS = {"zeros": 0.0, "ones": 1.0}


def _check_initializer(name: str, init) -> None:
    if isinstance(init, bool) or not (isinstance(init, numbers.Real) or callable(init)):
        raise TypeError(f"BatchNorm: {name} must be a float or a callable taking the tensor, "
                        f"got {type(init).__name__}")


@torch.no_grad()
def _initialize(tensor: torch.Tensor, init: Initializer) -> None:
    if not callable(init):
        tensor.fill_(float(init))
        return
    values = init(tensor)
    if isinstance(values, torch.Tensor) and values is not tensor:
        tensor.copy_(values)


class BatchNorm(_TritonBatchNorm, _NormBase):
    """Batch normalization of an (N, ...) input of any rank >= 2 over every axis but ``axis``.

    Args:
        num_features: C, the size of the feature axis.
        axis: the feature axis (default 1, as in torch; Keras' default is -1). ``axis=-1`` on
            a contiguous (N, L, C) or (N, H, W, C) tensor runs the channels-last kernels in place.
        eps, momentum, track_running_stats: as in ``torch.nn.BatchNorm*d`` (momentum=None is
            the cumulative average). Keras' momentum k is ``momentum = 1 - k``.
        center: learn β (``bias``); when False there is no ``bias`` parameter at all.
        scale: learn γ (``weight``); when False there is no ``weight`` parameter at all.
        weight_init, bias_init, running_mean_init, running_var_init: a float or a callable
            taking the tensor (``torch.nn.init`` style, in place, or returning the values).
            ``reset_parameters()`` / ``reset_running_stats()`` apply them again.

    Why ``_NormBase`` and not ``_BatchNorm`` nor a plain ``nn.Module``: ``_NormBase`` is torch's
    own code for the running buffers, ``num_batches_tracked`` and its state_dict versioning, so
    the state_dict keys are exactly ``nn.BatchNorm*d``'s (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``; absent ones are simply missing) and a BatchNorm1d
    checkpoint loads into ``BatchNorm(C, axis=-1)``. It is deliberately not a ``_BatchNorm``:
    tools that rebuild every ``_BatchNorm`` from (num_features, eps, momentum, affine,
    track_running_stats) — ``nn.SyncBatchNorm.convert_sync_batchnorm`` — would silently drop
    ``axis``, ``center`` and ``scale``. ``affine`` is True exactly when both γ and β exist, so
    code that reads ``affine`` and then uses both stays correct; ``weight is None`` and
    ``bias is None`` are the precise answers.
    """

    def __init__(self, num_features: int, axis: int = 1, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 center: bool = True, scale: bool = True, track_running_stats: bool = True,
                 weight_init: Initializer = 1.0, bias_init: Initializer = 0.0,
                 running_mean_init: Initializer = 0.0, running_var_init: Initializer = 1.0,
                 device=None, dtype=None) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"BatchNorm: num_features must be a positive int, got {num_features!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"BatchNorm: axis must be an int, got {type(axis).__name__}")
        if axis == 0:
            raise ValueError("BatchNorm: axis 0 is the batch axis; the feature axis must be another one")
        inits = {"weight_init": weight_init, "bias_init": bias_init,
                 "running_mean_init": running_mean_init, "running_var_init": running_var_init}
        for name, init in inits.items():
            _check_initializer(name, init)
        # _NormBase.__init__ ends with reset_parameters(), which reads the initializers: plain
        # attributes may be set before Module.__init__. affine=False: γ and β are made below.
        self.axis, self.center, self.scale = axis, bool(center), bool(scale)
        self.weight_init, self.bias_init = weight_init, bias_init
        self.running_mean_init, self.running_var_init = running_mean_init, running_var_init
        super().__init__(num_features, eps, momentum, False, track_running_stats, device, dtype)
        self.affine = self.center and self.scale
        factory_kwargs = {"device": device, "dtype": dtype}
        if self.scale:
            self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
        if self.center:
            self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
        self._reset_affine()

    @classmethod
    def from_keras(cls, num_features: int, *, axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-3,
                   center: bool = True, scale: bool = True,
                   beta_initializer="zeros", gamma_initializer="ones",
                   moving_mean_initializer="zeros", moving_variance_initializer="ones",
                   beta_regularizer=None, gamma_regularizer=None,
                   beta_constraint=None, gamma_constraint=None,
                   synchronized: bool = False, device=None, dtype=None) -> "BatchNorm":
        """The module equivalent to ``keras.layers.BatchNormalization(...)`` with the same
        arguments and Keras' defaults (axis=-1, momentum=0.99, epsilon=1e-3).

        Keras' momentum k weighs the old running value: ours is ``1 - k``. Initializers are
        "zeros", "ones", a float, or a callable taking the tensor. Regularizers, constraints
        and ``synchronized`` have PyTorch idioms instead (docs/keras.md); passing one raises
        rather than being silently ignored. One difference remains: Keras updates the moving
        variance with the biased batch variance, PyTorch (and this module) with the unbiased
        one, M/(M-1) larger for M elements per feature in the batch.
        """
        idioms = {
            "beta_regularizer": (beta_regularizer, "an optimizer parameter group with weight_decay=2*l on "
                                                   "module.bias (Keras L2(l) adds l*sum(beta**2) to the loss)"),
            "gamma_regularizer": (gamma_regularizer, "an optimizer parameter group with weight_decay=2*l on "
                                                     "module.weight (Keras L2(l) adds l*sum(gamma**2) to the loss)"),
            "beta_constraint": (beta_constraint, "a projection after optimizer.step() (module.bias.clamp_(...) "
                                                 "under torch.no_grad()) or torch.nn.utils.parametrize"),
            "gamma_constraint": (gamma_constraint, "a projection after optimizer.step() (module.weight.clamp_(...) "
                                                   "under torch.no_grad()) or torch.nn.utils.parametrize"),
        }
        for name, (value, idiom) in idioms.items():
            if value is not None:
                raise ValueError(f"BatchNorm.from_keras: {name} has no constructor argument in PyTorch; use "
                                 f"{idiom}. See docs/keras.md.")
        if synchronized:
            raise ValueError("BatchNorm.from_keras: synchronized=True is triton_bn.SyncBatchNorm (statistics "
                             "over torch.distributed); this module is per-process.")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm.from_keras: Keras momentum must be a float in [0, 1], got {momentum!r}")

        def keras_init(name, init):
            if isinstance(init, str):
                if init not in _KERAS_CONSTANT_INITIALIZERS:
                    raise ValueError(f"BatchNorm.from_keras: {name}={init!r} is not one of "
                                     f"{sorted(_KERAS_CONSTANT_INITIALIZERS)}; pass a float or a callable "
                                     f"taking the tensor, e.g. lambda t: torch.nn.init.normal_(t, 0.0, 0.05)")
                return _KERAS_CONSTANT_INITIALIZERS[init]
            return init

        return cls(num_features, axis=axis, eps=epsilon, momentum=round(1.0 - momentum, 15), center=center, scale=scale,
                   weight_init=keras_init("gamma_initializer", gamma_initializer),
                   bias_init=keras_init("beta_initializer", beta_initializer),
                   running_mean_init=keras_init("moving_mean_initializer", moving_mean_initializer),
                   running_var_init=keras_init("moving_variance_initializer", moving_variance_initializer),
                   device=device, dtype=dtype)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            _initialize(self.running_mean, self.running_mean_init)
            _initialize(self.running_var, self.running_var_init)
            self.num_batches_tracked.zero_()

    def _reset_affine(self) -> None:
        if self.weight is not None:
            _initialize(self.weight, self.weight_init)
        if self.bias is not None:
            _initialize(self.bias, self.bias_init)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask``: Keras 3's ``BatchNormalization.call(inputs, mask=)``, bool of the input's shape
        without the feature axis (or broadcastable to it; masked batch norm, triton_bn.mask)."""
        if isinstance(input, Proxy):  # only a tracer makes Proxies: no private tracing flag to read
            # torch.fx.symbolic_trace: a call_module leaf (modules.py says why); as the root,
            # traced through (movedim takes the axis as given, negative or not).
            leaf = self._fx_leaf(input, **({} if mask is None else {"mask": mask}))
            if leaf is not None:
                return leaf
            input = _check_rank(input, ())
            return super().forward(input.movedim(self.axis, 1), mask).movedim(1, self.axis)
        if input.dim() < 2:
            raise ValueError(f"BatchNorm: expected an input of rank >= 2 (N, ...), got {input.dim()}-D "
                             f"input of shape {tuple(input.shape)}")
        axis = feature_axis(self.axis, input.dim())
        if axis == 1:
            return super().forward(input, mask)
        # movedim is a view: the kernels read the features as dim 1 with whatever stride they
        # have (unit stride for a contiguous (N, ..., C) input: their channels-last case). The
        # mask's dims are the input's without the feature axis, which movedim keeps in order.
        return super().forward(input.movedim(axis, 1), mask).movedim(1, axis)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # Called by _TritonBatchNorm.forward on the (N, C, ...) view, before any buffer changes.
        if input.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm: expected {self.num_features} features along axis {self.axis}, "
                             f"got {input.shape[1]} (input shape {tuple(input.movedim(1, self.axis).shape)})")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, axis={self.axis}, eps={self.eps}, momentum={self.momentum}, "
                f"center={self.center}, scale={self.scale}, track_running_stats={self.track_running_stats}")


#: ``triton_bn.from_keras(C, ...)`` is ``BatchNorm.from_keras(C, ...)``.
from_keras = BatchNorm.from_keras
