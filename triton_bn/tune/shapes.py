"""Where the shapes to tune come from: a list, ResNet-50, or the user's own model.

Tool layer (triton_bn.tune). A Shape is what decides the autotune keys of a batch-norm call:
the input's sizes, dtype and layout and the dtype of the per-channel parameters (part of the
key, as the dtype of a tensor argument). Three sources:

* ``--shapes "N,C,H,W;N,C,L"``: ``parse_shapes``.
* ``--model resnet50``: the 53 BatchNorm2d inputs of perf/resnet50.py, computed from the
  architecture (no forward). perf/ is the repository's benchmark package, imported only here
  and only when asked for.
* ``--from-model module:function``: builds the model, runs one forward with a pre-hook on
  every BatchNorm (torch's ``_BatchNorm`` subclasses and ``triton_bn.BatchNorm``) recording
  what it receives. On the meta device when the model allows it (no memory, no compute);
  otherwise one real forward on the CPU in eval mode under no_grad, so no running statistic
  of any model moves.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_LAYOUTS = {2: ("NC", "NC"), 3: ("NCL", "NLC"), 4: ("NCHW", "NHWC"), 5: ("NCDHW", "NDHWC")}


class ShapeSourceError(ValueError):
    """A shape list, model name or model function that cannot give shapes."""


@dataclass(frozen=True)
class Shape:
    dims: Tuple[int, ...]  # (N, C, *spatial), the channel axis at 1
    dtype: torch.dtype = torch.float32
    channels_last: bool = False  # the channel axis has unit stride (ignored for 2-D (N, C))
    param_dtype: Optional[torch.dtype] = None  # weight/bias/running stats; None: fp32 (fp64 for fp64)
    layers: Tuple[str, ...] = field(default=(), compare=False)  # which model layers have this shape
    # An absent weight or bias is passed to the kernels as None, which changes their key.
    has_weight: bool = True
    has_bias: bool = True

    def __post_init__(self):
        if len(self.dims) == 2:  # (N, C) is one layout only
            object.__setattr__(self, "channels_last", False)
        if self.param_dtype is None:
            object.__setattr__(self, "param_dtype", torch.float64 if self.dtype == torch.float64 else torch.float32)

    @property
    def layout(self) -> str:
        first, last = _LAYOUTS.get(len(self.dims), ("channels-first", "channels-last"))
        return last if self.channels_last else first

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    def label(self) -> str:
        params = "" if self.param_dtype == (torch.float64 if self.dtype == torch.float64 else torch.float32) \
            else f" params {SHORT.get(self.param_dtype, str(self.param_dtype))}"
        missing = [name for name, present in (("weight", self.has_weight), ("bias", self.has_bias)) if not present]
        affine = f" no {'/'.join(missing)}" if missing else ""
        return f"{'x'.join(map(str, self.dims))} {SHORT.get(self.dtype, str(self.dtype))} {self.layout}{params}{affine}"

    def to_json(self) -> dict:
        return {"shape": list(self.dims), "dtype": _dtype_name(self.dtype),
                "param_dtype": _dtype_name(self.param_dtype), "channels_last": self.channels_last,
                "layout": self.layout, "weight": self.has_weight, "bias": self.has_bias, "layers": list(self.layers)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ShapeSourceError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def distinct(shapes: Iterable[Shape]) -> List[Shape]:
    """Each shape once, in first-seen order, with the layer names of its duplicates merged."""
    merged: dict = {}
    for s in shapes:
        if s in merged:
            merged[s] = replace(s, layers=merged[s].layers + s.layers)
        else:
            merged[s] = s
    return list(merged.values())


def parse_dims(text: str, what: str = "--shapes") -> Tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise ShapeSourceError(f"{what}: {text.strip()!r} is not N,C[,spatial...] of positive integers")
    return dims


def parse_shapes(text: str, dtype=torch.float32, channels_last: bool = False) -> List[Shape]:
    """'2,64,56,56;8,128,1000' -> Shapes (';' separates shapes, ',' or 'x' the sizes)."""
    parts = [p for p in text.split(";") if p.strip()]
    if not parts:
        raise ShapeSourceError("--shapes: no shape given (e.g. --shapes \"32,64,56,56;256,1024\")")
    return distinct(Shape(parse_dims(p), dtype, channels_last) for p in parts)


def resnet50_shapes(batch: int, image_size: int = 224, dtype=torch.float32,
                    channels_last: bool = False) -> List[Shape]:
    """The distinct BatchNorm2d input shapes of ResNet-50 (perf/resnet50.py), layer names kept."""
    try:
        from perf.resnet50 import bn_input_shapes
    except ImportError as e:
        raise ShapeSourceError(
            f"--model resnet50 needs perf/resnet50.py from the triton_bn repository ({e}): run from the "
            "repository root or put it on PYTHONPATH, or pass --shapes / --from-model") from None
    return distinct(Shape(dims, dtype, channels_last, layers=(name,))
                    for name, dims in bn_input_shapes(batch, image_size))


# ---------------------------------------------------------------------------------------------
# --from-model

def _is_batch_norm(module) -> bool:
    from ..axis_norm import BatchNorm
    return isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, BatchNorm))


def _recorded_shape(module, x: torch.Tensor, name: str, dtype=None) -> Shape:
    from ..axis_norm import BatchNorm
    from ..functional import feature_axis
    from ..kernels.view import choose_channels_last

    if isinstance(module, BatchNorm) and x.dim() >= 2:
        x = x.movedim(feature_axis(module.axis, x.dim()), 1)  # what the kernels see
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    running = getattr(module, "running_mean", None)
    param = next((t for t in (weight, bias, running) if t is not None), None)
    # choose_channels_last is None when the kernels would copy the input (contiguous afterwards)
    channels_last = x.dim() > 2 and bool(choose_channels_last(x))
    return Shape(tuple(x.shape), dtype or x.dtype, channels_last, None if param is None else param.dtype, (name,),
                 weight is not None, bias is not None)


def collect_shapes(model: torch.nn.Module, example: torch.Tensor, dtype=None) -> List[Shape]:
    """Run ``model(example)`` once, recording the input of every BatchNorm (distinct shapes).

    ``dtype`` overrides the recorded input dtype (e.g. fp16 for a model trained under autocast)."""
    recorded: List[Shape] = []
    handles = [m.register_forward_pre_hook(
        lambda m, args, name=name: recorded.append(_recorded_shape(m, args[0], name or "(model)", dtype)))
        for name, m in model.named_modules() if _is_batch_norm(m)]
    if not handles:
        raise ShapeSourceError(f"{type(model).__name__} has no BatchNorm layer")
    was_training = model.training
    try:
        model.eval()  # eval: a real forward must not move the running statistics
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return distinct(recorded)


def _model_function(spec: str):
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ShapeSourceError(f"--from-model {spec!r}: expected module:function, e.g. mymodels:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's module next to them
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ShapeSourceError(f"--from-model {spec!r}: cannot import {module_name} ({e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ShapeSourceError(f"--from-model {spec!r}: {module_name} has no function {function_name}")
    return function


def shapes_from_model(spec: str, input_shape: Sequence[int], dtype=None,
                      channels_last: bool = False) -> Tuple[List[Shape], str]:
    """(distinct BatchNorm input shapes, 'meta' or 'cpu') of the model built by ``spec``."""
    build = _model_function(spec)
    memory_format = torch.channels_last if channels_last and len(input_shape) == 4 else torch.contiguous_format

    def run(device: str):
        with torch.device(device):
            model = build().to(memory_format=memory_format)
        example = torch.randn(tuple(input_shape), dtype=_input_dtype(model), device=device)
        shapes = collect_shapes(model, example.to(memory_format=memory_format), dtype)
        if channels_last:
            # Meta convolutions return contiguous outputs whatever the input's format (they have
            # no backend to choose one), while a GPU run keeps channels-last: mark 4-D/5-D inputs.
            shapes = distinct(replace(s, channels_last=s.channels_last or len(s.dims) in (4, 5)) for s in shapes)
        return shapes, device

    try:
        return run("meta")
    except ShapeSourceError:
        raise
    except Exception:  # noqa: BLE001  an op with no meta kernel, .item(), ...: one small real forward
        pass
    try:
        return run("cpu")
    except ShapeSourceError:
        raise
    except Exception as e:  # noqa: BLE001  the user's model: name it and what it said
        raise ShapeSourceError(f"--from-model {spec!r}: a forward of an input of shape {tuple(input_shape)} "
                               f"failed on the meta device and on the CPU: {type(e).__name__}: {e}") from e


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's floating parameter dtype (the input must match it), fp32 without one."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
