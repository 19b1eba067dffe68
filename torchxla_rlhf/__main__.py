"""``python -m torchxla_rlhf``: the trainers, and the tiny pipeline in one command.

    python -m torchxla_rlhf                       # lists the entry points
    python -m torchxla_rlhf train --config FILE [KEY=VALUE ...]   # the trainer FILE names
    python -m torchxla_rlhf pipeline [--configs configs/tiny] [--output-root outputs/tiny]
                                     [--stages sft,dpo,reward,ppo] [--resume] [STAGE.KEY=VALUE ...]
    python -m torchxla_rlhf plan --config FILE [--tpu v3-256 | --devices N --hbm-gib G] [KEY=VALUE ...]

The pipeline runs its stages (registered trainer kinds, each from ``DIR/KIND.yaml``) in order,
wiring the output directories together: a stage that trains a policy starts from the last
earlier stage's exported policy (DPO's ``model`` is SFT's ``final``, PPO's and GRPO's DPO's), and a stage
with a reward model scores with the last earlier stage's exported classifier (the reward run's
``final``). Overrides are prefixed by the stage they apply to.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from torchxla_rlhf.configs.loader import ConfigError, load_config

DEFAULT_STAGES = ("dpo", "reward", "ppo")
"""The pipeline's stages unless ``--stages`` says otherwise (each a registered trainer kind)."""
logger = logging.getLogger("torchxla_rlhf")


@dataclass
class Stage:
    kind: str
    out: str
    """Its ``output_dir``."""
    cfg: Any
    wired: dict[str, str]
    """Config key -> the earlier stage's output it reads (``model``, ``reward_model``)."""
    tokenizer_from: Any = None
    """The config of the stage whose policy this one starts from (its tokenizer goes with it)."""


def _trained_model_head(cfg: Any) -> str | None:
    """The head of the model a run trains from its ``model`` key (what it exports as
    ``final``): ``causal`` (a policy), ``classifier`` (a reward model) or None."""
    return next((r.head for r in cfg.model_roles() if r.key == "model" and r.trained), None)


def wire_stages(configs: str, output_root: str, overrides: list[str],
                stages: tuple[str, ...] = DEFAULT_STAGES, resume_keys: dict[str, list[str]] | None = None
                ) -> list[Stage]:
    """The pipeline's stages with their configs loaded and wired (no data read, nothing run).

    Which output feeds which key follows from what each trainer declares in the registry
    (:meth:`model_roles`), not from its name: a stage that trains a causal ``model`` after a
    stage that exported one starts from it; a stage whose roles include a ``reward_model``
    reads the last earlier stage that trained a classifier."""
    from torchxla_rlhf.trainers import registry

    if len(set(stages)) != len(stages) or not stages:
        raise ConfigError(f"--stages {','.join(stages)!r}: name each stage once "
                          f"(known: {', '.join(registry.TRAINERS)})")
    for kind in stages:
        registry.get(kind, where=f"--stages {','.join(stages)}")
    per_stage: dict[str, list[str]] = {s: [] for s in stages}
    for item in overrides:
        stage, _, rest = item.partition(".")
        if stage not in per_stage or not rest:
            raise ConfigError(f"override {item!r}: prefix it with the stage it applies to "
                              f"({', '.join(s + '.' for s in stages)})")
        per_stage[stage].append(rest)
    resume_keys = resume_keys or {}
    done: list[Stage] = []
    for kind in stages:
        out = f"{output_root.rstrip('/')}/{kind}"
        path = os.path.join(configs, f"{kind}.yaml")
        spec = registry.get(kind)
        tail = [*resume_keys.get(kind, []), *per_stage[kind]]
        plain = load_config(spec.config, path, [f"output_dir={out}", *tail])
        wired: dict[str, str] = {}
        policy = next((st for st in reversed(done) if _trained_model_head(st.cfg) == "causal"), None)
        if policy is not None and _trained_model_head(plain) == "causal":
            wired["model"] = f"{policy.out}/final"
        scorer = next((st for st in reversed(done) if _trained_model_head(st.cfg) == "classifier"), None)
        if scorer is not None and any(r.key == "reward_model" for r in plain.model_roles()):
            wired["reward_model"] = f"{scorer.out}/final"
        # Overrides on the command line win over the wiring, as over the file.
        cfg = load_config(spec.config, path, [f"output_dir={out}",
                                              *(f"{k}.name_or_path={v}" for k, v in wired.items()), *tail])
        wired = {k: v for k, v in wired.items() if getattr(cfg, k).name_or_path == v}
        done.append(Stage(kind, out, cfg, wired, policy.cfg if "model" in wired else None))
    return done


