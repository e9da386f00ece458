"""Ticket buffers (triton_bn/kernels/tickets.py): never freed once handed out, private to a CUDA
graph capture (simulated: the capture predicate patched), and zero after every launcher call,
also one whose launch stopped midway.
"""
import gc
import weakref

import pytest
import torch

from tests.program_order import program_order
from tests.reference import random_input
from triton_bn.kernels import bn_backward, bn_forward_train, tickets
from triton_bn.kernels.tickets import tickets as _tickets

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's buffers (CPU)")
CPU = torch.device("cpu")


def _eager_counters_are_zero():
    """Over the interpreter's buffers (the report's recordings leave meta ones, which hold no values)."""
    return all(not buffer.any() for (device, _), buffer in tickets._EAGER.items() if device.type != "meta")


def test_growth_keeps_the_old_buffer_alive():
    """A graph captured with the old buffer still points at it: growing must not free it."""
    small = _tickets(CPU, 8)
    assert _tickets(CPU, 8) is small and small.numel() >= 8
    freed = weakref.ref(small)
    large = _tickets(CPU, small.numel() + 1)
    assert large is not small and large.numel() > small.numel() and not large.any()
    assert _tickets(CPU, 8) is large  # smaller requests take the current buffer
    del small
    gc.collect()
    assert freed() is not None


def test_a_capture_gets_zeroed_buffers_of_its_own(monkeypatch):
    eager = _tickets(CPU, 4)
    monkeypatch.setattr(tickets, "_capturing", lambda device: True)
    first, second = _tickets(CPU, 4), _tickets(CPU, 4)
    assert first is not eager and second is not first and second is not eager
    assert first.numel() == 4 and not first.any() and not second.any()
    monkeypatch.undo()
    assert _tickets(CPU, 4) is eager


def _calls(path):
    """A launcher call that takes tickets, as a function of nothing (fresh state each call)."""
    shape = {"stats": (5, 3, 4, 6), "onchip": (3, 4, 5, 6), "backward": (4, 3, 5, 6)}[path]
    C = shape[1]
    x = random_input(shape, torch.float32, "cpu", seed=11, mean=1.0)
    dy = random_input(shape, torch.float32, "cpu", seed=12)
    w, b = torch.linspace(0.5, 1.5, C), torch.linspace(-0.5, 0.5, C)

    def call():
        rm, rv, steps = torch.zeros(C), torch.ones(C), torch.tensor(2)
        if path == "backward":
            mean, invstd = torch.linspace(0.5, 1.5, C), torch.linspace(1.0, 2.0, C)
            return bn_backward(dy, x, w, mean, invstd, splits=3)
        splits = None if path == "onchip" else 3  # the on-chip slab fits: one program per channel
        return bn_forward_train(x, w, b, rm, rv, None, 1e-5, steps, splits) + (rm, rv, steps)
    return call


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b) if u is not None) and len(a) == len(b)


@pytest.mark.parametrize("path", ["stats", "onchip", "backward"])
def test_calls_during_a_capture_never_touch_the_eager_buffer(path, monkeypatch):
    """Recorded eagerly then replayed in a (simulated) capture, and first recorded in a
    capture then replayed there: the kernels get the capture's buffers. The eager buffer,
    filled with a count no launch could finish, stays as it was and the results are right."""
    call = _calls(path)
    expected = call()  # records the signature
    eager = _tickets(CPU, 1)
    eager.fill_(1 << 20)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(tickets, "_capturing", lambda device: True)
            replayed = call()
            from triton_bn.kernels.replay import _REPLAYS
            _REPLAYS.clear()  # the next call records again, inside the capture
            recorded, replayed_again = call(), call()
        assert (eager == 1 << 20).all()
    finally:
        eager.zero_()
    for got in (replayed, recorded, replayed_again):
        assert _same(got, expected)


@pytest.mark.parametrize("path", ["stats", "onchip", "backward"])
def test_counters_are_zero_after_every_call_even_one_that_raises_midway(path):
    """A launch stopped after its first program took a ticket (the interpreter, an injected
    failure): the counters are zero again when the call has raised, and the next call is right."""
    call = _calls(path)
    expected = call()
    assert _eager_counters_are_zero()
    with pytest.raises(Exception, match="injected failure"):
        with program_order("natural", fail_at=(0, 1)):  # the first launch takes tickets
            call()
    assert _eager_counters_are_zero()
    assert _same(call(), expected)
    assert _eager_counters_are_zero()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replayed_at_once_after_the_eager_buffer_grew():
    """Two graphs captured on the same stream, the eager buffer grown after the captures (its
    old memory reused), then both replayed concurrently on two streams: every replay gives the
    eager call's bits (same config, same split), and the eager counters stay zero."""
    device, C = torch.device("cuda"), 16
    x, dy = torch.randn(8, C, 32, 32, device=device), torch.randn(8, C, 32, 32, device=device)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)

    def step():
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        y, mean, invstd = bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5, None, 4)
        return (y, rm, rv) + bn_backward(dy, x, w, mean, invstd, splits=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (tune, compile, record) off the default stream, as torch advises
        expected = step()
    torch.cuda.current_stream().wait_stream(side)
    graphs, outputs = [], []
    for _ in range(2):
        graphs.append(torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[-1]):
            outputs.append(step())
    wide = torch.randn(4, 3 * tickets.MIN_COUNTERS, device=device)  # more channel blocks: the buffer grows
    bn_forward_train(wide, None, None, None, None, 0.1, 1e-5, None, 2)
    del wide
    torch.cuda.empty_cache()
    streams = [torch.cuda.Stream() for _ in graphs]
    for g, stream in zip(graphs, streams):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            g.replay()
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for got in outputs:
        assert _same(got, expected)
    assert _eager_counters_are_zero()
