"""The report over real shapes: ``python -m triton_bn.report --shapes resnet50``.

ResNet-50's 12 distinct BatchNorm input shapes (C, H, W), at batch 64 and 256, as NCHW fp32,
channels-last fp16 and channels-last bf16. Each (shape, batch, format) is a *case*; the
launchers run on a meta tensor of the case under the recorder of ``launches`` (the H200's
132-SM split), so whatever they dispatch to is what gets compiled. When the kernels package
has ``tuning.use_onchip(enabled)`` (the on-chip one-launch path), every case is recorded twice,
with it off (rows labelled ``path=split``) and on (``path=onchip``); without it, once (split).

Rows: per case, the configs the autotuner's pruning keeps for that shape (a GPU keeps several
and benchmarks them) and every fixed-config kernel. Many cases share a binary (Triton only
specializes ints on ==1 and divisibility by 16), so each distinct job is compiled once and its
result is shared by the rows that launch it.

The shapes are those of ``perf/resnet50_layers.py`` (which derives them from the
architecture; the library does not import perf/, tests/test_report.py checks they agree).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .launches import DTYPES, CompileJob, job_key, recorded_jobs

RESNET50_SHAPES = ((64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
                   (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7))
BATCHES = (64, 256)
FORMATS = (("fp32", "NCHW"), ("fp16", "NHWC"), ("bf16", "NHWC"))  # (dtype, layout) of a training run
SHAPE_SETS = {"resnet50": RESNET50_SHAPES}


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    C: int
    H: int
    W: int
    dtype: str
    layout: str
    path: str  # "split", "onchip" or "cooperative"

    @property
    def label(self) -> str:
        return f"{self.N}x{self.C}x{self.H}x{self.W}"

    def tensor(self) -> torch.Tensor:
        x = torch.empty((self.N, self.C, self.H, self.W), dtype=DTYPES[self.dtype], device="meta")
        return x.to(memory_format=torch.channels_last) if self.layout == "NHWC" else x


def launch_paths(cooperative: bool = False) -> List[Tuple[str, Callable[[], contextlib.AbstractContextManager]]]:
    """(label, context) per dispatch path the launchers have: the split path always; the
    on-chip path when ``tuning.use_onchip`` exists (feature-detected, so the report needs no
    change when that branch lands); ``cooperative`` (--cooperative): the launchers with
    ``tuning.use_cooperative(True)`` too, on chip first (the switch is off by default)."""
    from triton_bn.kernels import tuning
    use_onchip = getattr(tuning, "use_onchip", None)
    if use_onchip is None:
        return [("split", contextlib.nullcontext)]
    paths = [("split", lambda: use_onchip(False)), ("onchip", lambda: use_onchip(True))]
    if cooperative:
        paths.append(("cooperative", lambda: tuning.use_cooperative(True)))
    return paths


def parse_shape(text: str) -> Tuple[int, int, int]:
    """'512x7x7' -> (512, 7, 7)."""
    c, h, w = (int(v) for v in text.lower().split("x"))
    return c, h, w


def shape_jobs(shapes: Sequence[Tuple[int, int, int]] = RESNET50_SHAPES, batches: Sequence[int] = BATCHES,
               formats: Sequence[Tuple[str, str]] = FORMATS, archs=(90,), kernels: Optional[List[str]] = None,
               first_config: bool = False, cooperative: bool = False,
               masked: bool = False) -> Tuple[List[CompileJob], List[Tuple[Case, List[CompileJob]]]]:
    """(distinct jobs to compile, [(case, the case's jobs)]). A case's jobs are the kept
    configs of its autotuned launches and its fixed-config launches; ``first_config``: only
    the first kept config of each launch (the one ``TRITON_BN_PIN_CONFIG=1`` runs), for
    quick checks. ``kernels``: substrings of kernel names to keep; ``cooperative``: see launch_paths;
    ``masked``: each case's training launches with a mask too (variant "train-masked")."""
    unique: Dict[tuple, CompileJob] = {}
    cases = []
    for label, context in launch_paths(cooperative):
        for (C, H, W) in shapes:
            for N in batches:
                for dtype, layout in formats:
                    case = Case(N, C, H, W, dtype, layout, label)
                    with context():
                        jobs = recorded_jobs(case.tensor(), dtype, layout, archs, dispatched=True, masked=masked)
                    jobs = [j for j in jobs if j.kept and (not kernels or any(k in j.name for k in kernels))]
                    if first_config:
                        seen, first = set(), []
                        for job in jobs:  # in config order: the first kept one of each launch
                            launch = (job.kernel, job.signature, job.constexprs, job.arch)
                            if launch not in seen:
                                seen.add(launch)
                                first.append(job)
                        jobs = first
                    for job in jobs:
                        unique.setdefault(job_key(job), job)
                    cases.append((case, jobs))
    return list(unique.values()), cases


def case_rows(cases, jobs: List[CompileJob], results: List[dict]) -> List[dict]:
    """One row per (case, job): the compiled job's result with the case's fields (shape,
    path) and the case's own ``kept``."""
    by_key = {job_key(job): result for job, result in zip(jobs, results)}
    rows = []
    for case, case_jobs in cases:
        for job in case_jobs:
            rows.append(dict(by_key[job_key(job)], **dataclasses.asdict(case), shape=case.label, kept=job.kept))
    return rows