def run_pipeline(configs: str, output_root: str, overrides: list[str], *, resume: bool = False,
                 setup_logging: bool = False, stages: tuple[str, ...] = DEFAULT_STAGES
                 ) -> dict[str, dict[str, float]]:
    """``stages`` (default DPO -> reward -> PPO) with the directories wired
    (:func:`wire_stages`); returns each stage's last metrics. ``setup_logging``: console
    logging at each stage's ``log_level`` (the command line).

    Every stage's config and data are checked before the first stage trains. A preempted
    stage raises :class:`~torchxla_rlhf.errors.Preempted` (the pipeline stops there);
    ``resume`` skips the stages whose ``final`` checkpoint is complete and continues the
    others with ``resume_from=auto``.
    """
    from torchxla_rlhf.checkpoint import is_complete_checkpoint
    from torchxla_rlhf.data.tokenizers import load_tokenizer
    from torchxla_rlhf.trainers import registry
    from torchxla_rlhf.trainers.base import run

    root = output_root.rstrip("/")
    done = {s: resume and is_complete_checkpoint(f"{root}/{s}/final") for s in stages}
    resume_keys = {s: ["resume_from=auto"] if resume and not done[s] else [] for s in stages}
    # Parse every stage's config before running any, so a typo fails in seconds...
    wired = wire_stages(configs, output_root, overrides, tuple(stages), resume_keys)
    # ...and read every stage's data, so bad PPO prompts do not wait for DPO and the RM.
    # A stage that starts from an earlier stage's policy uses that stage's tokenizer.
    for st in wired:
        if not done[st.kind]:
            source = st.cfg.tokenizer or (
                st.tokenizer_from.tokenizer or st.tokenizer_from.model.name_or_path
                if st.tokenizer_from is not None else st.cfg.model.name_or_path)
            tok = load_tokenizer(source, st.cfg.tokenizer_pad_token_id,
                                 sentencepiece_legacy=st.cfg.tokenizer_legacy)
            registry.get(st.kind).trainer_class().check_data(st.cfg, tok)
    results: dict[str, dict[str, float]] = {}
    n = len(wired)
    for i, st in enumerate(wired, 1):
        if done[st.kind]:
            logger.info("pipeline --resume: %s/final is complete, skipping %s", st.out, st.kind)
            continue
        print(f"stage {i}/{n}: {st.kind} -> {st.out}", flush=True)
        results[st.kind] = run(registry.get(st.kind).trainer_class(), st.cfg,
                               setup_logging=setup_logging, label=f"{st.kind} (stage {i}/{n})")
    print(pipeline_summary(wired), flush=True)
    return results


