"""Start-up checks: will this config run on this pod? Answered before any weights load.

Everything a 13B run on a pod could fail on after minutes of loading is arithmetic on the
models' shapes and the config: the mesh must use the pod's devices, every weight dim must
split over its mesh axes, every uploaded batch must split over ``dp*fsdp``, and the per-device
peak of the memory plan (:mod:`torchxla_rlhf.preflight.memory_plan`, the trainer's own terms) must fit a
device. :func:`check_run` does all of it as a pure function of (run config, model shapes,
device count, hosts, memory per device): no devices, no torch, so a test can check every
shipped config against the pods its header names, and ``python -m torchxla_rlhf plan`` runs
the same checks a trainer runs. Each failed check names the config key and what would fit
(including the meshes that pass everything). The start-up list
(:mod:`torchxla_rlhf.preflight.startup`) runs it for a run and for ``--check``.

What a trainer puts on the mesh (its models and their roles, its batch rows) comes from its
config class (``model_roles()``, ``batches()``; see ``trainers/registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torchxla_rlhf.preflight import memory_plan
from torchxla_rlhf.models import sharding
from torchxla_rlhf.errors import UserError
from torchxla_rlhf.preflight.mesh import Mesh, MeshError, parse_mesh_dim
from torchxla_rlhf.preflight.shapes import Shape


RULES = {"causal": sharding.CAUSAL_LM_RULES, "classifier": sharding.SEQUENCE_CLASSIFIER_RULES}
"""Partition rules of each model head kind."""


class StartupError(UserError, ValueError):
    """A config that cannot run on this pod (every failed check, in one line)."""


@dataclass(frozen=True)
class Check:
    """One start-up check: what it looked at (``key``), whether it passed, and why."""

    name: str
    key: str
    ok: bool
    detail: str
    warning: bool = False
    """Passed, but at a cost the log should state (e.g. heads resharded)."""


@dataclass
class StartupReport:
    checks: list[Check] = field(default_factory=list)
    mesh: Mesh | None = None
    """The parsed mesh (None when ``mesh_dim`` does not fit the devices)."""
    plan: memory_plan.Plan | None = None
    """The memory plan (None when a check it needs failed)."""

    def add(self, name: str, key: str, ok: bool, detail: str, warning: bool = False) -> None:
        self.checks.append(Check(name, key, ok, detail, warning))

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.ok and c.warning]

    @property
    def ok(self) -> bool:
        return not self.errors

    def failures_line(self) -> str:
        return "; ".join(f"{c.key}: {c.name}: {c.detail}" for c in self.errors)


@dataclass(frozen=True)
class ModelShapes:
    """A model the run puts on the mesh: its role, shape and parameter shapes."""

    role: str
    key: str
    """Config key it comes from (``model``, ``reward_model``, ``value_model``)."""
    shape: Shape
    params: tuple[tuple[str, tuple[int, ...]], ...]
    rules: tuple


def run_models(cfg: Any, shapes: Mapping[str, Shape]) -> list[ModelShapes]:
    """The models ``cfg``'s trainer puts on the mesh (its config's ``model_roles()``)."""
    return [ModelShapes(r.role, r.key, shapes[r.key], shapes[r.key].params(r.head), RULES[r.head])
            for r in cfg.model_roles()]


def check_mesh_fit(cfg: Any, models: list[ModelShapes], mesh: Mesh, report: StartupReport) -> None:
    """The checks that depend on the mesh: weight dims, heads, batch rows."""
    dp, fsdp, mp = mesh
    heads: dict[tuple[int, int], list[str]] = {}
    for m in models:
        try:
            sharding.match_specs(m.params, m.rules, axis_sizes=mesh.sizes)
        except sharding.ShardingError as e:
            report.add("weights split over the mesh", f"mesh_dim / {m.key}", False,
                       f"{m.role}: {e}")
            continue
        heads.setdefault((m.shape.heads, m.shape.kv_heads), []).append(m.role)
    for (n_heads, n_kv), roles in heads.items():  # one line per head count, not per model
        cost = sharding.heads_split_cost(n_heads, n_kv, mp)
        report.add("attention heads over mp", "mesh_dim", True,
                   f"{', '.join(roles)}: {cost or f'{n_heads} heads split {mp} ways'}",
                   warning=cost is not None)
    for b in cfg.batches():
        even = b.rows % (dp * fsdp) == 0
        if b.must_divide:
            report.add("batch rows over dp*fsdp", b.key, even,
                       f"{b.what} = {b.rows} over dp*fsdp = {dp}*{fsdp} = {dp * fsdp}: "
                       + (f"{b.rows // (dp * fsdp)} row(s) per device" if even else
                          f"does not divide; a batch giving a multiple of {dp * fsdp} rows fits"))
        else:
            report.add("rows over dp*fsdp", b.key, True,
                       f"{b.what} = {b.rows} over dp*fsdp = {dp * fsdp}"
                       + ("" if even else ": uneven, GSPMD pads the shards"), warning=not even)


def check_memory(cfg: Any, shapes: Mapping[str, Shape], mesh: Mesh, hbm_bytes: float | None,
                 report: StartupReport) -> None:
    """The memory plan's verdict as a check (an unknown device memory passes)."""
    try:
        p = memory_plan.plan(cfg, mesh.devices, hbm_bytes, shapes, mesh)
    except memory_plan.PlanError as e:  # e.g. an uneven chunk the run pads: not sized
        report.add("memory per device", "mesh_dim", True, f"not planned: {e}", warning=True)
        return
    report.plan = p
    peak = memory_plan._gib(p.peak)
    if p.fits is None:
        report.add("memory per device", "mesh_dim", True, f"peak {peak} per device (device memory "
                   "unknown: not checked)")
    else:
        report.add("memory per device", "mesh_dim", bool(p.fits),
                   f"peak {peak} of {memory_plan._gib(p.hbm_bytes)} ({p.peak_phase}; dominant: "
                   f"{p.dominant.name})" + ("" if p.fits else ": lower the batch, turn on "
                   "model.gradient_checkpointing, or shard more ways"))


