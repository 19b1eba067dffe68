"""``--check``: every start-up check that needs no device, on a resolved config, then exit.

What a run would find wrong in its first minutes, answered without a TPU: the config (already
parsed by the time this runs), remote paths, the output directory, the W&B settings, each
model's ``config.json``, the data (tokenized and counted: the data report), the mesh against the
models' shapes, and the per-device memory plan. Every check runs even when an earlier one
failed (a later one that needs the failed one's result says so), so one call lists every
problem. Exit status 0 when all pass, 2 otherwise.

The device count the mesh and memory checks assume: ``--devices N``, else the mesh's product
when it has no ``-1``, else this machine's XLA:CPU devices (``CPU_NUM_DEVICES``, default 1).
Device memory is unknown without a device, so the plan states the peak without a verdict.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from torchxla_rlhf.errors import EXIT_USER_ERROR, one_line, user_error_types

logger = logging.getLogger("torchxla_rlhf")


@dataclass
class Outcome:
    name: str
    status: str
    """``ok``, ``FAIL`` or ``skip``."""
    detail: str


@dataclass(frozen=True)
class Topology:
    """What the pre-flight checks a config against: the device count and, where known, the
    hosts, the devices per host and each device's memory (None: not checked)."""

    devices: int | None
    source: str = ""
    """Where the device count came from (``--devices``, ``mesh_dim``, the runtime...)."""
    hosts: int | None = None
    per_host: int | None = None
    hbm_bytes: float | None = None

    def __str__(self) -> str:
        return f"{self.devices} device(s)" + (f" over {self.hosts} host(s)" if self.hosts else "")


def check_devices(cfg: Any, devices: int | None) -> Topology:
    """``--check``'s topology: ``--devices N``, else the mesh's product when it has no ``-1``,
    else this machine's XLA:CPU devices; no hosts, no device memory."""
    from torchxla_rlhf.preflight.mesh import fixed_devices

    if devices is not None:
        return Topology(devices, "--devices")
    if (fixed := fixed_devices(cfg.mesh_dim)) is not None:
        return Topology(fixed, "mesh_dim")
    if os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU":
        return Topology(int(os.environ.get("CPU_NUM_DEVICES", "1") or 1),
                        "this machine's XLA:CPU devices")
    return Topology(None)


BEFORE_DEVICE = ("remote paths", "output_dir", "resume_from", "logging")
"""The entries of :func:`startup_checks` a run executes in its set-up before the runtime
starts (:func:`before_device`)."""

ON_DEVICES = ("model config", "mesh")
"""The entries a run executes once the runtime is up, with the runtime's topology
(:func:`on_devices`): the models' shapes, then the pre-flight (mesh, weight splits, batch
rows, hosts, the memory plan and its verdict). ``data`` is the trainer's
:meth:`check_data`, which its ``build`` calls to get its datasets and reward functions."""


def startup_checks(cfg: Any, topology: Topology, say: Callable[[str], None]
                   ) -> list[tuple[str, Callable[[dict], str]]]:
    """The device-free start-up checks of a trainer config, in order: ``(name, fn)`` pairs
    where ``fn(results)`` returns a one-line detail or raises a user error; ``results`` holds
    what earlier checks produced (``shapes``, ``dir_plan``, ``resume_path``, ``report``...);
    ``say`` prints the longer reports. The one list of what a run checks before its first
    step short of loading weights: ``--check`` runs all of it on ``topology`` (this machine,
    or ``--devices``), a run's set-up the :data:`BEFORE_DEVICE` part, then the
    :data:`ON_DEVICES` part on the runtime's topology."""
    from torchxla_rlhf.configs.loader import to_dict

    n = topology.devices

    def remote(_: dict) -> str:
        from torchxla_rlhf.remote import check_remote_paths, iter_urls

        urls = list(iter_urls(cfg))
        check_remote_paths(cfg, cfg.remote_timeout_s)
        return f"{len(urls)} remote URL(s) answer" if urls else "no remote URLs"

    def output_dir(results: dict) -> str:
        from torchxla_rlhf.run_dir import check_lock, check_output_dir

        out = cfg.output_dir.rstrip("/")
        # The lock first (a run has taken it already, through the same check): in use?
        stale = None if results.get("lock_taken") else check_lock(
            out, takeover_stale=bool(cfg.resume_from))
        results["dir_plan"] = plan = check_output_dir(
            out, type(cfg).__name__, to_dict(cfg), resume=bool(cfg.resume_from),
            overwrite=cfg.overwrite_output_dir)
        what = {"new": "new", "same": "holds this run", "resume": "resumes its run",
                "replace": "its files move aside once the run starts"}[plan]
        return (f"{cfg.output_dir}: {what}"
                + ("; a resume takes over the lock its stopped run left" if stale else ""))

    def resume(results: dict) -> str:
        from torchxla_rlhf.checkpoint.manager import resume_source
        from torchxla_rlhf.run_dir import check_resume_source

        results["resume_path"] = path = resume_source(cfg)
        results["resume_changes"] = {}
        if path is None:
            return "no resume_from" if not cfg.resume_from else "nothing to resume: starts fresh"
        results["resume_changes"] = changes = check_resume_source(cfg, path, cfg.output_dir)
        return (f"{path}: written by this trainer with these models"
                + (f"; {len(changes)} other key(s) differ, recorded in config_changes.jsonl"
                   if changes else ""))

    def logging_(_: dict) -> str:
        from torchxla_rlhf.tracking import METRICS_FILE, destination_line, wandb_settings

        return destination_line(wandb_settings(cfg.logger), None,
                                f"{cfg.output_dir.rstrip('/')}/{METRICS_FILE}")

    def model_configs(results: dict) -> str:
        from torchxla_rlhf.preflight.memory_plan import read_shapes

        results["shapes"] = shapes = read_shapes(cfg)
        return "; ".join(f"{key}: {s.layers} layers, hidden {s.hidden}, {s.heads} heads, "
                         f"vocab {s.vocab}" for key, s in shapes.items())

    def data(_: dict) -> str:
        from torchxla_rlhf.data.tokenizers import load_tokenizer
        from torchxla_rlhf.trainers import registry

        tok = load_tokenizer(cfg.tokenizer or cfg.model.name_or_path, cfg.tokenizer_pad_token_id,
                             sentencepiece_legacy=cfg.tokenizer_legacy)
        registry.spec_for(cfg).trainer_class().check_data(cfg, tok)
        return "read, tokenized and counted (the data report is above)"

    def mesh(results: dict) -> str:
        from torchxla_rlhf.preflight import checks, memory_plan

        if n is None:
            raise _Skip(f"mesh_dim={cfg.mesh_dim!r} has a -1 axis: pass --devices N")
        if "shapes" not in results:
            raise _Skip("needs the model configs")
        report = checks.check_run(cfg, results["shapes"], n, topology.hosts, topology.per_host,
                                  hbm_bytes=topology.hbm_bytes)
        results["report"], results["plan"] = report, report.plan
        for c in report.warnings:
            logger.warning("start-up check %s (%s): %s", c.name, c.key, c.detail)
        if report.plan is not None and report.plan.fits is False:
            memory_plan.raise_does_not_fit(report.plan)
        if not report.ok:
            raise checks.StartupError(
                f"this config cannot run on {topology}: {report.failures_line()}")
        if report.plan is not None:
            say(memory_plan.format_plan(report.plan))
        return (f"mesh_dim={cfg.mesh_dim!r} on {topology}"
                + (f" ({topology.source})" if topology.source else "")
                + f": {len(report.checks)} checks pass")

    def memory(results: dict) -> str:
        p = results.get("plan")
        if p is None:
            raise _Skip("needs the mesh check")
        return (f"peak {p.peak / 2**30:.2f} GiB per device ({p.peak_phase}); compare with the "
                "device's memory (python -m torchxla_rlhf plan --tpu TYPE gives a verdict)")

    return [("remote paths", remote), ("output_dir", output_dir), ("resume_from", resume),
            ("logging", logging_), ("model config", model_configs), ("data", data),
            ("mesh", mesh), ("memory plan", memory)]