def pipeline_summary(stages: list[Stage]) -> str:
    """Where the pipeline's outputs are: each stage's exported checkpoints and metrics."""
    from torchxla_rlhf.preflight.stages import exports

    rows = [(f"{st.out}/{name}", what) for st in stages for name, what in exports(st.cfg)]
    width = max(len(path) for path, _ in rows)
    lines = ["pipeline done; outputs:"] + [f"  {path:<{width}}  {what}" for path, what in rows]
    lines.append(f"  metrics: {', '.join(f'{st.out}/metrics.jsonl' for st in stages)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        from torchxla_rlhf.trainers.registry import TRAINERS

        print("torchxla_rlhf: SFT, DPO, reward models, PPO and GRPO for HF Llama models on "
              "PyTorch/XLA\n")
        for name, spec in TRAINERS.items():
            print(f"  python -m torchxla_rlhf.{name:<7} --config FILE [key=value ...]   {spec.summary}")
        print("  python -m torchxla_rlhf train --config FILE [key=value ...]   "
              "the trainer the config names (trainer: KIND)")
        print("  python -m torchxla_rlhf pipeline [--configs DIR] [--output-root DIR] "
              "[--stages sft,dpo,reward,ppo|grpo] [STAGE.key=value ...]   the stages, wired together")
        print("  python -m torchxla_rlhf plan --config FILE [--tpu v3-256] [key=value ...]   "
              "the start-up checks and the per-device memory plan, without a device")
        print("  python -m torchxla_rlhf.launch --tpu NAME --zone ZONE [options] -- COMMAND ...   "
              "run COMMAND on every worker of a TPU pod")
        print("\nEach trainer's --help lists its config keys; --config FILE --help shows FILE's "
              "values,\n--print-config the resolved YAML, --check the device-free start-up checks.")
        return 0
    if argv[0] == "plan":
        return plan_main(argv[1:])
    if argv[0] == "train":
        return train_main(argv[1:])
    if argv[0] != "pipeline":
        print(f"unknown command {argv[0]!r}; try: python -m torchxla_rlhf --help", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m torchxla_rlhf pipeline")
    parser.add_argument("--configs", default="configs/tiny", help="directory with KIND.yaml per stage")
    parser.add_argument("--output-root", default="outputs/tiny")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help="comma-separated trainer kinds, in order (e.g. sft,dpo,reward,ppo or dpo,grpo)")
    parser.add_argument("--resume", action="store_true",
                        help="skip finished stages, continue the others with resume_from=auto")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("overrides", nargs="*", help="STAGE.key=value, e.g. ppo.total_steps=10")
    args = parser.parse_intermixed_args(argv[1:])
    from torchxla_rlhf.errors import debug_requested, run_guarded

    stages = tuple(k.strip() for k in args.stages.split(",") if k.strip())
    run_guarded(lambda: run_pipeline(args.configs, args.output_root, args.overrides,
                                     resume=args.resume, setup_logging=True, stages=stages),
                "python -m torchxla_rlhf pipeline", args.debug or debug_requested([]))
    return 0


# --- train ---------------------------------------------------------------------


TRAIN_PROG = "python -m torchxla_rlhf train"


def train_main(argv: list[str]) -> int:
    """``train --config FILE [key=value ...]``: run the trainer the config declares
    (``trainer: KIND``), with that trainer's command line (``--help`` lists its keys)."""
    from torchxla_rlhf.configs.loader import cli_main
    from torchxla_rlhf.trainers import registry
    from torchxla_rlhf.trainers.base import run

    config = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), None)
    if config is None and "--config" in argv[:-1]:
        config = argv[argv.index("--config") + 1]
    if config is None:
        print(f"usage: {TRAIN_PROG} --config FILE [key=value ...] (FILE names its trainer: "
              f"trainer: {'|'.join(registry.TRAINERS)})", file=sys.stderr)
        return 0 if {"-h", "--help"} & set(argv) else 2
    overrides = [a.removeprefix("--") for a in argv if "=" in a and not a.startswith("--config")]
    try:
        spec = registry.get(registry.kind_of_file(config, overrides))
    except ConfigError as e:
        print(f"{TRAIN_PROG}: error: {e}", file=sys.stderr)
        return 2
    from torchxla_rlhf.preflight.startup import run_checks

    cli_main(spec.config, lambda cfg: run(spec.trainer_class(), cfg, setup_logging=True),
             argv, prog=f"{TRAIN_PROG} ({spec.kind})", check=run_checks)
    return 0


# --- plan ----------------------------------------------------------------------


