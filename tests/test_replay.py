"""Layer 1: op-level replay (kernels/replay.py) and launch plans (kernels/launch.py).

The first call of a signature records; later calls replay the recorded plans with fresh
outputs. Each test checks replayed calls against float64 references on new data (so a replay
that reused a stale tensor, an argument in the wrong slot or a skipped launch fails), and
that the replay was really taken."""
import pytest
import torch

from tests.reference import assert_close, random_input, reference_batch_norm
from triton_bn.kernels import bn_backward, bn_forward_train, replay
from triton_bn.kernels.launch import clear_plans
from triton_bn.kernels.tuning import use_onchip

LAYOUTS = ("contiguous", "channels_last", "strided")


def _replay_of(launcher):
    return [r for k, r in replay._REPLAYS.items() if k[0] is launcher.__wrapped__]


@pytest.fixture(params=[True, False], ids=["onchip", "split"])
def path(request):
    """Both launch paths (the replay key holds the switch)."""
    with use_onchip(request.param):
        yield request.param


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_train_replays_match_the_reference(device, layout, dtype, path):
    shape = (3, 5, 4, 6)
    w = random_input((5,), torch.float32, device, seed=1) if dtype != torch.float32 else \
        random_input((5,), dtype, device, seed=1)
    b = random_input((5,), w.dtype, device, seed=2)
    rm, rv = torch.zeros(5, device=device, dtype=w.dtype), torch.ones(5, device=device, dtype=w.dtype)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    clear_plans()
    for call in range(3):  # record, then two replays on new data
        x = random_input(shape, dtype, device, layout, seed=10 + call, mean=3.0 * call)
        y, mean, invstd = bn_forward_train(x, w, b, rm, rv, 0.25, 1e-5)
        ref_y, ref_rm, ref_rv, _ = reference_batch_norm(x, ref_rm, ref_rv, w, b, True, 0.25, 1e-5)
        assert_close(y, ref_y, dtype, f"y, call {call}")
        assert_close(mean, x.double().mean((0, 2, 3)), dtype, f"save_mean, call {call}")
        assert_close(rm, ref_rm, dtype, f"running_mean, call {call}")
        assert_close(rv, ref_rv, dtype, f"running_var, call {call}")
        assert y.stride() == torch.empty_like(x).stride() or layout == "strided"
    assert [type(r).__name__ for r in _replay_of(bn_forward_train)] == ["_Replay"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_replays_match_the_reference(device, layout, path):
    shape = (2, 4, 5, 3)
    w = random_input((4,), torch.float32, device, seed=3)
    clear_plans()
    for call in range(3):
        x = random_input(shape, torch.float32, device, layout, seed=20 + call)
        dy = random_input(shape, torch.float32, device, layout, seed=30 + call)
        _, mean, invstd = bn_forward_train(x, w, None, None, None)
        dx, dw, db = bn_backward(dy, x, w, mean, invstd, 1e-5, True, (True, True, True))
        _, _, _, (ref_dx, ref_dw, ref_db) = reference_batch_norm(x, None, None, w, torch.zeros_like(w), True, 0.1,
                                                                 1e-5, dy)
        assert_close(dx, ref_dx, torch.float32, f"dx, call {call}")
        assert_close(dw, ref_dw, torch.float32, f"dweight, call {call}")
        assert_close(db, ref_db, torch.float32, f"dbias, call {call}")
    assert [type(r).__name__ for r in _replay_of(bn_backward)] == ["_Replay"]


def test_replayed_outputs_are_new_tensors(device):
    """A replay allocates its outputs: results of earlier calls stay intact."""
    x1 = random_input((2, 3, 4), torch.float32, device, seed=40)
    x2 = random_input((2, 3, 4), torch.float32, device, seed=41, mean=5.0)
    clear_plans()
    y0 = bn_forward_train(x1, None, None, None, None)[0]
    y1 = bn_forward_train(x1, None, None, None, None)[0]
    kept = y1.clone()
    y2 = bn_forward_train(x2, None, None, None, None)[0]
    assert y1.data_ptr() != y2.data_ptr() and y0.data_ptr() != y1.data_ptr()
    assert torch.equal(y1, kept)


def test_strided_running_statistics_are_never_replayed(device, path):
    """A strided running statistic is updated through a contiguous copy, copied back by the
    launcher's Python: that signature must run the launcher every time."""
    x_shape = (4, 3, 5)
    storage = torch.zeros(2, 3, device=device)
    rm, rv = storage[0], torch.ones(6, device=device)[::2]  # rv strided
    ref_rm, ref_rv = rm.clone(), rv.clone()
    clear_plans()
    for call in range(3):
        x = random_input(x_shape, torch.float32, device, seed=50 + call, mean=float(call))
        bn_forward_train(x, None, None, rm, rv, 0.5)
        _, ref_rm, ref_rv, _ = reference_batch_norm(x, ref_rm, ref_rv, None, None, True, 0.5, 1e-5)
        assert_close(rv, ref_rv, torch.float32, f"strided running_var, call {call}")
        assert_close(rm, ref_rm, torch.float32, f"running_mean, call {call}")
    assert _replay_of(bn_forward_train) == [replay._NOT_REPLAYABLE]


def test_a_new_alignment_is_a_new_signature(device):
    """Triton specializes pointers on 16-byte alignment: an offset view must not replay the
    aligned call's plans."""
    base = random_input((2 * 3 * 8 + 1,), torch.float32, device, seed=60)
    aligned, offset = base[:-1].view(2, 3, 8), base[1:].view(2, 3, 8)
    clear_plans()
    for x in (aligned, offset, offset):
        y = bn_forward_train(x, None, None, None, None)[0]
        assert_close(y, reference_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)[0], torch.float32)
    assert len(_replay_of(bn_forward_train)) == 2


def test_the_onchip_switch_is_part_of_the_signature(device, monkeypatch):
    """A call recorded on one path is not replayed on the other after the switch flips."""
    from tests.test_kernels import count_launches
    x = random_input((2, 3, 4), torch.float32, device, seed=80)
    clear_plans()
    for enabled, launches in ((True, 1), (False, 2), (True, 1)):
        with use_onchip(enabled):
            bn_forward_train(x, None, None, None, None)
            calls = count_launches(monkeypatch)
            bn_forward_train(x, None, None, None, None)
            assert len(calls) == launches, (enabled, calls)
            monkeypatch.undo()


def test_clear_plans_forgets_the_replays(device):
    x = random_input((2, 3, 4), torch.float32, device, seed=70)
    bn_forward_train(x, None, None, None, None)
    assert _replay_of(bn_forward_train)
    clear_plans()
    assert not _replay_of(bn_forward_train)
