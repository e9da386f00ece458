"""The implementations compared side by side, behind one small interface.

Every implementation exposes the same three calls (``saved`` is whatever its forward keeps for
its backward), so the harness builds the four ops from them the same way for all:

    forward_train(x, weight, bias, running_mean, running_var) -> (y, saved)   running stats updated
    forward_eval(x, weight, bias, running_mean, running_var)  -> y
    backward(dy, x, weight, saved)                             -> (dx, dweight, dbias)
    fwd+bwd = backward(dy, x, weight, forward_train(...)[1])

No autograd engine in the timed calls: each implementation is called at the level that launches
its kernels (triton_bn's layer-1 launchers; torch's aten op behind F.batch_norm and its
backward; Inductor's compiled graphs of the same ops), so the numbers compare kernels plus the
launch path a training step pays, not Python autograd bookkeeping.

Masked cases (issue 20) run each implementation's masked form instead (perf/masked.py,
``for_mask``): torch has no masked kernel, so there 'torch' and 'torch_compile' are a torch
composition, differentiated by the autograd engine (the one exception to the rule above).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import env

MOMENTUM = 0.1
EPS = 1e-5
TORCH_IMPLS = ("torch", "torch_native", "torch_compile")


class Impl:
    name = ""
    description = ""

    def unavailable(self) -> Optional[str]:
        """Why this implementation is skipped in this environment, or None."""
        return None

    def prepare(self) -> None:
        """Called once per case before anything runs (e.g. to drop compiled graphs)."""

    def forward_train(self, x, weight, bias, running_mean, running_var):
        raise NotImplementedError

    def forward_eval(self, x, weight, bias, running_mean, running_var):
        raise NotImplementedError

    def backward(self, dy, x, weight, saved):
        raise NotImplementedError

    def saved_stats(self, saved):
        """(save_mean, save_invstd) out of ``saved``, for the correctness check."""
        return saved[0], saved[1]

    def config(self, op: str) -> str:
        """What was chosen for the last call of ``op`` (autotuned tiles, dispatched kernel)."""
        return ""


class TritonBN(Impl):
    name = "triton_bn"
    description = ("triton_bn layer-1 launchers (2 launches forward-train, 1 eval, 2 backward; "
                   "1 and 1 where a channel's slab fits on chip)")

    def forward_train(self, x, weight, bias, running_mean, running_var):
        from triton_bn.kernels import bn_forward_train
        y, mean, invstd = bn_forward_train(x, weight, bias, running_mean, running_var, MOMENTUM, EPS)
        return y, (mean, invstd)

    def forward_eval(self, x, weight, bias, running_mean, running_var):
        from triton_bn.kernels import bn_forward_eval
        return bn_forward_eval(x, weight, bias, running_mean, running_var, EPS)

    def backward(self, dy, x, weight, saved):
        from triton_bn.kernels import bn_backward
        return bn_backward(dy, x, weight, saved[0], saved[1], EPS, True)

    def config(self, op: str) -> str:
        from triton_bn.kernels import backward, normalize, stats
        kernels = {"stats": stats._bn_stats_partial_kernel, "normalize": normalize._bn_normalize_kernel,
                   "bwd_partial": backward._bn_backward_partial_kernel, "bwd_dx": backward._bn_backward_dx_kernel}
        used = {"forward-train": ("stats", "normalize"), "forward-eval": ("normalize",),
                "backward": ("bwd_partial", "bwd_dx"),
                "fwd+bwd": ("stats", "normalize", "bwd_partial", "bwd_dx")}[op]
        return "; ".join(f"{name}: {format_config(getattr(kernels[name], 'best_config', None))}" for name in used)


def format_config(config) -> str:
    if config is None:
        return "n/a"
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}"


ATEN_IMPL_NAMES = {0: "native", 1: "cudnn", 2: "miopen"}


class TorchEager(Impl):
    """torch's own kernels through the aten op F.batch_norm dispatches to.

    ``cudnn_enabled`` is the flag F.batch_norm passes from torch.backends.cudnn.enabled (what
    ``torch.backends.cudnn.flags(enabled=False)`` turns off): with it, torch picks cuDNN where it
    supports the case and reports which kernel it picked (the impl index), which we record.
    """

    def __init__(self, cudnn_enabled: bool):
        self.cudnn_enabled = cudnn_enabled
        self.name = "torch" if cudnn_enabled else "torch_native"
        self.description = ("torch batch_norm as dispatched (cuDNN where torch picks it)" if cudnn_enabled
                            else "torch native kernels, cuDNN disabled")
        self.last_impl_index = {}

    def forward_train(self, x, weight, bias, running_mean, running_var):
        y, save_mean, save_invstd, reserve, impl_index = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS, self.cudnn_enabled)
        self.last_impl_index["forward-train"] = impl_index
        return y, (save_mean, save_invstd, reserve, impl_index, running_mean, running_var)

    def forward_eval(self, x, weight, bias, running_mean, running_var):
        y, _, _, _, impl_index = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, False, MOMENTUM, EPS, self.cudnn_enabled)
        self.last_impl_index["forward-eval"] = impl_index
        return y

    def backward(self, dy, x, weight, saved):
        save_mean, save_invstd, reserve, impl_index, running_mean, running_var = saved
        self.last_impl_index["backward"] = impl_index
        return torch.ops.aten._batch_norm_impl_index_backward(
            impl_index, x, dy, weight, running_mean, running_var, save_mean, save_invstd, True, EPS,
            [True, True, True], reserve)

    def config(self, op: str) -> str:
        index = self.last_impl_index.get("forward-train" if op == "fwd+bwd" else op)
        return f"aten impl: {ATEN_IMPL_NAMES.get(index, index)}"


class TorchCompile(Impl):
    """Inductor's own generated kernels for the same aten ops, one compiled graph per op.

    fwd+bwd runs the forward graph, then the backward graph, as AOTAutograd splits a training
    step; the graphs are dropped between cases (``prepare``) so no recompile limit is reached
    and no case falls back to eager silently.
    """
    name = "torch_compile"
    description = "torch.compile(dynamic=False) of native_batch_norm and its backward (Inductor)"

    def __init__(self, force: bool = False):
        self.force = force
        self._graphs = None

    def unavailable(self) -> Optional[str]:
        if env.mode() == env.CPU_INTERPRETER and not self.force:
            return ("skipped in the CPU interpreter run: Inductor's C++ compile per shape is slow "
                    "there (name torch_compile in --impls to try it)")
        return None

    def prepare(self) -> None:
        torch._dynamo.reset()
        compile_ = lambda fn: torch.compile(fn, dynamic=False, fullgraph=True)  # noqa: E731
        self._graphs = {
            "train": compile_(lambda x, w, b, rm, rv: torch.ops.aten.native_batch_norm(
                x, w, b, rm, rv, True, MOMENTUM, EPS)),
            "eval": compile_(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)),
            "backward": compile_(lambda dy, x, w, mean, invstd: torch.ops.aten.native_batch_norm_backward(
                dy, x, w, None, None, mean, invstd, True, EPS, [True, True, True])),
        }

    def forward_train(self, x, weight, bias, running_mean, running_var):
        y, mean, invstd = self._graphs["train"](x, weight, bias, running_mean, running_var)
        return y, (mean, invstd)

    def forward_eval(self, x, weight, bias, running_mean, running_var):
        return self._graphs["eval"](x, weight, bias, running_mean, running_var)

    def backward(self, dy, x, weight, saved):
        return self._graphs["backward"](dy, x, weight, saved[0], saved[1])

    def config(self, op: str) -> str:
        return "torch.compile(mode=default, dynamic=False, fullgraph=True)"


ALL_IMPLS = ("triton_bn",) + TORCH_IMPLS


def make_impls(names=None) -> list:
    """Implementations by name, in the order given (default: all four)."""
    explicit = names is not None  # torch_compile named explicitly: try it even where it is skipped
    names = list(names or ALL_IMPLS)
    factories = {"triton_bn": TritonBN, "torch": lambda: TorchEager(True),
                 "torch_native": lambda: TorchEager(False),
                 "torch_compile": lambda: TorchCompile(force=explicit)}
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {', '.join(factories)}")
    return [factories[n]() for n in names]
