"""Compile captured graphs with the TPU compiler, on a machine without a TPU.

    python -m torchxla_rlhf.aot.compile WORKDIR TARGET.json

libtpu builds a *compile-only* PJRT client from a topology description (``v3:8x16`` is a
v3-256), so XLA:TPU itself compiles a program for a pod here and reports its per-device
memory (``memory_analysis``), its cost (flops, the compiler's ``optimal_seconds``) and the
compiled HLO, or refuses with its own out-of-memory report. This module is that side of
``plan --compile``: it imports jax (the ``aot`` extra: the jax / jaxlib / libtpu that torch_xla
2.9 pairs with) and never torch, and runs in its own process with ``JAX_PLATFORMS=cpu``, so no
TPU is opened and torch_xla never sees libtpu as its device.

Each graph comes from :mod:`torchxla_rlhf.aot.trace` as ``NAME.hlo.pb`` (torch_xla's SPMD
module, before partitioning) and ``NAME.json`` (the shardings of its placeholder arguments,
the arguments it updates in place, the mesh it was traced on, and for a rollout in the
generation layout the factor ``f`` of its ``tp = mp * f``). On the way to the compiler:

1. ``hlo_to_stablehlo`` converts the module (it keeps shardings, drops buffer donors);
2. each placeholder argument gets its sharding and each in-place argument
   ``jax.buffer_donor`` (torch_xla aliases those buffers to the outputs);
3. every sharding is re-expressed from the traced mesh to the target mesh
   (:func:`remap_sharding`): torch's autograd cannot run on 128 or more virtual CPU devices,
   so 13B graphs are traced on at most 64 with the same axes and the global shapes of the
   target (valid because no global shape depends on the device count); the generation
   layout's shardings, made on a ``(data, tp)`` mesh over the same devices, are re-expressed
   through the finer ``(dp, fsdp / f, f, mp)`` mesh both layouts are specs on
   (:func:`split_fsdp`);
4. the module compiles with torch_xla's options (SPMD partitioning, outputs' shardings
   propagated) and torch_xla's TPU flags (``libtpu_flags.py``).

TARGET.json: ``{"topology": "v3:8x16", "mesh": [dp, fsdp, mp], "cpu": false, ...}`` (``"graphs"``:
only these; ``"keep_hlo"``: write each compiled module's text, ``NAME.tpu.hlo.txt``); with
``"cpu": true`` the same module is compiled by XLA:CPU instead (the cross-check with torch_xla's
own buffer assignment). Writes ``NAME.result.json`` per graph.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from typing import Any, Sequence

SHARDING = re.compile(r'mhlo\.sharding = "\{(.*?)\}"')


# ----------------------------------------------------------------------------------------
# Shardings from one mesh to another (pure: numpy only)
# ----------------------------------------------------------------------------------------


def _tiles(spec: tuple, mesh_shape: Sequence[int]):
    """Tile dims and device ids of a partition ``spec`` (per tensor dim, a tuple of mesh
    axes) over a mesh of ``mesh_shape`` with devices numbered in order, as torch_xla's and
    JAX's meshes lay them out; axes the spec leaves out become a replicated last tile dim."""
    import numpy as np

    ids = np.arange(int(np.prod(mesh_shape))).reshape(mesh_shape)
    used = [a for axes in spec for a in axes]
    unused = [a for a in range(len(mesh_shape)) if a not in used]
    dims = [int(np.prod([mesh_shape[a] for a in axes])) for axes in spec]
    rep = int(np.prod([mesh_shape[a] for a in unused])) if unused else 1
    tiles = ids.transpose(used + unused)
    if rep > 1:
        return dims + [rep], tiles.reshape(dims + [rep]), True
    return dims, tiles.reshape(dims), False


def _specs(rank: int, n_axes: int):
    """Every way to assign mesh axes to tensor dims (each axis to one dim or none; the axes
    of one dim in every order)."""
    for assign in itertools.product([None, *range(rank)], repeat=n_axes):
        per_dim: dict[int, list[int]] = {}
        for axis, dim in enumerate(assign):
            if dim is not None:
                per_dim.setdefault(dim, []).append(axis)
        groups = [per_dim.get(d, []) for d in range(rank)]
        for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
            yield tuple(tuple(o) for o in orders)


