"""``plan --compile``: the TPU compiler's per-device peak of each of a run's graphs, beside
the planner's, on a machine without a TPU.

For each depth (at least two, reduced from the model's own: 13B layers at full width fit no
CPU host, and need none: weights are placeholders), one process traces the trainer's graphs
(:mod:`~torchxla_rlhf.aot.trace`) on at most 64 virtual CPU devices, the pod's mesh with its
``fsdp`` (then ``dp``) axis shrunk and ``mp`` kept (the heads' split, and so every sharding
annotation the code makes, is the pod's); one more compiles them for the pod's topology
(:mod:`~torchxla_rlhf.aot.compile`, the ``aot`` extra), the shardings remapped to the pod's
mesh. A graph's peak at the full depth is the line through the two deepest depths (the
per-layer slope; its weights and optimizer state per layer are already in it); where a depth
runs out of memory the compiler's own report is the verdict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

from torchxla_rlhf.errors import UserError

MAX_TRACE_DEVICES = 64
"""torch's autograd indexes devices with an int8 (``c10::DeviceIndex``): with 128 or more
local XLA:CPU devices ``backward`` fails, so graphs are traced on at most 64."""

DEPTHS = (2, 4)
"""Decoder layers traced: the slope between them extrapolates to the model's depth."""

AOT_PACKAGES = ("jax", "jaxlib", "libtpu")
INSTALL = 'pip install -e ".[aot]"'


class AotMissing(UserError, RuntimeError):
    """``plan --compile`` without the ``aot`` extra (jax, jaxlib, libtpu)."""


class CompileFailed(UserError, RuntimeError):
    """A trace or compile subprocess failed for a reason other than memory."""


def require_aot() -> None:
    missing = [p for p in AOT_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise AotMissing(f"--compile needs the TPU compiler ({', '.join(missing)} not installed): "
                         f"{INSTALL} (jax 0.7.1, jaxlib 0.7.1, libtpu 0.0.21, as torch_xla 2.9 pairs them)")


def topology(pod_name: str) -> tuple[str, dict]:
    """libtpu's topology name (and options) of a pod: chips in a grid, two v3 cores per chip as
    two devices; v4 and v5p chips are one megacore device each. ``v3-256`` -> ``v3:8x16``,
    ``v4-64`` -> ``v4:2x4x4``, ``v5p-32`` -> ``v5:2x2x4``."""
    from torchxla_rlhf.preflight.mesh import tpu_pod

    pod = tpu_pod(pod_name)
    gen = pod.name.lower().split("-")[0]
    chips = int(pod.name.split("-")[1]) // 2
    if gen == "v3":
        x = 1 << (chips.bit_length() - 1) // 2
        return f"v3:{x}x{chips // x}", {}
    dims, left = [], chips
    for k in (3, 2, 1):
        d = 1 << round((left.bit_length() - 1) / k - 0.49)
        dims.append(max(1, d))
        left //= max(1, d)
    dims = sorted(dims)
    name = {"v4": "v4", "v5p": "v5"}[gen]
    return (f"{name}:{'x'.join(map(str, dims))}",
            {"chip_config_name": "megacore", "chips_per_host_bounds": [2, 2, 1],
             "wrap": [d >= 4 for d in dims]})


def trace_mesh(mesh: Sequence[int], limit: int = MAX_TRACE_DEVICES, f: int = 1) -> tuple[int, int, int]:
    """The pod's ``(dp, fsdp, mp)`` with ``fsdp``, then ``dp``, halved until at most ``limit``
    devices (``mp`` kept: the heads' split decides the code's own annotations). An axis longer
    than one keeps at least two devices: a sharding over an axis of one device could not say
    whether it splits over that axis, and the remap must know. ``f``: the generation layout's
    ``tp = mp * f`` splits ``fsdp`` into ``(fsdp / f, f)`` (``aot.compile.split_fsdp``); both
    parts are kept so (``f`` whole, ``fsdp / f`` at least two where the pod's is)."""
    dp, fsdp, mp = mesh
    if fsdp % f:
        raise CompileFailed(f"mesh {tuple(mesh)}: generation_tp={mp * f} needs mp * f with f dividing fsdp")
    while dp * fsdp * mp > limit and fsdp % (2 * f) == 0 and fsdp // f > 2:
        fsdp //= 2
    while dp * fsdp * mp > limit and dp % 2 == 0 and dp > 2:
        dp //= 2
    if dp * fsdp * mp > limit:
        what = f"mp={mp}" + (f" and the generation layout's tp={mp * f}" if f > 1 else "")
        raise CompileFailed(f"mesh {tuple(mesh)}: cannot trace on {limit} devices or fewer with {what}")
    return dp, fsdp, mp


def layout_tp(overrides: Sequence[str], pod_mesh: Sequence[int]) -> int:
    """The generation layout's ``tp`` the overrides give the rollout (``sampling_overrides``
    gives both fields; ``generation_tp=0``: ``mp * fsdp`` of the pod), 0 for another policy."""
    values = dict(o.split("=", 1) for o in overrides if o.startswith("sampling.") and "=" in o)
    if values.get("sampling.gather_weights") != "generation_layout":
        return 0
    return int(values.get("sampling.generation_tp", 0)) or pod_mesh[1] * pod_mesh[2]


@dataclass
class GraphVerdict:
    """One graph: the compiler's figures per traced depth, and at the model's depth."""

    name: str
    results: dict[int, dict] = field(default_factory=dict)
    """Depth -> the compile result (``aot.compile.compile_graph``)."""
    layers: int = 0

    def peak_at(self, depth: int) -> int | None:
        r = self.results.get(depth) or {}
        return (r.get("memory") or {}).get("peak_memory")

    @property
    def oom(self) -> dict | None:
        return next((r for r in self.results.values() if r.get("oom")), None)

    @property
    def slope(self) -> float | None:
        (d1, p1), (d2, p2) = self._two()
        return None if p1 is None or p2 is None else (p2 - p1) / (d2 - d1)

    def _two(self):
        ds = sorted(d for d in self.results if self.peak_at(d) is not None)[-2:]
        if len(ds) < 2:
            return (0, None), (0, None)
        return (ds[0], self.peak_at(ds[0])), (ds[1], self.peak_at(ds[1]))

    @property
    def peak(self) -> float | None:
        """Per-device peak at the model's depth: compiled at that depth, else the line through
        the two deepest depths."""
        if self.peak_at(self.layers) is not None:
            return self.peak_at(self.layers)
        (d1, p1), (d2, p2) = self._two()
        if p1 is None or p2 is None:
            return None
        return p2 + (self.layers - d2) * (p2 - p1) / (d2 - d1)

    def at(self, depth: int) -> dict:
        return self.results.get(depth) or {}


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), JAX_PLATFORMS="cpu",
               TPU_SKIP_MDS_QUERY="1", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    return env


