"""The main loop of a kernel in its SASS: instructions per element and division subroutines.

Definitions (README, "Reading the kernel resource report", says the same):

* A *loop* is a backward branch: a ``BRA`` at instruction j whose target label heads
  instruction i <= j of the same function; its body is instructions i..j. Back edges to one
  head are one loop (the furthest branch closes it), and so are back edges whose spans
  overlap without nesting (a loop laid out around its header); their body is the union. The
  ``BRA`` to itself that ptxas puts after ``EXIT`` is not a loop.
* The *main loops* are the innermost loops that contain a global access (LDG/STG) to the
  ``[N, Q, K]`` tiles (matched by source line, as the tile widths are): the row loop of the
  partial-reduction kernels. Loops that touch only per-channel vectors or partials (the fused
  combine of the last program) are not main loops. A kernel whose tile accesses are not in
  any loop (the elementwise kernels: one tile per program) is read as a whole: its *region*
  is every instruction of the kernel function (subroutines excluded). A kernel with no tile
  access at all (the combine) has no region and no count.
* *Instructions* of a region: its SASS instructions, NOPs excluded, counted statically (each
  instruction once, both sides of a forward branch inside it). A ``CALL`` counts as one: the
  subroutines ptxas calls (64-bit division, the IEEE sqrt/division slow paths) run only on
  operands their inline fast path cannot take, so their bodies are listed apart
  (``loop_calls``, ``loop_call_instructions``), not added.
* *Elements per iteration*: the elements one thread handles in one pass of the region,
  ``tile / (32 * num_warps) * unroll``, tile = the product of the config's ``BLOCK_*`` sizes
  (``BLOCK_R * BLOCK_K``), unroll = the tile-load bits of the SASS region over those of the
  same region in the PTX (ptxas unrolling a loop k times makes it k; 1 when it does not).
* *Instructions per element* = instructions / elements per iteration, summed over the main
  loops when there are several (a kernel that passes over its data twice pays both).
  These are thread-instructions: a warp issues one instruction for 32 threads, so the issue
  budget per element is per thread too (perf/NOTES.md derives it).
* *Division subroutine*: a ``CALL`` in a region to a subroutine whose name holds ``div`` or
  ``rem`` (ptxas names its 64-bit integer division ``$__internal_0_$__cuda_sm20_div_s64``,
  ``..._rem_s64``, ``..._div_u64``, ``..._rem_u64``; 32-bit division is inlined, no call).

Anything the reading cannot establish (no tile access, unroll not a whole number) is said in
the row's ``loop_note``, never guessed.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

from .machine_code import _PTX_ACCESS, _SASS_PTX_LINE, _same_source, ptx_locations, ptx_width, sass_width

_LABEL = re.compile(r"^([.$A-Za-z_][^\s:]*):\s*$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRANCH = re.compile(r"^\s*(?:@!?%p\d+\s+)?bra(?:\.uni)?\s+(\$L__\w+)\s*;")
DIVISION = re.compile(r"div|rem", re.IGNORECASE)


class Instruction(NamedTuple):
    opcode: str
    function: str  # the kernel's name, or a subroutine's
    target: Optional[str]  # label of a BRA / CALL
    ptx_line: Optional[int]


def parse_sass(sass: str) -> Tuple[List[Instruction], Dict[str, int]]:
    """(instructions in order, {label: index of the instruction it heads}) of ``nvdisasm -gp``
    output. Function labels are those not starting with '.' (``.L_x_*`` are local)."""
    instructions: List[Instruction] = []
    labels: Dict[str, int] = {}
    function, ptx_line = "", None
    for text in sass.splitlines():
        found = _SASS_PTX_LINE.search(text)
        if found:
            ptx_line = int(found.group(1))
            continue
        found = _LABEL.match(text)
        if found:
            labels[found.group(1)] = len(instructions)
            if not found.group(1).startswith("."):
                function = found.group(1)
            continue
        found = _INSTRUCTION.match(text)
        if found:
            target = _TARGET.search(found.group(3))
            instructions.append(Instruction(found.group(2), function, target.group(1) if target else None, ptx_line))
    return instructions, labels


def merge_crossing(spans: Dict[int, int]) -> List[Tuple[int, int]]:
    """Loops from back edges {head: last branch}: spans that overlap without nesting are one
    loop laid out rotated (LLVM places a loop's blocks around its header: the 64-bit division
    bypass puts the slow path before the header and the fast path after the latch), so they
    merge into their union; nested spans stay apart."""
    loops = sorted(spans.items())
    merged = True
    while merged:
        merged = False
        for x, (a, b) in enumerate(loops):
            for y, (c, d) in enumerate(loops):
                if a < c <= b < d:
                    loops = [lp for z, lp in enumerate(loops) if z not in (x, y)] + [(a, d)]
                    merged = True
                    break
            if merged:
                break
    return sorted(set(loops))


def sass_loops(instructions: List[Instruction], labels: Dict[str, int]) -> List[Tuple[int, int]]:
    """(first, last) instruction index of every loop (``merge_crossing``)."""
    ends: Dict[int, int] = {}
    for j, ins in enumerate(instructions):
        if ins.opcode.split(".")[0] == "BRA" and ins.target in labels:
            i = labels[ins.target]
            if i < j and instructions[i].function == ins.function:
                ends[i] = max(ends.get(i, j), j)
    return merge_crossing(ends)


def _innermost(loops: List[Tuple[int, int]], wanted) -> List[Tuple[int, int]]:
    """The loops satisfying ``wanted`` that contain no other such loop."""
    chosen = [loop for loop in loops if wanted(loop)]
    return [(a, b) for a, b in chosen
            if not any((c, d) != (a, b) and a <= c and d <= b for c, d in chosen)]


def _counted(instructions: List[Instruction], first: int, last: int) -> Tuple[int, List[str]]:
    """(instructions of first..last, NOPs excluded; names of the subroutines it calls)."""
    body = [ins for ins in instructions[first:last + 1] if ins.opcode.split(".")[0] != "NOP"]
    return len(body), [ins.target for ins in body if ins.opcode.startswith("CALL") and ins.target]


def _ptx_tile_bits(ptx: str, is_tile) -> Tuple[List[int], List[Tuple[int, int]]]:
    """(tile-access bits per PTX line, loops as (first, last) line indices) of the PTX."""
    lines = ptx.splitlines()
    locations = ptx_locations(ptx)
    labels = {}
    for n, text in enumerate(lines):
        found = _PTX_LABEL.match(text)
        if found:
            labels[found.group(1)] = n
    bits, ends = [0] * len(lines), {}
    for n, text in enumerate(lines):
        found = _PTX_ACCESS.match(text)
        if found and found.group(1) == "ld" and is_tile(*locations[n]):
            bits[n] = ptx_width(found.group(2))
        found = _PTX_BRANCH.match(text)
        if found and labels.get(found.group(1), n + 1) <= n:
            head = labels[found.group(1)]
            ends[head] = max(ends.get(head, n), n)
    return bits, merge_crossing(ends)


def main_loop(sass: str, ptx: str, tile_file: str, tile_lines: Dict[int, str], config: dict,
              num_warps: int) -> dict:
    """Fields of the report row: ``loop`` ("loop", "kernel" or "none"), ``loop_count`` (main
    loops found), ``loop_instructions``, ``elements_per_iteration``, ``unroll``,
    ``instructions_per_element`` (None when not established), ``loop_calls``, ``loop_div``
    (a division subroutine is called in the region), ``div_calls`` (anywhere in the kernel),
    ``loop_note``; ``tile_load_tensors`` / ``tile_store_tensors``: distinct tile load / store
    source lines in the machine code (the tensors each element is read from / written to)."""
    instructions, labels = parse_sass(sass)
    locations = ptx_locations(ptx)

    def is_tile(file, line):
        return bool(file) and line in tile_lines and _same_source(file, tile_file)

    def tile_at(ins):
        if ins.opcode.split(".")[0] not in ("LDG", "STG") or not ins.ptx_line:
            return False
        return 0 < ins.ptx_line <= len(locations) and is_tile(*locations[ins.ptx_line - 1])

    sizes: Dict[str, int] = {}
    for ins in instructions:
        if ins.opcode.split(".")[0] != "NOP":
            sizes[ins.function] = sizes.get(ins.function, 0) + 1
    kernel = instructions[0].function if instructions else ""
    all_calls = sorted({ins.target for ins in instructions if ins.opcode.startswith("CALL") and ins.target})
    tile_sources = {(ins.opcode[:3], locations[ins.ptx_line - 1]) for ins in instructions if tile_at(ins)}
    row = dict(tile_load_tensors=sum(kind == "LDG" for kind, _ in tile_sources),
               tile_store_tensors=sum(kind == "STG" for kind, _ in tile_sources),
               loop="none", loop_count=0, loop_instructions=None, elements_per_iteration=None, unroll=None,
               instructions_per_element=None, loop_calls=[], loop_div=False,
               div_calls=[c for c in all_calls if DIVISION.search(c)], loop_note="")
    tiles = [n for n, ins in enumerate(instructions) if tile_at(ins)]
    if not tiles:
        row["loop_note"] = "no tile access"
        return row
    loops = _innermost(sass_loops(instructions, labels), lambda lp: any(lp[0] <= n <= lp[1] for n in tiles))
    if loops:
        regions = loops
        row.update(loop="loop", loop_count=len(loops))
    else:  # one tile per program: the whole kernel function, its trailing self-branch excluded
        body = [n for n, ins in enumerate(instructions) if ins.function == kernel]
        last = body[-1]
        if instructions[last].opcode.startswith("BRA") and labels.get(instructions[last].target) == last:
            last -= 1
        regions = [(body[0], last)]
        row.update(loop="kernel")
    ptx_bits, ptx_loops = _ptx_tile_bits(ptx, is_tile)
    ptx_regions = (_innermost(ptx_loops, lambda lp: any(ptx_bits[lp[0]:lp[1] + 1])) if loops
                   else [(0, len(ptx_bits) - 1)])
    tile = math.prod(v for k, v in config.items() if k.startswith("BLOCK_"))
    per_thread = tile / (32 * num_warps)
    total, calls, unrolls, notes = 0.0, [], [], []
    if len(ptx_regions) != len(regions):
        notes.append(f"{len(regions)} SASS main loops but {len(ptx_regions)} in the PTX: unroll not checked")
    for k, (first, last) in enumerate(regions):
        count, called = _counted(instructions, first, last)
        calls += called
        unroll = 1.0
        if len(ptx_regions) == len(regions):
            sass_bits = sum(sass_width(ins.opcode) for ins in instructions[first:last + 1]
                            if tile_at(ins) and ins.opcode.startswith("LDG"))
            a, b = ptx_regions[k]
            ptx_total = sum(ptx_bits[a:b + 1])
            if ptx_total and sass_bits:
                unroll = sass_bits / ptx_total
        if unroll != int(unroll):
            notes.append(f"unroll {unroll:g} is not whole: elements per iteration unknown")
            total = None
        elif total is not None:
            total += count / (per_thread * unroll)
        unrolls.append(unroll)
        row["loop_instructions"] = (row["loop_instructions"] or 0) + count
    row.update(elements_per_iteration=per_thread * (unrolls[0] if len(unrolls) == 1 else 1),
               unroll=max(unrolls), instructions_per_element=total, loop_calls=sorted(set(calls)),
               loop_call_instructions={name: sizes.get(name, 0) for name in sorted(set(calls))},
               loop_div=any(DIVISION.search(c) for c in calls), loop_note="; ".join(notes))
    return row