def _parse(body: str):
    """``devices=[4,1,2]0,1,...`` or the iota form ``devices=[4,2]<=[8]`` /
    ``<=[2,4]T(1,0)`` -> (tile dims, device ids shaped as the tiles, replicated last dim,
    the remaining attributes); None for replicated, maximal and manual shardings."""
    import numpy as np

    m = re.match(r"devices=\[([\d,]+)\](\S+)(.*)$", body.strip())
    if not m:
        return None
    dims = [int(x) for x in m.group(1).split(",")]
    ids_text, rest = m.group(2), m.group(3)
    if ids_text.startswith("<="):
        im = re.match(r"<=\[([\d,]+)\](?:T\(([\d,]+)\))?$", ids_text)
        shape = [int(x) for x in im.group(1).split(",")]
        ids = np.arange(int(np.prod(shape))).reshape(shape)
        if im.group(2):
            ids = ids.transpose([int(x) for x in im.group(2).split(",")])
    else:
        ids = np.array([int(x) for x in ids_text.split(",")])
    rep = "last_tile_dim_replicate" in rest
    rest = rest.replace("last_tile_dim_replicate", "").strip()
    return dims, ids.reshape(dims), rep, rest


def remap_sharding(text: str, src: Sequence[int], dst: Sequence[int]) -> str:
    """One HLO sharding (inside its braces) over mesh ``src`` re-expressed over mesh ``dst``
    (same axes, other sizes): the partition spec that produces it on ``src`` (found by
    search), laid out on ``dst``. A tuple sharding is remapped element by element."""
    import numpy as np

    s = text.strip()
    if s.startswith("{"):
        items, depth, cur = [], 0, ""
        for ch in s[1:-1] if s.endswith("}") else s:
            depth += ch == "{"
            if depth:
                cur += ch
            if ch == "}":
                depth -= 1
                if depth == 0:
                    items.append(cur[1:-1])
                    cur = ""
        return "{" + ", ".join("{" + remap_sharding(i, src, dst) + "}" for i in items) + "}"
    parsed = _parse(s)
    if parsed is None:
        return s
    dims, ids, rep, rest = parsed
    rank = len(dims) - int(rep)
    for spec in _specs(rank, len(src)):
        d, t, r = _tiles(spec, src)
        if r == rep and d == dims and np.array_equal(t, ids):
            nd, nt, nr = _tiles(spec, dst)
            out = f"devices=[{','.join(map(str, nd))}]{','.join(map(str, nt.reshape(-1)))}"
            out += " last_tile_dim_replicate" if nr else ""
            return out + (f" {rest}" if rest else "")
    raise ValueError(f"sharding {{{s}}} is no partition spec over the mesh {tuple(src)}")


