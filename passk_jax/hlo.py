"""What a compiled program sends between devices, read from its optimized HLO text.

``loop_collectives(compiled.as_text())`` finds the top-level ``while`` loops of a program (for the sampler's
decode: one loop per decode phase, one iteration per generated token) and adds up, per iteration, the bytes
of every collective (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute) in the loop's
body and condition and in everything they call, nested loops multiplied by their known trip count (a scanned
layer stack). Bytes are the collective's result per device (an all-gather counts the gathered array), the
usual measure of what crosses the interconnect. These are exact properties of the partitioned program, so
they can be asserted in tests on virtual CPU devices and compared against a target's bandwidth.
"""
from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    shape: str   # result type text, e.g. "bf16[8,128]{1,0}" or a tuple "(f32[2]{0}, s32[])"
    line: str

    @property
    def bytes(self) -> int:
        """Bytes of the result (every array of a tuple result)."""
        total = 0
        for dtype, dims in _ARRAY.findall(self.shape):
            size = _BYTES.get(dtype, 0)
            for d in filter(None, dims.split(",")):
                size *= int(d)
            total += size
        return total

    def called(self) -> list[str]:
        out = [name for _, name in _CALLS.findall(self.line)]
        for group in _BRANCHES.findall(self.line):
            out += [g.strip().lstrip("%") for g in group.split(",") if g.strip()]
        return out

    @property
    def trip_count(self) -> int | None:
        m = _TRIP.search(self.line)
        return int(m.group(1)) if m else None


def _split_instruction(line: str) -> Instruction | None:
    text = line.strip()
    if text.startswith("ROOT "):
        text = text[5:]
    if "=" not in text:
        return None
    name, rest = text.split("=", 1)
    rest = rest.strip()
    if rest.startswith("("):  # tuple type: balanced parentheses
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].strip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode = rest.split("(", 1)[0].strip()
    return Instruction(name.strip().lstrip("%"), opcode, shape, line)


def parse(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """({computation name: instructions}, name of the ENTRY computation)."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            comps[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            inst = _split_instruction(line)
            if inst is not None:
                comps[current].append(inst)
    return comps, entry


def _kind(opcode: str) -> str | None:
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


@dataclasses.dataclass
class LoopStats:
    """Collectives of one iteration of a top-level while loop."""

    name: str
    bytes_per_iteration: int
    by_kind: dict[str, int]               # collective kind -> bytes per iteration
    ops: list[tuple[str, str, int]]       # (kind, result type, bytes per iteration incl. nested trip counts)
    unknown_trip_counts: int = 0          # nested loops without a known trip count (counted once)


def _collect(comps, name: str, scale: int, stats: LoopStats, seen: tuple[str, ...] = ()) -> None:
    if name in seen or name not in comps:
        return
    for inst in comps[name]:
        kind = _kind(inst.opcode)
        if kind is not None:
            b = inst.bytes * scale
            stats.bytes_per_iteration += b
            stats.by_kind[kind] = stats.by_kind.get(kind, 0) + b
            stats.ops.append((kind, inst.shape, b))
        inner = scale
        if inst.opcode == "while":
            trips = inst.trip_count
            if trips is None:
                stats.unknown_trip_counts += 1
            inner = scale * (trips or 1)
        for callee in inst.called():
            _collect(comps, callee, inner, stats, seen + (name,))


def loop_collectives(text: str) -> list[LoopStats]:
    """Per top-level while loop of the program (ENTRY and the computations it calls outside loops), the
    collectives of one iteration."""
    comps, entry = parse(text)
    out: list[LoopStats] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in seen or name not in comps:
            return
        for inst in comps[name]:
            if inst.opcode == "while":
                stats = LoopStats(inst.name, 0, {}, [])
                for callee in inst.called():  # body and condition
                    _collect(comps, callee, 1, stats)
                out.append(stats)
            elif inst.opcode in ("call", "conditional"):
                for callee in inst.called():
                    visit(callee, seen + (name,))

    if entry is not None:
        visit(entry)
    return out


def upcast_copies(text: str, shapes: set[tuple[int, ...]]) -> int:
    """Bytes of the float32 arrays of the given ``shapes`` that the ENTRY computation (outside every loop)
    materialises: the CPU compiler, which has no bf16 matmul, converts loop-invariant bf16 weights to f32
    copies once before the decode loop; an accelerator reads the bf16 weights directly."""
    comps, entry = parse(text)
    total = 0
    for inst in comps.get(entry, []):
        for dtype, dims in _ARRAY.findall(inst.shape):
            dims = tuple(int(d) for d in dims.split(",") if d)
            if dtype == "f32" and dims in shapes and inst.opcode in ("convert", "fusion", "copy"):
                total += 4 * math.prod(dims)
    return total
