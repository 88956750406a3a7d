"""What XLA emits for a benchmark: passes over N x C data and per-fusion time.

``passes`` reads the optimized HLO of the entry computation and counts, per
kernel (fusion, custom call, copy...), the N x C arrays it reads and writes.
It is the cost model of these losses: each N x C read or write is a trip
through memory, and the rest (per-row work) is noise next to it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import numpy as np

_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
# Instructions that move no data (views, bookkeeping).
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def _sizes(type_str: str) -> list[int]:
    return [
        int(np.prod([int(d) for d in dims.split(",") if d]))
        for dims in _SHAPE.findall(type_str)
    ]


def _closing(text: str, depth: int = 0) -> int:
    """Index in ``text`` where the parentheses opened so far (``depth``) close."""
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i
    return len(text)


def _split_instruction(line: str):
    """``(name, type, opcode, operand names)`` of one HLO instruction line."""
    line = line.strip().removeprefix("ROOT ")
    if not line.startswith("%") or " = " not in line:
        return None
    name, rest = line[1:].split(" = ", 1)
    if rest.startswith("("):  # a tuple type
        end = _closing(rest) + 1
        type_str, rest = rest[:end], rest[end:].lstrip()
    else:
        type_str, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    return name, type_str, opcode, _NAME.findall(rest[: _closing(rest, 1)])


def _bodies(hlo_text: str) -> dict[str, str]:
    """Text of each named computation of the module."""
    bodies = {}
    for block in hlo_text.split("\n\n"):
        block = block.strip()
        if block.startswith("%"):
            bodies[block[1:].split(" ", 1)[0]] = block
    return bodies


def _touches_few(body: str) -> bool:
    """A kernel that indexes one entry per row (gather, in-place scatter)
    rather than streaming through the array."""
    indexes = any(f" {op}(" in body for op in ("gather", "scatter", "dynamic-slice"))
    return indexes and " reduce(" not in body


def passes(hlo_text: str, big: int) -> dict:
    """N x C reads and writes of the entry computation's kernels.

    A kernel reads an array of at least ``big`` elements once however often its
    body uses it. Gathers and in-place scatters touch one entry per row, so
    they count as no pass.
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    bodies = _bodies(hlo_text)
    sizes: dict[str, list[int]] = {}
    kernels = []
    for line in entry.splitlines()[1:]:
        parsed = _split_instruction(line)
        if parsed is None:
            continue
        name, type_str, opcode, operands = parsed
        sizes[name] = _sizes(type_str)
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = bodies.get(called.group(1), "") if called else ""
        if opcode in _FREE or _touches_few(body or f" {opcode}("):
            continue
        reads = sum(1 for o in set(operands) if max(sizes.get(o, [0]) or [0]) >= big)
        writes = sum(1 for s in sizes[name] if s >= big)
        if reads or writes:
            kernels.append({"kernel": name, "reads": reads, "writes": writes})
    return {
        "reads": sum(k["reads"] for k in kernels),
        "writes": sum(k["writes"] for k in kernels),
        "kernels": kernels,
    }


def profile(fn, args, reps: int = 5) -> list[tuple[str, float]]:
    """Median milliseconds per kernel of ``fn(*args)``, from a profiler trace."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    durations = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            durations[e["name"]].append(e["dur"] / 1e3)
    # Host-side runtime events; what is left are the compiled kernels.
    runtime = (
        "$",
        "Thunk",
        "Pjit",
        "Common",
        "Slinky",
        "Allocate",
        "Handle",
        "Parse",
        "Python",
    )
    rows = [
        (name, float(np.median(d)))
        for name, d in durations.items()
        if not name.startswith(runtime) and len(d) >= reps
    ]
    return sorted((r for r in rows if r[1] >= 0.01), key=lambda r: -r[1])
