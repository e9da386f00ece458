"""``optional(name)``: an optional package the tests use (timm, lightning, onnx, ...), imported,
or the test skipped with the reason.

timm (and torchmetrics, which Lightning imports) import torchvision when it is installed.
PyPI's torchvision wheels are built against CUDA torch: on a CPU-only torch their compiled
ops (``torchvision/_C.so``) do not load, and then ``import torchvision`` fails registering a
fake kernel for ``torchvision::nms``, an op that library would have defined (torch 2.13
checks that the op exists). The tests use none of torchvision's compiled ops, so in that case
only, the two op schemas it registers fakes for are declared here (no kernel) and the import
is tried once more.
"""
import importlib
import sys

import pytest
import torch

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARY = []  # keeps the declarations alive


def _declare_torchvision_ops() -> None:
    if not _LIBRARY:
        library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            library.define(schema)
        _LIBRARY.append(library)


def optional(name: str):
    """``import name``, or pytest.skip naming what is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"{name} is not installed ({error})", allow_module_level=True)  # module-level use too
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for module in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm", "torchmetrics",
                                                                  "lightning", "pytorch_lightning")]:
        del sys.modules[module]  # the half-imported modules
    _declare_torchvision_ops()
    return importlib.import_module(name)
