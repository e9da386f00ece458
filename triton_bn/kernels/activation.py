"""Fused epilogues: the activation codes and their @triton.jit math.

The kernels compute ``y = act(z)``, ``z = BN(x) [+ r]``, with ``ACTIVATION`` a constexpr:

    code  name         act(z)                              act'(z)                       inverse (y -> z)
    0     None         z                                   1                             y
    1     relu         max(z, 0)                           z > 0                         -
    2     leaky_relu   z > 0 ? z : s z                     z > 0 ? 1 : s                 y > 0 ? y : y / s   (s > 0)
    3     silu         z sigmoid(z)                        sg (1 + z (1 - sg))           -
    4     hardswish    z min(max(z + 3, 0), 6) / 6         z < -3: 0, z <= 3: z/3 + 1/2,  -
                                                           else 1
    5     elu          z > 0 ? z : exp(z) - 1   (alpha 1)  z > 0 ? 1 : exp(z) = y + 1    y > 0 ? y : log(1 + y)

(s = ``negative_slope``, a runtime float; sg = sigmoid(z).) The derivatives at the kinks are
torch's: relu and leaky_relu take the z <= 0 branch at 0, hardswish the middle one at +-3.

The backward recomputes z in registers (from x, or from y through the inverse when only the
output was saved, see ``_recompute``), so the pre-activation tensor is never materialized.
"""
from __future__ import annotations

import triton
import triton.language as tl

NONE, RELU, LEAKY_RELU, SILU, HARDSWISH, ELU = range(6)
ACTIVATIONS = {None: NONE, "relu": RELU, "leaky_relu": LEAKY_RELU, "silu": SILU, "hardswish": HARDSWISH,
               "elu": ELU}
NAMES = {code: name for name, code in ACTIVATIONS.items()}


def activation_code(activation) -> int:
    """The code of an activation name (None, "relu", ...); ValueError naming the choices."""
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        choices = ", ".join(repr(name) for name in ACTIVATIONS)
        raise ValueError(f"batch_norm: unknown activation {activation!r}; expected one of {choices}") from None


def invertible(code: int, negative_slope: float) -> bool:
    """Whether y = act(z) determines z (needed by save="output")."""
    return code in (NONE, ELU) or (code == LEAKY_RELU and negative_slope > 0)


@triton.jit
def _expm1(v):
    """exp(v) - 1 without cancellation near 0 (Kahan: (u - 1) * v / log(u), u = exp(v))."""
    u = tl.exp(v)
    um1 = u - 1.0
    log_u = tl.where(um1 == 0.0, 1.0, tl.log(u))
    return tl.where(um1 == 0.0, v, tl.where(tl.abs(v) < 0.5, um1 * v / log_u, um1))


@triton.jit
def _log1p(v):
    """log(1 + v) without cancellation near 0 (Kahan: v * log(u) / (u - 1), u = 1 + v)."""
    u = 1.0 + v
    um1 = u - 1.0
    return tl.where(um1 == 0.0, v, v * tl.log(u) / tl.where(um1 == 0.0, 1.0, um1))


@triton.jit
def _activation(z, negative_slope, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        return tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == 3:
        return z / (1.0 + tl.exp(-z))
    elif ACTIVATION == 4:
        return z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACTIVATION == 5:
        return tl.where(z > 0, z, _expm1(tl.minimum(z, 0.0)))
    else:
        return z


@triton.jit
def _activation_grad(z, negative_slope, ACTIVATION: tl.constexpr):
    """act'(z); only called with ACTIVATION != 0."""
    if ACTIVATION == 1:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == 2:
        return tl.where(z > 0, 1.0, negative_slope)
    elif ACTIVATION == 3:
        sg = 1.0 / (1.0 + tl.exp(-z))
        return sg * (1.0 + z * (1.0 - sg))
    elif ACTIVATION == 4:
        return tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, z / 3.0 + 0.5, 1.0))
    else:  # 5, elu
        return tl.where(z > 0, 1.0, tl.exp(tl.minimum(z, 0.0)))


@triton.jit
def _activation_inverse(y, negative_slope, ACTIVATION: tl.constexpr):
    """z from y = act(z), for the invertible activations (0, 2 with s > 0, 5)."""
    if ACTIVATION == 2:
        return tl.where(y > 0, y, y / negative_slope)
    elif ACTIVATION == 5:
        # y saturates at -1 for very negative z (exp(z) below the dtype's resolution): there z
        # is lost; clamp so it stays finite (documented limit of save="output" with elu).
        return tl.where(y > 0, y, _log1p(tl.maximum(tl.minimum(y, 0.0), -1.0 + 1e-7)))
    else:
        return y


@triton.jit
def _recompute(v, r, mean, invstd, weight, bias, negative_slope,
               ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """(x - mean, act'(z)) of a tile, from v = x (FROM_OUTPUT False) or v = y (True).

    From x:  z = (x - mean) * invstd * weight + bias [+ r].
    From y:  z = act^-1(y), x - mean = (z [- r] - bias) / (weight * invstd) (weight > 0:
             the caller passes |gamma| + eps, see functional.py). act'(z) from z as above.
    ``mean``/``invstd``/``weight``/``bias`` are broadcast per-channel tiles.
    """
    if FROM_OUTPUT:
        z = _activation_inverse(v, negative_slope, ACTIVATION)
        zr = z
        if HAS_RESIDUAL:
            zr = z - r
        xmu = (zr - bias) / (weight * invstd)
    else:
        xmu = v - mean
        z = xmu * (invstd * weight) + bias
        if HAS_RESIDUAL:
            z += r
    if ACTIVATION == 0:
        grad = tl.full(z.shape, 1.0, z.dtype)
    else:
        grad = _activation_grad(z, negative_slope, ACTIVATION)
    return xmu, grad