def fitting_meshes(cfg: Any, shapes: Mapping[str, Shape], devices: int,
                   hbm_bytes: float | None = None, limit: int = 4) -> list[str]:
    """Meshes ``'dp,fsdp,mp'`` on ``devices`` that pass every check (with ``hbm_bytes``: and
    whose memory plan fits), best first: heads split evenly, then fewer data-parallel replicas
    (less memory), then smaller mp."""
    models = run_models(cfg, shapes)
    found = []
    for mp in range(1, devices + 1):
        if devices % mp:
            continue
        for fsdp in range(1, devices // mp + 1):
            if (devices // mp) % fsdp:
                continue
            mesh = Mesh(devices // (mp * fsdp), fsdp, mp)
            report = StartupReport()
            check_mesh_fit(cfg, models, mesh, report)
            if report.ok and hbm_bytes is not None:
                check_memory(cfg, shapes, mesh, hbm_bytes, report)
                if report.plan is None:  # not sized: not offered as fitting
                    continue
            if report.ok:
                found.append((bool(report.warnings), mesh.dp, mp, str(mesh)))
    return [text for *_, text in sorted(found)][:limit]


def check_run(
    cfg: Any, shapes: Mapping[str, Shape], devices: int, processes: int | None = None,
    devices_per_host: int | None = None, *, hbm_bytes: float | None = None,
) -> StartupReport:
    """Every start-up check of ``cfg`` on a pod of ``devices`` devices over ``processes``
    hosts of ``devices_per_host`` devices each (None: host topology unknown, not checked),
    with ``hbm_bytes`` per device (None: memory not checked). ``shapes`` maps config keys
    (``model``, ``reward_model``, ``value_model``) to the models' shapes. Pure."""
    report = StartupReport()
    if processes is not None and devices_per_host is not None:
        report.add("pod topology", "(runtime)", processes * devices_per_host == devices,
                   f"{processes} host(s) x {devices_per_host} device(s) for {devices} devices")
    models = run_models(cfg, shapes)
    try:
        mesh = parse_mesh_dim(cfg.mesh_dim, devices)
    except MeshError as e:
        fits = fitting_meshes(cfg, shapes, devices, hbm_bytes)
        report.add("mesh uses the pod's devices", "mesh_dim", False,
                   f"{e} Meshes that pass every check here: {fits or 'none'}")
        return report
    report.mesh = mesh
    report.add("mesh uses the pod's devices", "mesh_dim", True,
               f"{cfg.mesh_dim!r} -> dp={mesh.dp} fsdp={mesh.fsdp} mp={mesh.mp} on {devices} devices")
    check_mesh_fit(cfg, models, mesh, report)
    if report.ok:
        check_memory(cfg, shapes, mesh, hbm_bytes, report)
    if not report.ok:
        fits = fitting_meshes(cfg, shapes, devices, hbm_bytes)
        report.add("a mesh that fits", "mesh_dim", False,
                   f"meshes on {devices} devices that pass every check: {fits or 'none'}")
    what, length = cfg.sequence_length()
    for m in models:
        limit = m.shape.max_positions
        if limit is not None and length > limit:
            report.add("sequence length", what, True,
                       f"{length} tokens exceed {m.role}'s max_position_embeddings={limit} "
                       "(rotary positions beyond it were never trained)", warning=True)
    if devices_per_host is not None:
        for b in cfg.batches():
            if b.must_divide:
                report.add("per-host feeding", b.key, True,
                           f"every host builds the {b.rows}-row global batch ({b.what}) from the "
                           f"same seeded order and uploads only the shards of its "
                           f"{devices_per_host} devices")
    return report
