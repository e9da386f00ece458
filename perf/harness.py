"""Measure: for every case, check each implementation against the float64 reference, then time it.

Per case: build seeded inputs in the case's layout; time a device-to-device copy of x (the
ceiling at this size); then per implementation run each op once, compare with the reference
(this first call also autotunes / compiles, so tuning never lands in a timing), record the
config it chose, and only if the result is right, time it. A wrong result, an exception or an
out-of-memory becomes a row with status 'error' and the reason; an implementation unavailable
here becomes 'skipped' with the reason.

A masked case (case.valid set) adds its mask (perf/masked.py) to the reference and runs each
implementation's masked form (masked.for_mask); forward-eval, which no mask enters, is skipped.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

import torch

from . import bytes_model, env, masked
from .bytes_model import COPY, OPS, TORCH_DTYPE
from .check import Reference
from .impls import EPS, MOMENTUM
from .results import add_speedups
from .suites import Case
from .timing import Timing, bench

OP_LABEL = {"forward-train": "fwd-train", "forward-eval": "fwd-eval", "backward": "bwd", "fwd+bwd": "fwd+bwd",
            COPY: "copy"}


class Inputs(NamedTuple):
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


class Outcome(NamedTuple):
    status: str
    detail: str = ""
    config: str = ""
    timing: Optional[Timing] = None


def random_tensor(case: Case, device, generator, offset: float = 0.0) -> torch.Tensor:
    """Seeded N(offset, 1) values of the case's shape, dtype and memory layout (no layout copy)."""
    shape = case.shape
    if case.layout == "channels_last":
        N, C, *spatial = shape
        t = torch.randn((N, *spatial, C), generator=generator, device=device).movedim(-1, 1)
    else:
        t = torch.randn(shape, generator=generator, device=device)
    return t.add_(offset).to(TORCH_DTYPE[case.dtype])


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    x = random_tensor(case, device, g, offset=0.5)
    dy = random_tensor(case, device, g)
    C = case.C
    vec = lambda: torch.rand(C, generator=g, device=device)  # noqa: E731
    return Inputs(x, dy, weight=vec() + 0.5, bias=vec() - 0.5, running_mean=vec() - 0.5, running_var=vec() + 0.5)


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _attempt(run: Callable[[], Optional[str]]) -> Optional[str]:
    """run() returns a mismatch or None; exceptions (including out-of-memory) become the problem."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - any failure of an implementation is a result
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return describe(error)


def measure_impl(impl, inputs: Inputs, ref: Reference, ops, timer: Callable) -> dict:
    """{op: Outcome} for one implementation on one case."""
    reason = impl.unavailable()
    if reason:
        return {op: Outcome("skipped", reason) for op in ops}
    problem = _attempt(lambda: impl.prepare())
    if problem:
        return {op: Outcome("error", f"prepare: {problem}") for op in ops}
    x, dy, w, b, rm0, rv0 = inputs
    state = {}

    def check_train():
        rm, rv = rm0.clone(), rv0.clone()
        y, state["saved"] = impl.forward_train(x, w, b, rm, rv)
        return ref.check_train(y, *impl.saved_stats(state["saved"]), rm, rv)

    def check_backward():
        return ref.check_backward(*impl.backward(dy, x, w, state["saved"]))

    problems, configs = {}, {}
    train_ops = [op for op in ops if op != "forward-eval"]
    if train_ops:
        problems["forward-train"] = _attempt(check_train)
        configs["forward-train"] = impl.config("forward-train")
    if "backward" in ops or "fwd+bwd" in ops:
        train_problem = problems["forward-train"]
        problems["backward"] = f"needs forward-train: {train_problem}" if train_problem else _attempt(check_backward)
        configs["backward"] = impl.config("backward")
        problems["fwd+bwd"] = train_problem or problems["backward"]
        configs["fwd+bwd"] = impl.config("fwd+bwd")
    if "forward-eval" in ops:
        problems["forward-eval"] = _attempt(lambda: ref.check_eval(impl.forward_eval(x, w, b, rm0, rv0)))
        configs["forward-eval"] = impl.config("forward-eval")

    rm_work, rv_work = rm0.clone(), rv0.clone()
    calls = {
        "forward-train": lambda: impl.forward_train(x, w, b, rm_work, rv_work),
        "forward-eval": lambda: impl.forward_eval(x, w, b, rm0, rv0),
        "backward": lambda: impl.backward(dy, x, w, state["saved"]),
        "fwd+bwd": lambda: impl.backward(dy, x, w, impl.forward_train(x, w, b, rm_work, rv_work)[1]),
    }
    outcomes = {}
    for op in ops:
        if problems[op]:
            outcomes[op] = Outcome("error", problems[op], configs.get(op, ""))
            continue
        timing, problem = _time(calls[op], timer)
        outcomes[op] = (Outcome("error", f"timing: {problem}", configs[op]) if problem
                        else Outcome("ok", "", configs[op], timing))
    return outcomes


def _time(call: Callable, timer: Callable):
    """(Timing, None), or (None, why timing failed)."""
    try:
        return timer(call), None
    except Exception as error:  # noqa: BLE001
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, describe(error)


def measure_copy(x: torch.Tensor, timer: Callable) -> Outcome:
    """A device-to-device copy of x's bytes: the ceiling at this size."""
    dst = torch.empty_like(x)
    dst.copy_(x)
    if not torch.equal(dst, x):
        return Outcome("error", "copy: destination differs from source")
    return Outcome("ok", "", "tensor.copy_", timer(lambda: dst.copy_(x)))


