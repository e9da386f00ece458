"""Reading compiled code: resource usage, global access widths per source line, occupancy.

Tools are the ``cuobjdump`` and ``nvdisasm`` shipped in the triton wheel
(``triton/backends/nvidia/bin``). Triton compiles with line info, so every PTX instruction
follows a ``.loc`` and ``nvdisasm -g`` annotates every SASS instruction with its (innermost)
source line; that is how the loads and stores of the ``[N, Q, K]`` tiles are told apart from
the per-channel vector loads, which may be narrower (a gathered scalar per row) or wider.

SASS is the ground truth but ``nvdisasm`` costs ~0.7 s per kernel; PTX is free and its
``ld.global.v4.b32`` is what ptxas turns into ``LDG.E.128`` (the tests check that the two
agree), so bulk checks read the PTX and the report the SASS.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import inspect
import os
import re
import subprocess
import textwrap
from typing import Dict, List, NamedTuple, Optional, Tuple

# Per-SM limits used by the occupancy estimate (CUDA occupancy calculator, compute 9.0/8.0).
SM_LIMITS = {
    90: dict(regs=65536, threads=2048, warps=64, blocks=32, smem=228 * 1024, smem_per_block_reserved=1024),
    80: dict(regs=65536, threads=2048, warps=64, blocks=32, smem=164 * 1024, smem_per_block_reserved=1024),
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)


class Access(NamedTuple):
    kind: str  # "load" / "store" (global), "local_load" / "local_store" (spill traffic in SASS)
    bits: int
    file: Optional[str]
    line: Optional[int]


def tool_path(name: str) -> str:
    """Path of an NVIDIA tool inside the triton wheel (honours triton's TRITON_*_PATH knobs)."""
    try:
        from triton import knobs
        return getattr(knobs.nvidia, name.replace("-", "_")).path
    except (ImportError, AttributeError):
        import triton.backends.nvidia as nvidia
        return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def resource_usage(cubin_path: str) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in the cubin, from cuobjdump."""
    out = subprocess.run([tool_path("cuobjdump"), "--dump-resource-usage", cubin_path],
                         check=True, capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, match.groups())))


# --- PTX -------------------------------------------------------------------------------------
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"(?:\s*,?\s*"([^"]*)")?')
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_PTX_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")
_PTX_BITS = re.compile(r"^[bsuf](8|16|32|64)$")


def ptx_width(suffixes: str) -> int:
    """Bits moved by one ld/st.global: .v4.b32 -> 128, .v2.b16 -> 32, .b16 -> 16."""
    vector, bits = 1, 32
    for part in suffixes.split(".")[1:]:
        if part in ("v2", "v4", "v8"):
            vector = int(part[1:])
        elif _PTX_BITS.match(part):
            bits = int(part[1:])
    return vector * bits


def ptx_locations(ptx: str) -> List[Tuple[Optional[str], Optional[int]]]:
    """(file, line) of the source of each PTX line (index 0 = PTX line 1), innermost frame.

    Inside an inline-asm block (Triton's masked loads) LLVM advances ``.loc`` by one line
    per asm line, so there the location of the ``.loc`` before the block holds."""
    lines = ptx.splitlines()
    files = {}
    for text in lines:
        found = _PTX_FILE.match(text)
        if found:
            directory, name = found.group(2), found.group(3)
            files[found.group(1)] = os.path.join(directory, name) if name else directory
    locations, location, in_asm = [], (None, None), False
    for text in lines:
        if "// begin inline asm" in text:
            in_asm = True
        elif "// end inline asm" in text:
            in_asm = False
        found = _PTX_LOC.match(text)
        if found and not in_asm:
            location = (files.get(found.group(1)), int(found.group(2)))
        locations.append(location)
    return locations


def ptx_accesses(ptx: str) -> List[Access]:
    """Every ld.global/st.global of the PTX with its width and source line."""
    locations = ptx_locations(ptx)
    accesses = []
    for text, location in zip(ptx.splitlines(), locations):
        found = _PTX_ACCESS.match(text)
        if found:
            kind = "load" if found.group(1) == "ld" else "store"
            accesses.append(Access(kind, ptx_width(found.group(2)), *location))
    return accesses


_PTX_INT_DIVISION = re.compile(r"^\s*(?:@!?%p\d+\s+)?(div|rem)\.[su](16|32|64)\b")


def integer_divisions(ptx: str) -> int:
    """Integer div/rem instructions of the PTX. Division by a constant compiles to a
    multiply-high sequence; a div/rem left in the PTX divides by a register value (ptxas
    expands the 64-bit ones into a subroutine call)."""
    return sum(1 for text in ptx.splitlines() if _PTX_INT_DIVISION.match(text))


_PTX_HINTED_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global\.L1::evict_(\w+)\.L2::cache_hint")


def l2_hints(ptx: str) -> str:
    """The eviction hints of the PTX's global loads ("last", "first", "first,last"; "" for
    none): Triton 3.9 lowers ``eviction_policy`` to ``ld.global.L1::evict_X.L2::cache_hint``
    with a ``createpolicy.fractional.L2::evict_X`` operand (tuning.l2_passes sets them)."""
    return ",".join(sorted({m.group(1) for m in map(_PTX_HINTED_LOAD.match, ptx.splitlines()) if m}))


_PTX_BARRIER = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom\.|red\.|bar\.sync|barrier\.|fence\.|membar\.|ld\.\S*acquire)")
# An atomic, or a load/store with memory-order semantics (Triton lowers an acquire add of 0 to ld.acquire).
_PTX_ORDERED = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom\.|red\.|ld\.\S*\.acquire|st\.\S*\.release)")
_PTX_FLOW = re.compile(r"^\s*(\$L__\w+:|(?:@!?%p\d+\s+)?bra(?:\.uni)?\s|(?:@!?%p\d+\s+)?setp\.)")


def barrier_ptx(ptx: str, context: int = 6) -> List[str]:
    """The PTX within ``context`` instructions of each atomic or ordered load/store: atomics, CTA
    barriers, fences, labels, compares and branches. How a grid barrier compiled (the cooperative
    kernels: ``atom.global.gpu.acq_rel.add`` in; a loop of ``ld.global.gpu.acquire``, Triton's
    lowering of an acquire add of 0, and a backward ``bra``), readable without a GPU. Each line as
    "<PTX line number>: <instruction>"."""
    code = [(n, line.strip()) for n, line in enumerate(ptx.splitlines(), 1)
            if line.strip() and not line.strip().startswith(("//", ".loc", "mov.u32"))]
    anchors = [k for k, (_, line) in enumerate(code) if _PTX_ORDERED.match(line)]
    near = sorted({j for k in anchors for j in range(max(k - context, 0), min(k + context + 1, len(code)))})
    return [f"{code[k][0]}: {code[k][1]}" for k in near if _PTX_BARRIER.match(code[k][1]) or _PTX_FLOW.match(code[k][1])]


# --- SASS ------------------------------------------------------------------------------------
_SASS_PTX_LINE = re.compile(r'//## File "\.nv_debug_ptx_txt", line (\d+)')
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_SASS_KINDS = {"LDG": "load", "STG": "store", "LDL": "local_load", "STL": "local_store"}


def sass_width(opcode: str) -> int:
    """Bits moved by one LDG/STG: LDG.E.128 -> 128, LDG.E.64 -> 64, LDG.E.U16 -> 16,
    LDG.E.U8 -> 8, plain LDG.E -> 32. Cache/scope modifiers (.EL, .CONSTANT, ...) ignored."""
    width = 32
    for part in opcode.split(".")[1:]:
        if part.isdigit():
            width = int(part)
        elif part in ("U16", "S16"):
            width = 16
        elif part in ("U8", "S8"):
            width = 8
    return width


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "triton_bn", "sass-text-v1")  # bump when the entry format changes


def disassemble(cubin: bytes, tmp_path: str) -> str:
    """``nvdisasm -gp`` of the cubin (SASS with the PTX line of every instruction), cached on
    disk, gzipped, by the cubin's hash: disassembly is the slow step, and both the access
    widths and the loop reading (``sass_loops``) parse the same text."""
    cached = os.path.join(_cache_dir(), hashlib.sha256(cubin).hexdigest() + ".sass.gz")
    if os.path.exists(cached):
        with gzip.open(cached, "rt") as f:
            return f.read()
    with open(tmp_path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool_path("nvdisasm"), "-gp", "-c", tmp_path],
                         check=True, capture_output=True, text=True).stdout
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with gzip.open(cached + ".tmp%d" % os.getpid(), "wt") as f:
        f.write(out)
    os.replace(cached + ".tmp%d" % os.getpid(), cached)  # atomic: workers may race on an entry
    return out


def _sass_access_lines(sass: str) -> List[Tuple[str, int, Optional[int]]]:
    """(kind, bits, PTX line) of every LDG/STG/LDL/STL of ``nvdisasm -gp`` output."""
    accesses, ptx_line = [], None
    for text in sass.splitlines():
        found = _SASS_PTX_LINE.search(text)
        if found:
            ptx_line = int(found.group(1))
            continue
        found = _SASS_INSTRUCTION.match(text)
        if found and found.group(1).split(".")[0] in _SASS_KINDS:
            opcode = found.group(1)
            accesses.append((_SASS_KINDS[opcode.split(".")[0]], sass_width(opcode), ptx_line))
    return accesses


def sass_accesses(sass: str, ptx: str) -> List[Access]:
    """Every LDG/STG/LDL/STL of the cubin with its width and source line (SASS -> PTX line,
    ``nvdisasm -gp``, -> source line, ``ptx_locations``)."""
    locations = ptx_locations(ptx)
    def where(ptx_line):
        return locations[ptx_line - 1] if ptx_line and 0 < ptx_line <= len(locations) else (None, None)
    return [Access(kind, bits, *where(ptx_line)) for kind, bits, ptx_line in _sass_access_lines(sass)]


# --- attribution and occupancy ---------------------------------------------------------------
def tile_access_lines(fn) -> Tuple[str, Dict[int, str]]:
    """(file, {line: "load"/"store"}) of the tl.load/tl.store calls of python kernel ``fn``
    that touch an ``[N, Q, K]`` tensor, i.e. a ``<t>_ptr`` parameter with a ``<t>_k_stride``."""
    params = list(inspect.signature(fn).parameters)
    tiles = {p for p in params if p.endswith("_ptr") and f"{p[:-4]}_k_stride" in params}
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("load", "store") and node.args):
            names = {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)}
            if names & tiles:
                found[node.lineno + first - 1] = node.func.attr
    return os.path.realpath(inspect.getsourcefile(fn)), found


def _same_source(ptx_file: str, source_file: str) -> bool:
    """Triton's compile cache is keyed on the source text, not its path: a kernel compiled from
    another checkout of the same code carries that checkout's path in its PTX. Compare the
    path below the package instead of the absolute path."""
    def tail(path):
        parts = os.path.realpath(path).split(os.sep)
        return parts[parts.index("triton_bn"):] if "triton_bn" in parts else parts[-1:]
    return tail(ptx_file) == tail(source_file)


def summarize_accesses(accesses: List[Access], tile_file: str, tile_lines: Dict[int, str]) -> dict:
    """Widest global load/store, and the narrowest load/store of the [N, Q, K] tiles."""
    def widths(kind, tile_only):
        return [a.bits for a in accesses if a.kind == kind and (
            not tile_only or (a.file and _same_source(a.file, tile_file) and a.line in tile_lines))]
    return dict(
        ldg_max=max(widths("load", False), default=0), stg_max=max(widths("store", False), default=0),
        tile_ldg_min=min(widths("load", True), default=0), tile_stg_min=min(widths("store", True), default=0),
        tile_ldg_count=len(widths("load", True)), tile_stg_count=len(widths("store", True)),
        spill_ops=len(widths("local_load", False) + widths("local_store", False)),
    )


def occupancy(regs: int, num_warps: int, shared_bytes: int, arch: int) -> Tuple[float, int, str]:
    """(resident warps / max warps, blocks per SM, limiting resource). Blocks per SM is

        min(threads_per_SM // (32 * num_warps),
            regs_per_SM // (roundup(regs * 32, 256) * num_warps),
            smem_per_SM // (shared + 1 KB reserved per block)   (only when shared > 0),
            32 blocks per SM)

    and occupancy = blocks * num_warps / 64. An estimate: the hardware allocates registers
    per sub-partition, so odd warp counts can lose a block to that rounding."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "threads": lim["threads"] // (32 * num_warps),
        "regs": lim["regs"] // (regs_per_warp * num_warps),
        "blocks": lim["blocks"],
    }
    if shared_bytes:
        limits["smem"] = lim["smem"] // (shared_bytes + lim["smem_per_block_reserved"])
    limiter = min(limits, key=lambda k: (limits[k], k != "threads"))
    blocks = limits[limiter]
    return blocks * num_warps / lim["warps"], blocks, limiter
