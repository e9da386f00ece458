"""The tuning file: a versioned JSON document, its checks, and its (de)serialization.

Tool layer (triton_bn.tune). The format is documented in docs/tuning.md; in short::

    {"format": "triton_bn tuning file", "version": 1, "measured": bool, "interpreter": bool,
     "machine": {"device", "sm_count", "triton", "torch", "triton_bn", ...}, "date", "command",
     "copy_gbps": float | null,
     "shapes":  [{"shape": [N, C, ...], "dtype", "param_dtype", "channels_last", "layers", "ops",
                  "entries": [index into entries, ...]}],
     "entries": [{"kernel", "key_names", "key": [...], "bytes", "winner": CONFIG,
                  "candidates": [{"config": CONFIG, "ms", "ms_p20", "ms_p80", "wall_ms"}]}]}
    CONFIG = {"kwargs": {"BLOCK_R": 4, "BLOCK_K": 1024}, "num_warps": 8, "num_stages": 3,
              "num_ctas": 1, "maxnreg": null}

An entry is keyed by the kernel's function name and the autotuner's own key tuple (its
``key`` arguments' values, then the dtypes of its tensor arguments), so the file keeps
working when a kernel's key gains an argument: the entry names the key it was made with.
Every problem with a file is a TuningFileError naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "triton_bn tuning file"
VERSION = 1
CONFIG_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_SCALARS = (bool, int, float, str, type(None))


class TuningFileError(ValueError):
    """A tuning file that is missing, truncated, malformed or of an unknown version."""


# ---------------------------------------------------------------------------------------------
# Keys and configs <-> JSON

def key_to_json(key) -> list:
    """The autotuner's key tuple as a JSON list. Values JSON cannot carry round-trip as
    {"repr": ...}; such an entry is kept for reading but never applied (apply.py)."""
    return [v if isinstance(v, _SCALARS) else {"repr": repr(v)} for v in key]


def key_from_json(values: list):
    """The key tuple, or None when it holds a value that was stored as a repr."""
    if any(isinstance(v, dict) for v in values):
        return None
    return tuple(values)


def config_to_json(config) -> dict:
    return {"kwargs": dict(config.kwargs), **{f: getattr(config, f, None) for f in CONFIG_FIELDS}}


def config_matches(config, stored: dict) -> bool:
    """A triton.Config equals a stored one: same meta-parameters and launch fields."""
    return dict(config.kwargs) == stored["kwargs"] and all(
        getattr(config, f, None) == stored[f] for f in CONFIG_FIELDS if f in stored)


def config_label(stored: dict) -> str:
    """'4x1024 w8' (BLOCK_R x BLOCK_K, num_warps) for the tile configs, else 'A=1,B=2 w4'."""
    kwargs = stored["kwargs"]
    if set(kwargs) == {"BLOCK_R", "BLOCK_K"}:
        tile = f"{kwargs['BLOCK_R']}x{kwargs['BLOCK_K']}"
    else:
        tile = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{tile} w{stored.get('num_warps')}"


def config_text(stored: dict) -> str:
    """'BLOCK_R=4, BLOCK_K=1024, num_warps=8' for messages."""
    return ", ".join([f"{k}={v}" for k, v in stored["kwargs"].items()] + [f"num_warps={stored.get('num_warps')}"])


# ---------------------------------------------------------------------------------------------
# Checks: each names the field, e.g. "entries[3].winner.kwargs: expected an object, found 'x'"

def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _expect(obj: dict, field: str, types, where: str, what: str):
    if not isinstance(obj, dict) or field not in obj:
        raise _Bad(f"{where}: missing \"{field}\"")
    value = obj[field]
    # bool is an int subclass: a count or a size given as true/false is still malformed
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise _Bad(f"{where}.{field}: expected {what}, found {json.dumps(value)[:40]}")
    return value


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


class _Bad(Exception):
    pass


def _check_config(stored, where: str):
    if not isinstance(stored, dict):
        raise _Bad(f"{where}: expected an object, found {_type_name(stored)}")
    _expect(stored, "kwargs", dict, where, "an object")
    _expect(stored, "num_warps", int, where, "an integer")


def _check(data) -> None:
    if not isinstance(data, dict):
        raise _Bad(f"expected a JSON object at the top, found {_type_name(data)}")
    if data.get("format") != FORMAT:
        raise _Bad(f"not a triton_bn tuning file (no \"format\": \"{FORMAT}\")")
    version = _expect(data, "version", int, "file", "an integer")
    if version > VERSION:
        raise _Bad(f"format version {version} is newer than this triton_bn reads ({VERSION}); "
                   "update triton_bn or tune again")
    if version < 1:
        raise _Bad(f"format version {version} does not exist (versions start at 1)")
    for flag in ("measured", "interpreter"):
        _expect(data, flag, bool, "file", "true/false")
    machine = _expect(data, "machine", dict, "file", "an object")
    for field in ("device", "triton"):
        _expect(machine, field, str, "machine", "a string")
    entries = _expect(data, "entries", list, "file", "a list")
    for i, entry in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(entry, dict):
            raise _Bad(f"{where}: expected an object, found {_type_name(entry)}")
        _expect(entry, "kernel", str, where, "a string")
        names = _expect(entry, "key_names", list, where, "a list")
        if not all(isinstance(n, str) for n in names):
            raise _Bad(f"{where}.key_names: expected a list of argument names")
        _expect(entry, "key", list, where, "a list")
        _check_config(_expect(entry, "winner", dict, where, "an object"), f"{where}.winner")
        for j, candidate in enumerate(_expect(entry, "candidates", list, where, "a list")):
            _check_config(candidate.get("config") if isinstance(candidate, dict) else candidate,
                          f"{where}.candidates[{j}].config")
            _expect(candidate, "ms", (int, float, type(None)), f"{where}.candidates[{j}]", "a number or null")
    for i, shape in enumerate(_expect(data, "shapes", list, "file", "a list")):
        where = f"shapes[{i}]"
        dims = _expect(shape, "shape", list, where, "a list of sizes")
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise _Bad(f"{where}.shape: expected a list of positive sizes, found {json.dumps(dims)[:40]}")
        _expect(shape, "dtype", str, where, "a string")
        _expect(shape, "channels_last", bool, where, "true/false")
        for index in _expect(shape, "entries", list, where, "a list"):
            if not isinstance(index, int) or not 0 <= index < len(entries):
                raise _Bad(f"{where}.entries: {json.dumps(index)} is not an index into entries")


def check(data, path) -> dict:
    """data itself when it is a well-formed tuning file, else TuningFileError."""
    try:
        _check(data)
    except _Bad as bad:
        raise TuningFileError(f"tuning file {path}: {bad}") from None
    return data


# ---------------------------------------------------------------------------------------------
# Reading and writing

def load(path) -> dict:
    """The checked contents of a tuning file; TuningFileError names the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuningFileError(f"tuning file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TuningFileError(f"tuning file {path}: cannot read it ({reason})") from None
    if not text.strip():
        raise TuningFileError(f"tuning file {path}: empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TuningFileError(f"tuning file {path}: not valid JSON, truncated or corrupted "
                              f"({e.msg}: line {e.lineno} column {e.colno})") from None
    return check(data, path)


def dumps(obj, indent: str = "") -> str:
    """JSON with one line per small object (a key, a config, a candidate) and nesting above that:
    readable and diffable, unlike one huge line or one scalar per line."""
    flat = json.dumps(obj, ensure_ascii=False)
    if len(flat) + len(indent) <= 120 or not isinstance(obj, (dict, list)) or not obj:
        return flat
    inner = indent + " "
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + dumps(v, inner) for v in obj) + "\n" + indent + "]"


def write(data: dict, path) -> Path:
    """Check data and write it; the file appears whole or not at all (write, then rename)."""
    path = Path(path)
    check(data, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(data) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