def before_device(cfg: Any) -> dict:
    """A run's set-up, before the runtime starts: the :data:`BEFORE_DEVICE` entries of
    :func:`startup_checks`, in order, the first failure raised (nothing is written); returns
    their results (``dir_plan``, ``resume_path``, ``resume_changes``). The lock is not looked
    at: process 0 took it before (:func:`~torchxla_rlhf.run_dir.acquire_lock`, which runs the
    same check)."""
    results: dict = {"lock_taken": True}
    _run_part(cfg, Topology(None), BEFORE_DEVICE, results)
    return results


def on_devices(cfg: Any, topology: Topology, results: dict | None = None) -> Any:
    """A run's set-up once the runtime is up, before any weight loads: the
    :data:`ON_DEVICES` entries on the runtime's ``topology``, the first failure raised (a
    failed check: one line naming the key; a plan over the device memory:
    :class:`~torchxla_rlhf.preflight.memory_plan.DoesNotFit` with the plan's table). Returns
    the pre-flight's :class:`~torchxla_rlhf.preflight.checks.StartupReport`."""
    results = {} if results is None else results
    _run_part(cfg, topology, ON_DEVICES, results)
    logger.info("start-up checks passed on %s", topology)
    return results["report"]


def _run_part(cfg: Any, topology: Topology, names: tuple[str, ...], results: dict) -> None:
    for name, fn in startup_checks(cfg, topology, logger.info):
        if name in names:
            fn(results)


class _Skip(Exception):
    """A check that cannot run (its input is missing); it neither passes nor fails."""


def run_checks(cfg: Any, devices: int | None = None, out: TextIO | None = None) -> int:
    """Run :func:`startup_checks`, print one line per check and a verdict; the exit status
    (0 all passed, 2 any failed). Touches no device (imports torch for the models' shapes)."""
    out = out or sys.stdout
    # The data report and start-up warnings are logged: show them here, in order, indented.
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("        %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(cfg.log_level)
    logger.propagate = False  # not twice (importing torch_xla gives the root logger a handler)
    try:
        return _run_checks(cfg, devices, out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _run_checks(cfg: Any, devices: int | None, out: TextIO) -> int:
    print(f"config: ok: {type(cfg).__name__}, every key valid", file=out, flush=True)
    results: dict = {}
    outcomes = []

    def say(text: str) -> None:
        print("\n".join("        " + line for line in text.splitlines()), file=out, flush=True)

    for name, fn in startup_checks(cfg, check_devices(cfg, devices), say):
        try:
            outcome = Outcome(name, "ok", fn(results))
        except _Skip as e:
            outcome = Outcome(name, "skip", str(e))
        except user_error_types() as e:
            outcome = Outcome(name, "FAIL", one_line(e).replace("\n", "; "))
        outcomes.append(outcome)
        print(f"{outcome.name}: {outcome.status}: {outcome.detail}", file=out, flush=True)
    failed = [o.name for o in outcomes if o.status == "FAIL"]
    skipped = [o.name for o in outcomes if o.status == "skip"]
    verdict = f"check: {len(failed)} failed ({', '.join(failed)})" if failed else "check: passed"
    if skipped:
        verdict += f"; skipped: {', '.join(skipped)}"
    print(verdict + " (no device was touched)", file=out, flush=True)
    return EXIT_USER_ERROR if failed else 0