PLAN_PROG = "python -m torchxla_rlhf plan"


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line (exit 2) as every other error of ``plan``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _positive(kind: type, what: str):
    """An argparse ``type``: a finite number > 0 of ``kind`` (a usage error otherwise)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def plan_main(argv: list[str]) -> int:
    """``plan``: the pre-flight a trainer runs at start-up (mesh, weight splits, batch rows,
    the per-device memory plan), without a device. The trainer is the one the config declares
    (``trainer:``). Exit 0: it runs (or memory unknown); 1: it does not fit in memory; 2: a
    bad config, mesh or option (one line, as the trainers' errors)."""
    from torchxla_rlhf.errors import UserError

    parser = _OneLineParser(
        prog=PLAN_PROG, description="The start-up checks and per-device memory plan of a "
        "trainer config on a pod, without a device.")
    parser.add_argument("--config", required=True,
                        help="a trainer config: a file, a URL, or a shipped name (ppo_13b.yaml)")
    parser.add_argument("--tpu", help="TPU type (v3-128, v3-256, v4-64, v5p-32, ...): sets the "
                        "devices, hosts and memory per device as PJRT sees them")
    parser.add_argument("--devices", type=_positive(int, "a whole number of devices >= 1"), default=None,
                        help="device count (default: --tpu's, else mesh_dim's product when fixed)")
    parser.add_argument("--hbm-gib", type=_positive(float, "a finite number of GiB > 0"), default=None,
                        help="memory per device, GiB (default: --tpu's)")
    parser.add_argument("--compile", action="store_true",
                        help="with --tpu: also ask the TPU compiler (libtpu's compile-only client, "
                        "the aot extra) for each graph's per-device peak, on this machine")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.compile and not args.tpu:
        parser.error("--compile needs --tpu TYPE (the topology the TPU compiler compiles for)")
    # The hub client logs each retry of an unreachable host; the one-line error says it all.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    from torchxla_rlhf.preflight.shapes import NoSuchModel

    try:
        return _plan(args)
    except UserError as e:
        if args.debug:
            raise
        hint = (f" (to plan before it exists, e.g. the output of an earlier stage, set "
                f"{e.key}.name_or_path to a model of the same shape)"
                if isinstance(e, NoSuchModel) else "")
        print(f"{PLAN_PROG}: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from torchxla_rlhf.preflight import memory_plan
    from torchxla_rlhf.preflight import checks
    from torchxla_rlhf.preflight.mesh import GIB, MeshError, fixed_devices, tpu_pod
    from torchxla_rlhf.trainers import registry

    from torchxla_rlhf.configs.loader import find_config
    from torchxla_rlhf.preflight.stages import read_plan_shapes

    pod = tpu_pod(args.tpu) if args.tpu else None
    config_path = find_config(args.config)
    cfg = registry.load(config_path, args.overrides)
    devices = args.devices or (pod.devices if pod else None) or fixed_devices(cfg.mesh_dim)
    if devices is None:
        raise MeshError(f"mesh_dim={cfg.mesh_dim!r} has a -1 axis: pass --tpu TYPE or --devices N")
    hbm = args.hbm_gib * GIB if args.hbm_gib is not None else (pod.hbm_bytes if pod else None)
    hosts = pod.hosts if pod is not None and pod.devices == devices else None
    shapes, notes = read_plan_shapes(cfg, config_path)
    report = checks.check_run(cfg, shapes, devices, hosts,
                              None if hosts is None else devices // hosts, hbm_bytes=hbm)
    p = report.plan
    if p is None or (not report.ok and p.fits is not False):
        raise checks.StartupError(f"cannot run on {devices} device(s): {report.failures_line()}")
    where = f"{pod.name}: " if pod is not None else ""
    print(f"{where}{devices} device(s)" + (f" on {hosts} host(s)" if hosts else "")
          + ("" if hbm is None else f", {hbm / GIB:g} GiB per device"))
    for note in notes:
        print(f"note: {note}")
    print(memory_plan.format_plan(p))
    for line in memory_plan.rollout_policies(cfg, devices, hbm, shapes, p.mesh):
        print(line)
    for c in report.warnings:
        print(f"  warning ({c.key}): {c.detail}")
    if args.compile:
        return _plan_compile(args, cfg, config_path, shapes, p, pod, hbm)
    if p.fits is None:
        print("  for a fits verdict give the device memory: --tpu v3-128|v3-256|v4-64|v5p-32 "
              "(devices and memory per device) or --hbm-gib G")
    if p.fits is False:
        fits = next((c.detail for c in report.errors if c.name == "a mesh that fits"), None)
        if fits:
            print(f"  {fits}")
        return 1
    return 0


def _plan_compile(args, cfg, config_path, shapes, p, pod, hbm) -> int:
    """``plan --compile``: the TPU compiler's peak per graph beside the planner's; exit 1
    when a graph does not fit (``aot/verdict.py``)."""
    from torchxla_rlhf.aot import verdict as aot

    aot.require_aot()
    mesh = (p.mesh.dp, p.mesh.fsdp, p.mesh.mp)
    layers = shapes["model"].layers
    print(f"TPU compiler ({pod.name}, libtpu compile-only), graphs traced at "
          f"{', '.join(str(d) for d in sorted({min(d, layers) for d in aot.DEPTHS}))} of {layers} "
          "layers:", flush=True)
    overrides = [*args.overrides, *aot.sampling_overrides(cfg, pod.devices, hbm, shapes, p.mesh)]
    verdicts = aot.compile_run(config_path, overrides, shapes, pod.name, mesh,
                               say=lambda line: print(line, flush=True))
    resident = aot.resident_outside(p, list(verdicts))
    planned = {name: aot.planned_graph_bytes(p, name, cfg, shapes) for name in verdicts}
    lines, fits = aot.format_verdict(verdicts, planned, hbm, resident)
    print("\n".join(lines))
    print(aot.verdict_line(verdicts, resident, hbm, fits))
    return 0 if fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
