"""Read what XLA wrote with ``XLA_FLAGS=--xla_dump_to=DIR``: per-device memory and the
collectives of each compiled module. Pure text parsing (no torch_xla).

Why dumps: on XLA:CPU ``xm.get_memory_info`` raises ``GetAllocatorStats is not supported``, but
every compiled module's buffer assignment is dumped as ``*-memory-usage-report.txt``, whose
first line ``Total bytes used: N`` is the size of all buffers the per-device program allocates
(parameters, outputs and the temp arena). Under SPMD the module is the partitioned,
per-device program, so this is the per-device peak of that graph; the run's peak is the
largest over its graphs (everything a graph touches is among its parameters).
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass

_TOTAL = re.compile(r"^Total bytes used: (\d+)", re.M)
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*)$", re.M)
_ARRAY = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_GROUPS = r"(\{[{}\d,]*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)"
"""A collective's ``replica_groups``, explicit or iota (:func:`expand_replica_groups`)."""
_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* all-gather(?:-start)?\(.*?replica_groups=" + _GROUPS)


def module_name(path: str) -> str:
    """``module_0003.probe.123.cpu_after_...txt`` -> ``probe``: the graph's name."""
    parts = os.path.basename(path).split(".")
    return parts[1] if len(parts) > 2 else parts[0]


def peak_bytes_by_module(dump_dir: str) -> dict[str, int]:
    """Per-device bytes of every module in ``dump_dir``, keyed ``"<index>.<name>"``."""
    out: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt"))):
        with open(path) as f:
            m = _TOTAL.search(f.read(200))
        if m:
            base = os.path.basename(path).split(".")
            out[f"{base[0]}.{base[1]}"] = int(m.group(1))
    return out


def optimized_hlo(dump_dir: str, name: str) -> str:
    """Text of the (last) optimized per-device HLO module whose graph is called ``name``."""
    paths = sorted(p for p in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
                   if module_name(p) == name)
    if not paths:
        found = sorted({module_name(p) for p in glob.glob(os.path.join(dump_dir, "*.txt"))})
        raise FileNotFoundError(f"no optimized HLO module named {name!r} in {dump_dir} ({found})")
    with open(paths[-1]) as f:
        return f.read()


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def array_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array an instruction in ``hlo`` produces (tuple elements
    included)."""
    shapes = []
    for m in _INSTR.finditer(hlo):
        lhs = m.group(1).split(" ", 1)[0] if not m.group(1).startswith("(") else m.group(1).split(")", 1)[0]
        shapes.extend((d, _dims(s)) for d, s in _ARRAY.findall(lhs))
    return shapes


def expand_replica_groups(text: str, n_devices: int) -> list[tuple[int, ...]]:
    """Replica groups in either HLO spelling: explicit ``{{0,1},{2,3}}`` or iota
    ``[G,S]<=[d0,d1,...]T(perm)`` (devices ``arange`` reshaped to ``d``, transposed by
    ``perm``, flattened into G groups of S)."""
    if text.startswith("{"):
        return [tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", text)]
    import numpy as np

    m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        raise ValueError(f"unrecognised replica_groups {text!r}")
    g, s = int(m.group(1)), int(m.group(2))
    ids = np.arange(n_devices).reshape(_dims(m.group(3)))
    if m.group(4):
        ids = ids.transpose(_dims(m.group(4)))
    return [tuple(int(x) for x in row) for row in ids.reshape(g, s)]


@dataclass(frozen=True)
class Collective:
    """One all-gather: its output array and device groups."""

    dtype: str
    dims: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]


def all_gathers(hlo: str, n_devices: int) -> list[Collective]:
    """Every all-gather in ``hlo`` with its output shape and expanded replica groups."""
    return [
        Collective(d, _dims(s), tuple(expand_replica_groups(g, n_devices)))
        for d, s, g in _ALL_GATHER.findall(hlo)
    ]


def mesh_axis_groups(shape: tuple[int, ...], axis: int) -> set[tuple[int, ...]]:
    """Device groups along one axis of a mesh built as ``arange(n).reshape(shape)`` (what
    runtime.make_mesh builds): e.g. the ``mp`` groups of ``(1, 2, 4)`` are ``{0..3}, {4..7}``."""
    import numpy as np

    ids = np.moveaxis(np.arange(int(np.prod(shape))).reshape(shape), axis, -1)
    return {tuple(int(x) for x in row) for row in ids.reshape(-1, shape[axis])}


def entry_parameters(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of the entry computation's parameters: the buffers the program reads
    from device memory (model weights, a KV cache), as opposed to the values inside fusions
    (on XLA:CPU those include f32 upcasts of bf16 operands: it has no bf16 dot)."""
    start = hlo.find("\nENTRY ")
    if start < 0:
        raise ValueError("HLO text has no ENTRY computation")
    body = hlo[start: hlo.find("\n}", start)]
    return [(d, _dims(s)) for d, s in re.findall(
        r"= (\w+)\[([\d,]*)\][^ ]* parameter\(\d+\)", body)]


def computations(hlo: str) -> dict[str, str]:
    """Body text of every computation in an HLO module, keyed by name (the entry's too)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = out.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def while_body_computations(hlo: str) -> set[str]:
    """Names of the computations that run inside a ``While`` body: every ``body=`` and
    whatever those call, transitively (fusions, reductions, nested loops)."""
    comps = computations(hlo)
    todo = [b for text in comps.values() for b in re.findall(r"\bbody=%?([\w.\-]+)", text)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)",
                           comps[name])
    return seen


def all_gathers_in_and_out_of_loops(
    hlo: str, n_devices: int
) -> tuple[list[Collective], list[Collective]]:
    """The module's all-gathers split into (inside a ``While`` body, everywhere else)."""
    comps = computations(hlo)
    body = while_body_computations(hlo)
    inside = [ag for name in body for ag in all_gathers(comps[name], n_devices)]
    outside = [ag for name, text in comps.items() if name not in body
               for ag in all_gathers(text, n_devices)]
    return inside, outside


# ----------------------------------------------------------------------------------------
# Every collective, per loop iteration: what a decode step moves
# ----------------------------------------------------------------------------------------

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\w+\[[\d,]*\])\S* "
    r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\((.*)$",
    re.M)


