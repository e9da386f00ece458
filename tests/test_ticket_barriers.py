"""A CTA barrier right before every ticket atomic (helpers._last_of_channel, _count_step), in the
machine code of the statistics, backward and on-chip kernels compiled for sm_90 on the CPU.

One thread issues a ticket's acq_rel atomic; the barrier orders every thread's partial stores
(and step-counter reads) before its release. The TTIR shows the kernels' own barrier
(``tl.debug_barrier``: gpu.barrier, ttg.barrier in Triton 3.9), whatever the lowering adds; the
PTX shows what runs. Walking back from each ticket, the nearest barrier must come before the
nearest memory access (a straight-line reading; the kernels have no branch between the two).
Jobs come from the report's recorded launches (triton_bn/report), compiled in a subprocess
without TRITON_INTERPRET as the report's worker does, keeping the TTIR and PTX text.
"""
import dataclasses
import re

import pytest

from triton_bn.report import CompileJob, compile_jobs, tools_missing
from tests.machine_code import compile_asm

MISSING = tools_missing()

_TICKET = {"ttir": re.compile(r"tt\.atomic_rmw add, .*\(!tt\.ptr<i32>"),
           "ptx": re.compile(r"^\s*(@!?%p\d+\s+)?atom\.global\.gpu\.acq_rel\.add\.u32")}
_BARRIER = {"ttir": re.compile(r"\b(gpu|ttg)\.barrier\b"),
            "ptx": re.compile(r"^\s*(@!?%p\d+\s+)?(bar|barrier)(\.cta)?\.sync\b")}
_MEMORY = {"ttir": re.compile(r"\btt\.(load|store|atomic_rmw|atomic_cas)\b"),
           "ptx": re.compile(r"^\s*(@!?%p\d+\s+)?((ld|st)\.global|atom\.|red\.)")}
def unfenced_tickets(code: str, kind: str) -> list:
    """The ticket atomics in ``code`` (``kind`` "ttir" or "ptx") whose nearest preceding
    barrier-or-memory-access is a memory access."""
    lines = code.splitlines()
    unfenced = []
    for i, line in enumerate(lines):
        if _TICKET[kind].search(line):
            for before in reversed(lines[:i]):
                if _BARRIER[kind].search(before):
                    break
                if _MEMORY[kind].search(before):
                    unfenced.append(line.strip())
                    break
    return unfenced


def _counting(job: CompileJob) -> CompileJob:
    """``job`` with the step counter on (COUNT_STEP, CUMULATIVE_AVERAGE): the report's launches
    pass no num_batches_tracked."""
    pointers = {"num_batches_tracked_ptr": "*i64", "ticket_ptr": "*i32"}
    constexprs = dict((k, v) for k, v in job.constexprs if k not in pointers)
    constexprs.update(COUNT_STEP=True, CUMULATIVE_AVERAGE=True)
    return dataclasses.replace(job, signature=tuple((n, pointers.get(n, t)) for n, t in job.signature),
                               constexprs=tuple(constexprs.items()), variant=job.variant + "-count")


@pytest.mark.skipif(MISSING is not None, reason=f"no GPU compiler tools: {MISSING}")
def test_every_ticket_follows_a_barrier(tmp_path):
    assert unfenced_tickets("st.global.b32 [%rd1], %r1;\n@%p1 atom.global.gpu.acq_rel.add.u32 %r2, [%rd2], 1;",
                            "ptx")  # the rule sees a missing barrier
    first = {}
    for job in compile_jobs(archs=(90,), dtypes=("fp32",), layouts=("NCHW", "NHWC"),
                            kernels=["stats_partial", "backward_partial", "onchip_forward"]):
        if job.variant == "train":
            first.setdefault((job.name, job.layout), job)
    jobs = list(first.values()) + [_counting(j) for j in first.values() if j.name != "backward_partial"]
    assert len(jobs) == 10
    codes = compile_asm(jobs, tmp_path)
    for job, code in zip(jobs, codes):
        where = f"{job.name}/{job.variant} {job.layout}"
        tickets = len([line for line in code["ptx"].splitlines() if _TICKET["ptx"].search(line)])
        # A ticket per program, plus the step counter's: none without a fused combine or a step count.
        assert tickets == (job.name != "onchip_forward") + job.variant.endswith("-count"), where
        for kind in ("ttir", "ptx"):
            assert not unfenced_tickets(code[kind], kind), (where, kind, unfenced_tickets(code[kind], kind))