def split_fsdp(src: Sequence[int], dst: Sequence[int], f: int) -> tuple[tuple, tuple]:
    """The traced and the target ``(dp, fsdp, mp)`` meshes as the finer ``(dp, fsdp / f, f,
    mp)`` meshes, on which both the training layout's shardings and the generation layout's
    (a ``(data, tp)`` mesh over the same devices, ``tp = mp * f``: ``data`` is ``(dp, fsdp /
    f)``, ``tp`` is ``(f, mp)``, ``runtime.generation_mesh``) are partition specs, so
    :func:`remap_sharding` re-expresses both. ``f = 1``: the meshes as they are (``tp = mp``,
    ``data = (dp, fsdp)``). The split of ``fsdp`` must be over several devices on both meshes
    or on neither: a sharding over an axis of one device cannot say whether it splits over it."""
    if f <= 1:
        return tuple(src), tuple(dst)
    out = []
    for dp, fsdp, mp in (src, dst):
        if fsdp % f:
            raise ValueError(f"generation layout tp = mp * {f}: {f} does not divide fsdp of the mesh "
                             f"{(dp, fsdp, mp)}")
        out.append((dp, fsdp // f, f, mp))
    if (out[0][1] > 1) != (out[1][1] > 1):
        raise ValueError(f"generation layout tp = mp * {f}: fsdp / {f} is {out[0][1]} on the traced mesh "
                         f"{tuple(src)} and {out[1][1]} on {tuple(dst)}: trace on a mesh with fsdp / {f} > 1")
    return out[0], out[1]


def remap_module_text(text: str, src: Sequence[int], dst: Sequence[int]) -> str:
    """Every ``mhlo.sharding`` and the partition count of a StableHLO module's text, from
    mesh ``src`` to mesh ``dst`` (any number of axes: :func:`split_fsdp`'s finer meshes)."""
    import math

    if tuple(src) == tuple(dst):
        return text
    cache: dict[str, str] = {}

    def sub(m: re.Match) -> str:
        if m.group(1) not in cache:
            cache[m.group(1)] = remap_sharding(m.group(1), src, dst)
        return f'mhlo.sharding = "{{{cache[m.group(1)]}}}"'

    text = SHARDING.sub(sub, text)
    return re.sub(r"mhlo\.num_partitions = \d+", f"mhlo.num_partitions = {math.prod(dst)}", text)


# ----------------------------------------------------------------------------------------
# The compiled HLO, read
# ----------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the compiled module holds (async starts counted once; the
    TPU's reduce-scatter is a fusion calling ``%all-reduce-scatter``)."""
    out: dict[str, int] = {}
    for op in COLLECTIVES:
        n = len(re.findall(r"= \S+ " + re.escape(op) + r"(?:-start)?\(", hlo_text))
        n += len(re.findall(r"= \([^=]*\) " + re.escape(op) + r"(?:-start)?\(", hlo_text))
        if n:
            out[op] = n
    fused = len(re.findall(r"calls=%all-reduce-scatter", hlo_text))
    if fused:
        out["reduce-scatter"] = out.get("reduce-scatter", 0) + fused
    return out


def oom_report(message: str) -> dict[str, Any]:
    """The TPU compiler's out-of-memory verdict: bytes used and available, and its text."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def size(v: str, u: str) -> int:
        return int(float(v) * units.get(u, 1))

    m = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
    out: dict[str, Any] = {"oom": True, "report": message[:6000]}
    if m:
        out["used_bytes"] = size(m.group(1), m.group(2) or "")
        out["hbm_bytes"] = size(m.group(3), m.group(4) or "")
    return out


# ----------------------------------------------------------------------------------------
# torch_xla's own dumped modules (the cross-check with its XLA:CPU buffer assignment)
# ----------------------------------------------------------------------------------------


def _fields(buf: bytes):
    """Protobuf wire format: ``(field, wire type, value)`` of each field of ``buf``."""
    i = 0

    def varint(i: int) -> tuple[int, int]:
        v = shift = 0
        while True:
            b = buf[i]
            v |= (b & 0x7F) << shift
            i += 1
            shift += 7
            if not b & 0x80:
                return v, i

    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            v, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            v, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} is not read here")
        yield field, wire, v


def module_proto(data: bytes) -> bytes:
    """The ``HloModuleProto`` of an XLA dump's ``*.hlo.pb`` (an ``HloProto``, whose field 1
    is the module) or the module itself."""
    for field, wire, v in _fields(data):
        if field == 1 and wire == 2 and not all(32 <= c < 127 for c in v[:64]):
            return bytes(v)  # a module, not a name
        break
    return data


def proto_donors(proto: bytes) -> list[int]:
    """The parameters torch_xla marked donated in a module it compiled (``buffer_donor``,
    field 18, and ``input_output_alias``, field 8): ``hlo_to_stablehlo`` drops them."""
    out = set()
    for field, wire, v in _fields(proto):
        if field in (8, 18) and wire == 2:
            for f2, w2, entry in _fields(v):
                if f2 == 1 and w2 == 2:
                    number = 0  # proto3 leaves parameter 0 out
                    for f3, w3, x in _fields(entry):
                        if f3 == (1 if field == 18 else 2) and w3 == 0:
                            number = x
                    out.add(number)
    return sorted(out)


# ----------------------------------------------------------------------------------------
# Compile (jax side)
# ----------------------------------------------------------------------------------------


def _prepare(proto: bytes, meta: dict, dst_mesh: Sequence[int]):
    """StableHLO bytecode for the target: placeholder shardings and donors set on ``@main``'s
    arguments, shardings remapped from the traced mesh to ``dst_mesh``."""
    from jax._src.interpreters import mlir
    from jax._src.lib import _jax
    from jax._src.lib.mlir import ir

    shlo = _jax.mlir.hlo_to_stablehlo(proto)
    shardings = {int(k): v for k, v in meta.get("arg_shardings", {}).items()}
    donors = set(proto_donors(proto) if meta.get("from_proto") else meta.get("donors", []))
    with mlir.make_ir_context():
        module = ir.Module.parse(shlo)
        main = next(op for op in module.body.operations
                    if "sym_name" in op.attributes and ir.StringAttr(op.attributes["sym_name"]).value == "main")
        attrs = []
        n_args = len(main.regions[0].blocks[0].arguments)
        given = (list(ir.ArrayAttr(main.attributes["arg_attrs"])) if "arg_attrs" in main.attributes
                 else [ir.DictAttr.get({})] * n_args)  # no argument has attributes
        for i, d in enumerate(given):
            d = ir.DictAttr(d)
            entries = {d[j].name: d[j].attr for j in range(len(d))}
            if i in shardings and "mhlo.sharding" not in entries:
                entries["mhlo.sharding"] = ir.StringAttr.get(shardings[i])
            if i in donors:
                entries["jax.buffer_donor"] = ir.BoolAttr.get(True)
            attrs.append(ir.DictAttr.get(entries))
        main.attributes["arg_attrs"] = ir.ArrayAttr.get(attrs)
        src, dst = split_fsdp(meta["mesh"], dst_mesh, meta.get("layout_f", 1))
        text = remap_module_text(str(module), src, dst)
        return mlir.module_to_bytecode(ir.Module.parse(text))


def _devices(target: dict, n: int) -> list:
    import jax

    if target.get("cpu"):
        if jax.config.jax_num_cpu_devices < n:  # settable once, before the first use
            jax.config.update("jax_num_cpu_devices", n)
        return jax.devices("cpu")[:n]
    from jax.experimental import topologies

    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in target.get("topology_kwargs", {}).items()}
    topo = topologies.get_topology_desc(target["topology"], platform="tpu", **kwargs)
    if len(topo.devices) < n:
        raise ValueError(f"topology {target['topology']} has {len(topo.devices)} devices; the mesh needs {n}")
    return list(topo.devices[:n])


def _options(devices: list):
    import numpy as np
    from jax._src import compiler

    n = len(devices)
    opts = compiler.get_compile_options(num_replicas=1, num_partitions=n,
                                        device_assignment=np.array(devices).reshape(1, n),
                                        use_spmd_partitioning=True)
    build = opts.executable_build_options
    build.use_spmd_partitioning = True
    build.use_shardy_partitioner = False  # torch_xla's modules carry GSPMD shardings
    build.allow_spmd_sharding_propagation_to_output = [True]  # as torch_xla compiles
    return opts


def _memory(exe) -> dict[str, int]:
    stats = exe.get_compiled_memory_stats()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
    return {k.replace("_size_in_bytes", "").replace("_in_bytes", ""): int(getattr(stats, k))
            for k in keys if hasattr(stats, k)}


def _cost(exe) -> dict[str, float]:
    try:
        c = exe.cost_analysis()
    except Exception as e:  # noqa: BLE001 - a missing cost model is reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    c = (c[0] if c else {}) if isinstance(c, list) else (c or {})
    return {k: float(v) for k, v in c.items()
            if k in ("flops", "bytes accessed", "transcendentals", "optimal_seconds")}


def compile_graph(proto: bytes, meta: dict, target: dict, hlo_out: str | None = None) -> dict:
    """Compile one captured graph for ``target``; its memory, cost and collectives, or the
    compiler's refusal (``oom`` with the report when it ran out of memory)."""
    from jax._src.lib import _jax

    dst = target.get("mesh") or meta["mesh"]
    n = 1
    for s in dst:
        n *= s
    result: dict[str, Any] = {"graph": meta["name"], "mesh": list(dst), "devices": n,
                              "target": "XLA:CPU" if target.get("cpu") else target["topology"]}
    try:
        module = _prepare(proto, meta, dst)
        devices = _devices(target, n)
        client = devices[0].client
        build = client.compile_and_load if target.get("cpu") else client.compile
        exe = build(module, executable_devices=_jax.DeviceList(tuple(devices)),
                    compile_options=_options(devices))
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is the result
        text = f"{type(e).__name__}: {e}"
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            result.update(ok=False, **oom_report(text))
        else:
            result.update(ok=False, error=text[:3000])
        return result
    hlo = exe.hlo_modules()[0].to_string()
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(hlo)
    result.update(ok=True, memory=_memory(exe), cost=_cost(exe), collectives=collectives(hlo))
    return result


def main(argv: list[str]) -> int:
    workdir, target_path = argv
    with open(target_path) as f:
        target = json.load(f)
    if not target.get("cpu"):
        from torchxla_rlhf.libtpu_flags import TORCH_XLA_TPU_FLAGS, TORCH_XLA_V5_FLAGS

        flags = TORCH_XLA_TPU_FLAGS + (TORCH_XLA_V5_FLAGS if target["topology"].startswith("v5") else ())
        os.environ["LIBTPU_INIT_ARGS"] = " ".join([os.environ.get("LIBTPU_INIT_ARGS", ""), *flags]).strip()
    suffix = target.get("suffix", "tpu")
    only = target.get("graphs")
    for name in sorted(f[:-len(".hlo.pb")] for f in os.listdir(workdir) if f.endswith(".hlo.pb")):
        if only is not None and name not in only:
            continue
        with open(os.path.join(workdir, f"{name}.hlo.pb"), "rb") as f:
            proto = f.read()
        with open(os.path.join(workdir, f"{name}.json")) as f:
            meta = json.load(f)
        hlo_out = os.path.join(workdir, f"{name}.{suffix}.hlo.txt") if target.get("keep_hlo") else None
        result = compile_graph(proto, meta, target, hlo_out)
        with open(os.path.join(workdir, f"{name}.{suffix}.result.json"), "w") as f:
            json.dump(result, f)
        print(json.dumps({k: result.get(k) for k in ("graph", "ok", "memory")}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never open a TPU
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server on this host
    # Compile-only clients of several processes (tests, plan runs side by side) share no
    # chip: the lockfile libtpu takes for a real TPU would refuse the second one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    sys.exit(main(sys.argv[1:]))