@dataclass(frozen=True)
class Transfer:
    """One collective of any kind: its output arrays (a tuple-shaped all-reduce has several)
    and device groups (``source_target_pairs`` of a collective-permute, as pairs)."""

    name: str
    kind: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def bytes(self) -> int:
        """Bytes of its output per device: what the device holds after it (an all-reduce's
        buffer, an all-gather's gathered result): the measure of its traffic used here."""
        return sum(_BYTES[d] * math.prod(dims) for d, dims in self.arrays)

    @property
    def elements(self) -> tuple[int, ...]:
        return tuple(math.prod(dims) for _, dims in self.arrays)


def collectives(hlo: str, n_devices: int) -> list[Transfer]:
    """Every collective in ``hlo`` (text of a module or of some computations)."""
    out = []
    for m in _COLLECTIVE.finditer(hlo):
        arrays = tuple((d, _dims(s)) for d, s in _ARRAY.findall(m.group(2)))
        g = re.search(r"replica_groups=" + _GROUPS, m.group(4))
        if g:
            groups = tuple(expand_replica_groups(g.group(1), n_devices))
        else:
            pairs = re.search(r"source_target_pairs=(\{[{}\d,]*\})", m.group(4))
            groups = tuple(expand_replica_groups(pairs.group(1), n_devices)) if pairs else ()
        out.append(Transfer(m.group(1), m.group(3), arrays, groups))
    return out


@dataclass(frozen=True)
class LoopCollectives:
    """A module's collectives split by where they run: ``inside`` a ``While`` body (once per
    iteration) and ``outside`` (once per launch)."""

    inside: list[Transfer]
    outside: list[Transfer]

    @property
    def bytes_per_iteration(self) -> int:
        return sum(t.bytes for t in self.inside)

    def table(self) -> str:
        """One line per kind and shape: count, bytes per iteration and device, groups."""
        lines = []
        for where, items in (("while body (per iteration)", self.inside),
                             ("outside the loop (per launch)", self.outside)):
            total = sum(t.bytes for t in items)
            lines.append(f"{where}: {len(items)} collectives, {total} bytes per device")
            rows: dict[tuple, list[int]] = {}
            for t in items:
                key = (t.kind, t.arrays, len(t.groups[0]) if t.groups else 0)
                rows.setdefault(key, []).append(t.bytes)
            for (kind, arrays, size), bs in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
                shape = ",".join(f"{d}[{'x'.join(map(str, dims))}]" for d, dims in arrays)
                lines.append(f"  {len(bs):4d} x {kind:<18} {shape:<28} groups of {size:<3} "
                             f"{sum(bs):>12} bytes")
        return "\n".join(lines)


def loop_collectives(hlo: str, n_devices: int) -> LoopCollectives:
    """The module's collectives, inside a ``While`` body and outside it."""
    comps = computations(hlo)
    body = while_body_computations(hlo)
    inside = [t for name in sorted(body) for t in collectives(comps[name], n_devices)]
    outside = [t for name, text in comps.items() if name not in body
               for t in collectives(text, n_devices)]
    return LoopCollectives(inside, outside)


