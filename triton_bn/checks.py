"""Layer 2b: batch_norm's argument checks, with torch's error classes and messages (over
layer 1, kernels/).

Every check runs before any kernel, so a bad call never leaves running statistics
half-updated. ``check_args`` reads only what eager.py's call signature holds (shapes, dtypes,
devices, the scalar arguments): a signature that passed it once need not be checked again.
"""
from __future__ import annotations

import torch

from .kernels import activation_code, check_writable, invertible
from .kernels.activation import LEAKY_RELU

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _scalar_type_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype, as its error messages print it ('Long', 'ComplexFloat')."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, check_count=True):
    """torch's checks and messages, in torch's order: F.batch_norm's Python checks (count, eps),
    the binding's argument types, then ATen's (sizes, running statistics, dtype, devices).
    ``check_count=False`` skips "more than 1 value per channel" (SyncBatchNorm: the count that
    matters is global, on the device)."""
    if training and check_count:
        size = input.shape
        per_channel = size[0]
        for s in size[2:]:
            per_channel *= s
        if per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    # torch 2.12 - 2.15's eps rule (the newest torch's), kept on every torch: torch 2.9 checks
    # no eps, 2.11 refuses eps <= 0 in eval too ("batch_norm eps must be positive").
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if momentum is None:
        raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not NoneType")
    C = input.shape[1]
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, t in params.items():
        if t is None:
            if not training and name.startswith("running"):
                raise RuntimeError(f"{name} must be defined in evaluation mode")
        elif t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_scalar_type_name(input.dtype)}'")
    for name, t in params.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on "
                               f"{t.device} and input is on {input.device}")
    dtypes = {t.dtype for t in params.values() if t is not None}
    allowed = {input.dtype, torch.float32} if input.dtype in _HALF_DTYPES else {input.dtype}
    if len(dtypes) > 1 or not dtypes <= allowed:
        got = ", ".join(f"{n}={t.dtype}" for n, t in params.items() if t is not None)
        raise RuntimeError(f"mixed dtype: batch_norm parameters and running statistics must share one "
                           f"dtype, the input's ({input.dtype})"
                           + (" or float32" if input.dtype in _HALF_DTYPES else "") + f"; got {got}")


_SAVE_MODES = ("input", "output")


def check_fused(input, activation, negative_slope, residual, save, inplace) -> int:
    """The fused arguments' checks (before any kernel, as check_args); returns the activation code."""
    code = activation_code(activation)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"batch_norm: negative_slope must be a float, got {type(negative_slope).__name__}")
    if save not in _SAVE_MODES:
        raise ValueError(f"batch_norm: save must be 'input' or 'output', got {save!r}")
    if save == "output" and not invertible(code, negative_slope):
        raise ValueError(f"batch_norm: save='output' needs an invertible activation (None, 'leaky_relu' with "
                         f"negative_slope > 0, 'elu'); got activation={activation!r}"
                         + (f" with negative_slope={negative_slope}" if code == LEAKY_RELU else ""))
    if inplace and save != "output":
        raise ValueError("batch_norm: inplace=True overwrites the input, so the backward cannot read it: "
                         "it needs save='output'")
    if inplace:
        check_writable(input)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"batch_norm: residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise RuntimeError(f"batch_norm: residual must have the input's shape {tuple(input.shape)}, "
                               f"got {tuple(residual.shape)}")
        if residual.device != input.device:
            raise RuntimeError(f"batch_norm: residual must be on the input's device ({input.device}), "
                               f"got {residual.device}")
        if residual.dtype != input.dtype:
            raise RuntimeError(f"batch_norm: residual must have the input's dtype ({input.dtype}), "
                               f"got {residual.dtype}")
        if inplace and (residual is input or (not torch.compiler.is_compiling()  # dynamo: no storage pointers
                                              and residual.untyped_storage().data_ptr()
                                              == input.untyped_storage().data_ptr())):
            raise ValueError("batch_norm: inplace=True with a residual that shares the input's storage "
                             "(the backward needs the residual)")
    if inplace and input.requires_grad and input.is_leaf and torch.is_grad_enabled():
        raise RuntimeError("batch_norm(inplace=True): a leaf Variable that requires grad is being used in an "
                           "in-place operation; pass inplace=False, or an input that is not a leaf")
    return code