def _run(argv: list[str], env: dict, what: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "ignore", *argv], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("    @")]
        raise CompileFailed(f"{what} failed (exit {proc.returncode}): {' | '.join(tail[-3:])[:800]}")
    return proc.stdout


def compile_run(config_path: str, overrides: list[str], shapes: dict, pod_name: str,
                pod_mesh: Sequence[int], depths: Sequence[int] = DEPTHS,
                workdir: str | None = None, say=print, cpu: bool = False,
                trace_devices: int = MAX_TRACE_DEVICES, split: bool = True,
                graphs: Sequence[str] | None = None, keep_hlo: bool = False) -> dict[str, GraphVerdict]:
    """Trace and compile the run's graphs at ``depths`` for ``pod_name`` (module docstring);
    the verdict per graph name. ``cpu``: compile with XLA:CPU instead (the cross-check);
    ``trace_devices``: trace on at most this many devices (the remap's test); ``split``: the
    trainers' micro-step and update graphs (False: both in one, as ``bench/memory.py``);
    ``graphs``: compile only these (all traced: the rollout's come after the training step's);
    ``keep_hlo``: each compiled module's text beside its result (``NAME.tpu.hlo.txt`` in
    ``workdir/layersN``)."""
    require_aot()
    topo, topo_kwargs = topology(pod_name)
    tp = layout_tp(overrides, pod_mesh)
    if tp:  # the pod's tp, not one the traced mesh would default to
        overrides = [*overrides, f"sampling.generation_tp={tp}"]
    src = trace_mesh(pod_mesh, trace_devices, tp // pod_mesh[2] if tp else 1)
    n_src = src[0] * src[1] * src[2]
    layers = shapes["model"].layers
    depths = sorted({min(d, layers) for d in depths})  # a shallow model compiles whole
    verdicts: dict[str, GraphVerdict] = {}
    with tempfile.TemporaryDirectory(prefix="plan-compile-") as tmp:
        root = workdir or tmp
        for depth in depths:
            out = os.path.join(root, f"layers{depth}")
            os.makedirs(out, exist_ok=True)
            spec = {"config": config_path, "overrides": overrides, "mesh": ",".join(map(str, src)),
                    "layers": depth, "out": out, "split": split,
                    "shapes": {k: dataclasses.asdict(v) for k, v in shapes.items()}}
            with open(os.path.join(out, "spec.json"), "w") as f:
                json.dump(spec, f)
            say(f"  tracing at {depth} layer(s) on {n_src} CPU devices (mesh {','.join(map(str, src))})")
            _run(["-m", "torchxla_rlhf.aot.trace", os.path.join(out, "spec.json")], _env(n_src),
                 f"tracing at {depth} layer(s)")
            target = {"topology": topo, "topology_kwargs": topo_kwargs, "mesh": list(pod_mesh),
                      "cpu": cpu, "suffix": "cpu" if cpu else "tpu", "keep_hlo": keep_hlo,
                      "graphs": list(graphs) if graphs is not None else None}
            with open(os.path.join(out, "target.json"), "w") as f:
                json.dump(target, f)
            say(f"  compiling for {pod_name} ({topo}, mesh {','.join(map(str, pod_mesh))})")
            _run(["-m", "torchxla_rlhf.aot.compile", out, os.path.join(out, "target.json")],
                 _env(1), f"compiling at {depth} layer(s)")
            for fname in sorted(os.listdir(out)):
                if fname.endswith(f".{target['suffix']}.result.json"):
                    with open(os.path.join(out, fname)) as f:
                        r = json.load(f)
                    v = verdicts.setdefault(r["graph"], GraphVerdict(r["graph"], layers=layers))
                    v.results[depth] = r
    return verdicts


def sampling_overrides(cfg: Any, n_devices: int, hbm_bytes: float | None, shapes: dict,
                       mesh: Any = None) -> list[str]:
    """The rollout's ``sampling`` as the run resolves it on the pod (``gather_weights: auto``:
    ``memory_plan.resolve_sampling`` on the plan's ``mesh``, what
    ``trainers.base.rollout_sampling`` does), as overrides for the trace: the graphs traced
    are the ones the run would compile."""
    from torchxla_rlhf.preflight.memory_plan import resolve_sampling

    if getattr(cfg, "sampling", None) is None:
        return []
    s = resolve_sampling(cfg, n_devices, hbm_bytes, shapes, mesh)
    return [f"sampling.gather_weights={s.gather_weights}", f"sampling.generation_tp={s.generation_tp}"]


GIB = 1 << 30


def _gib(b: float | None) -> str:
    if b is None:
        return "?"
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 4 else f"{b / (1 << 20):.1f} MiB"


def _collectives(r: dict) -> str:
    c = r.get("collectives") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def outside_terms(p: Any, graph: str) -> list:
    """The planner's persistent terms a graph does not take as arguments though they stay on
    the device while it runs: beside a micro-step, the AdamW moments; beside the update, the
    frozen models; beside the rollout's graphs, everything but the policy's weights; and the
    rollout buffers beside every training graph."""
    if graph.startswith("generation"):
        return [t for t in p.persistent if t.name != "policy parameters"]
    if graph == "train_micro_step":
        keep = lambda t: t.name.endswith("AdamW moments")  # noqa: E731
    elif graph == "train_update":
        keep = lambda t: t.name.endswith("(frozen)")  # noqa: E731
    else:
        keep = lambda t: False  # noqa: E731
    return [t for t in p.persistent if keep(t) or t.name == "rollout buffers"]


def resident_outside(p: Any, graphs: Sequence[str]) -> dict[str, float]:
    """Per graph: bytes resident outside it (:func:`outside_terms`)."""
    return {name: sum(t.bytes for t in outside_terms(p, name)) for name in graphs}


PHASES = {"train_micro_step": "train micro-step", "proxy_train": "train micro-step",
          "train_update": "train update", "generation_prefill": "rollout prefill",
          "generation_decode_loop": "rollout decode", "generation_reshard": "rollout prefill"}
"""The planner's phase (XLA:TPU's plan: one a graph) of each traced graph (the generation
layout's reshard: the rollout's, of which it holds the copy, :func:`planned_graph_bytes`)."""

COPY_TERM = "weights copy (generation layout)"
"""The generation layout's copy of the policy (``memory_plan.generation_layout_terms``)."""


def reshard_transient(p: Any, cfg: Any, shapes: dict) -> float:
    """The planner's transient of the generation layout's reshard graph, at the ``tp`` the run
    resolves (``memory_plan.generation_reshard_bytes``)."""
    from torchxla_rlhf.preflight.memory_plan import generation_reshard_bytes, resolve_sampling

    s = resolve_sampling(cfg, p.mesh.devices, p.hbm_bytes, shapes, p.mesh)
    tp = s.generation_tp or p.mesh.mp * p.mesh.fsdp
    return generation_reshard_bytes(shapes["model"], p.mesh, cfg.model.param_dtype, tp)


def planned_graph_bytes(p: Any, graph: str, cfg: Any = None, shapes: dict | None = None) -> float:
    """The planner's figure for what the compiled graph itself holds: the persistent state
    and the graph's phase, less what stays resident outside the graph. The generation
    layout's reshard graph (its phase is the rollout's) holds of it the copy it writes and its
    own transient (:func:`reshard_transient`: needs the run's ``cfg`` and ``shapes``); the KV
    cache and the prefill come after it."""
    terms = p.phases[PHASES[graph]]
    extra = 0.0
    if graph == "generation_reshard":
        if cfg is None or shapes is None:
            raise ValueError("the reshard graph's planned bytes need the run's cfg and shapes")
        terms = [t for t in terms if t.name == COPY_TERM]
        extra = reshard_transient(p, cfg, shapes)
    total = sum(t.bytes for t in p.persistent) + sum(t.bytes for t in terms) + extra
    return total - sum(t.bytes for t in outside_terms(p, graph))


def format_verdict(verdicts: dict[str, GraphVerdict], planned: dict[str, float],
                   hbm_bytes: float | None, resident: dict[str, float]) -> tuple[list[str], bool | None]:
    """One line per graph (compiler's peak at the model's depth, the planner's figure for
    the same graph, their ratio, flops, ``optimal_seconds``, collectives) and whether the run
    fits (None: device memory unknown): each graph's peak plus what stays resident beside it."""
    lines, fits = [], True
    for name, v in verdicts.items():
        deepest = max(v.results)
        r = v.at(deepest)
        failed = next((x for x in v.results.values() if not x.get("ok") and not x.get("oom")), None)
        if failed is not None:  # e.g. a sharding the remap cannot re-express on the pod's mesh
            lines.append(f"  {name}: not compiled: {' '.join(failed.get('error', '').split())[:300]}")
            fits = None if fits else fits
            continue
        if v.oom:
            o = v.oom
            first = min(d for d, x in v.results.items() if x.get("oom"))
            lines.append(f"  {name}: OUT OF MEMORY at {first} layer(s): the TPU compiler used "
                         f"{_gib(o.get('used_bytes'))} of {_gib(o.get('hbm_bytes'))}")
            lines += [f"      {ln.strip()}" for ln in o.get("report", "").splitlines()[:14] if ln.strip()]
            fits = False
            continue
        peak = v.peak
        plan = planned.get(name)
        ratio = "" if plan is None or not peak else f"; planner {_gib(plan)} ({plan / peak:.2f}x)"
        cost = r.get("cost") or {}
        per_layer = "" if v.slope is None else f", {_gib(v.slope)}/layer"
        outside = resident.get(name, 0.0)
        how = ("compiled" if v.layers in v.results else
               f"TPU compiler at {', '.join(f'{d}: {_gib(v.peak_at(d))}' for d in sorted(v.results))}"
               f"{per_layer}, extrapolated")
        lines.append(f"  {name}: {_gib(peak)} per device at {v.layers} layers ({how}){ratio}; "
                     f"+ {_gib(outside)} resident beside it")
        optimal = cost.get("optimal_seconds")
        optimal = f"{optimal:.3g} s" if optimal is not None and optimal >= 0 else "n/a"
        lines.append(
            f"      at {deepest} layer(s): {cost.get('flops', 0):.3g} flops, optimal_seconds "
            f"{optimal}; collectives: {_collectives(r)}")
        if hbm_bytes is not None and peak is not None and peak + outside > hbm_bytes:
            fits = False
    if hbm_bytes is None and fits:
        fits = None
    return lines, fits


def verdict_line(verdicts: dict[str, GraphVerdict], resident: dict[str, float],
                 hbm_bytes: float | None, fits: bool | None) -> str:
    compiled = [(n, v) for n, v in verdicts.items() if v.peak is not None]
    worst = max(((v.peak + resident.get(n, 0.0), n) for n, v in compiled), default=(None, None))
    word = {True: "FITS", False: "DOES NOT FIT",
            None: "unknown (a graph was not compiled, or the device memory is unknown)"}[fits]
    where = "" if worst[1] is None else f"; largest: {worst[1]} {_gib(worst[0])} with what stays resident"
    return f"  TPU compiler verdict: {word} in {_gib(hbm_bytes)} per device{where}"


