"""Bytes held for the backward: every tensor autograd saves, counted once per storage.

``torch.autograd.graph.saved_tensors_hooks`` sees each tensor as it is saved; tensors that
share a storage (a ReLU's output saved by the next convolution too, a view of a saved
tensor, In-Place ABN's y written over x) count once, with their storage's full size.
Parameters and buffers (``exclude``) are not activations and are left out.
"""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

import torch


def saved_activation_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> Tuple[int, object]:
    """(bytes saved for backward by ``step()``, its result). Run the forward (and the loss)
    inside ``step``; call backward on the result afterwards."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and storage.nbytes() > 0:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = step()
    return sum(storages.values()), result


def model_tensors(model: torch.nn.Module):
    """The parameters and buffers of a model (what ``exclude`` should hold)."""
    return [*model.parameters(), *model.buffers()]