def weight_sized(transfers: list[Transfer], weight_elements: set[int]) -> list[Transfer]:
    """The collectives one of whose arrays has a weight's element count, whole or split any
    of the ways given (pass ``{numel / k}`` for the mesh's divisors ``k``)."""
    return [t for t in transfers if any(e in weight_elements for e in t.elements)]


# ----------------------------------------------------------------------------------------
# The buffer assignment's live ranges: what a peak is made of
# ----------------------------------------------------------------------------------------

_ALL_REDUCE = re.compile(
    r"%([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* all-reduce(?:-start)?\(.*?replica_groups=" + _GROUPS)


@dataclass(frozen=True)
class BufferTimeline:
    """One module's buffers over its schedule, from ``*-buffer-assignment.txt``."""

    total: int
    """``Total bytes used``: every allocation (what bench/memory.py calls the module's peak)."""
    parameter_bytes: int
    """Allocations of entry parameters (the caller's buffers: weights, optimizer state)."""
    temp: list[tuple[str, int, int, int]]
    """``(value, bytes, first, last)`` of every value outside the parameter allocations."""

    def live(self, names: set[str] | None = None) -> list[int]:
        """Bytes of the temp values (of ``names`` only, if given) live at each schedule step."""
        n = max((last for _, _, _, last in self.temp), default=0) + 2
        delta = [0] * (n + 1)
        for name, size, first, last in self.temp:
            if names is None or name in names:
                delta[first] += size
                delta[last + 1] -= size
        out, cur = [], 0
        for d in delta[:n]:
            cur += d
            out.append(cur)
        return out


def buffer_timeline(dump_dir: str, name: str) -> BufferTimeline:
    """The (last) dumped module named ``name``'s buffers and their live ranges."""
    paths = sorted(p for p in glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt"))
                   if module_name(p) == name)
    if not paths:
        raise FileNotFoundError(f"no buffer assignment of a module named {name!r} in {dump_dir}")
    with open(paths[-1]) as f:
        text = f.read()
    head, _, tail = text.partition("\nTotal bytes used: ")
    total = int(tail.split(" ", 1)[0])
    in_params, param_bytes = set(), 0
    for block in re.split(r"\n(?=allocation \d+:)", head):
        m = re.match(r"allocation \d+: size (\d+), parameter", block)
        if m:
            param_bytes += int(m.group(1))
            in_params |= set(re.findall(r"value: <\d+ ([\w.\-]+) @", block))
    sizes: dict[str, int] = {}
    for m in re.finditer(r"value: <\d+ ([\w.\-]+) @[\d,]*> \(size=(\d+)", text):
        sizes[m.group(1)] = max(sizes.get(m.group(1), 0), int(m.group(2)))
    ranges = text.partition("BufferLiveRange:")[2].partition("Live ranges at")[0]
    temp = [(m.group(1), sizes.get(m.group(1), 0), int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\s+([\w.\-]+)\{\}:(\d+)-(\d+)$", ranges, re.M)
            if m.group(1) not in in_params]
    return BufferTimeline(total, param_bytes, temp)


def gradient_all_reduces(hlo: str, n_devices: int, group_size: int,
                         elements: set[int]) -> set[str]:
    """Names of the all-reduces over groups of ``group_size`` devices (the fsdp axis) whose
    output has one of ``elements`` elements (a weight, whole over fsdp): the FSDP gradient
    reductions, as opposed to the activations' all-reduces over ``mp``."""
    out = set()
    for m in _ALL_REDUCE.finditer(hlo):
        groups = expand_replica_groups(m.group(4), n_devices)
        if len(groups[0]) == group_size and math.prod(_dims(m.group(3))) in elements:
            out.add(m.group(1))
    return out


def peak_with_scattered_gradients(dump_dir: str, name: str, n_devices: int, fsdp: int,
                                  weight_elements: set[int]) -> int:
    """The module's ``Total bytes used`` had its FSDP gradient all-reduces been
    reduce-scatters (what TPU and GPU compilers make of all-reduce + slice): from the buffer
    live ranges, every gradient all-reduce's output counted at ``1 / fsdp`` of its bytes over
    the same range, the temp peak taken again. XLA:CPU forms no reduce-scatter; this is the
    same program's schedule, not a second compile."""
    tl = buffer_timeline(dump_dir, name)
    grads = gradient_all_reduces(optimized_hlo(dump_dir, name), n_devices, fsdp, weight_elements)
    live, grad = tl.live(), tl.live(grads)
    scattered = max(a - g + g / fsdp for a, g in zip(live, grad))
    return int(tl.total - max(live) + scattered)