def make_row(suite: str, case: Case, op: str, impl: str, outcome: Outcome, ceiling_gbps: float) -> dict:
    row = {"suite": suite, "sweep": case.sweep, "op": op, "impl": impl, "status": outcome.status,
           "shape": case.shape_str, "N": case.N, "C": case.C, "spatial": case.spatial, "numel": case.numel,
           "dtype": case.dtype, "layout": case.layout, "layers": case.layers or None, "valid": case.valid,
           "unique_bytes": bytes_model.unique_bytes(op, case.numel, case.dtype, case.mask_numel),
           "config": outcome.config, "detail": outcome.detail}
    if outcome.timing is not None:
        t = outcome.timing
        rate = bytes_model.gbps(row["unique_bytes"], t.median_ms)
        row.update(time_ms=t.median_ms, time_p20_ms=t.p20_ms, time_p80_ms=t.p80_ms, gbps=rate,
                   pct_of_ceiling=100.0 * rate / ceiling_gbps if ceiling_gbps else None)
        if op != COPY:
            row.update(gflops=bytes_model.flops(op, case.numel) / (t.median_ms * 1e-3) / 1e9,
                       intensity=bytes_model.intensity(op, case.dtype))
    return row


def _progress_line(impl: str, outcomes: dict) -> str:
    parts = []
    for op, o in outcomes.items():
        if o.status == "ok":
            parts.append(f"{OP_LABEL[op]} {o.timing.median_ms:8.3f} ms")
        else:
            parts.append(f"{OP_LABEL[op]} {o.status.upper()}")
    return f"    {impl:<14} " + " | ".join(parts)


def measure_masked(impl, mask: torch.Tensor, inputs: Inputs, ref: Reference, ops, timer: Callable) -> dict:
    """measure_impl of ``impl``'s masked form; forward-eval skipped (the mask does not enter it)."""
    impl = masked.for_mask(impl, mask)
    measured = measure_impl(impl, inputs, ref, [op for op in ops if op != "forward-eval"], timer)
    reason = impl.unavailable() or masked.EVAL_SKIPPED
    return {op: measured.get(op) or Outcome("skipped", reason) for op in ops}


def measure_case(suite: str, case: Case, impls, ops, ceiling_gbps: float, device, timer=bench,
                 log=print) -> list:
    inputs = make_inputs(case, device)
    mask = None if case.valid is None else masked.make_mask(case, device)
    ref = Reference(*inputs, momentum=MOMENTUM, eps=EPS, mask=mask)
    copy = measure_copy(inputs.x, timer)
    rows = [make_row(suite, case, COPY, "copy", copy, ceiling_gbps)]
    log(_progress_line("copy", {COPY: copy}))
    for impl in impls:
        outcomes = (measure_impl(impl, inputs, ref, ops, timer) if mask is None
                    else measure_masked(impl, mask, inputs, ref, ops, timer))
        log(_progress_line(impl.name, outcomes))
        for op, outcome in outcomes.items():
            if outcome.status == "error":
                log(f"      ! {impl.name} {OP_LABEL[op]}: {outcome.detail}")
            rows.append(make_row(suite, case, op, impl.name, outcome, ceiling_gbps))
    return rows


def run_cases(suite: str, cases, impls, ops=OPS, ceiling_gbps: float = 0.0, timer=bench, log=print,
              on_case: Optional[Callable[[list], None]] = None) -> list:
    """All rows of a sweep, speedups filled in; prints one block of progress per case and hands
    the rows so far to ``on_case`` after each (so an interrupted sweep keeps what it measured)."""
    device = env.device()
    rows, start = [], time.perf_counter()
    for i, case in enumerate(cases, 1):
        log(f"[{i:>3}/{len(cases)}] {case}  ({case.numel * bytes_model.ELEMENT_SIZE[case.dtype] / 1e6:.1f} MB, "
            f"{time.perf_counter() - start:.0f} s elapsed; first calls autotune / compile)")
        rows += measure_case(suite, case, impls, ops, ceiling_gbps, device, timer, log)
        add_speedups(rows)
        if on_case:
            on_case(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
