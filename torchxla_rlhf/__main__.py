"""``python -m torchxla_rlhf``: the trainers, and the tiny pipeline in one command.

    python -m torchxla_rlhf                       # lists the entry points
    python -m torchxla_rlhf pipeline [--configs configs/tiny] [--output-root outputs/tiny] [--resume]
                                     [dpo.KEY=VALUE ...] [reward.KEY=VALUE ...] [ppo.KEY=VALUE ...]
    python -m torchxla_rlhf plan --config FILE [--devices N] [--hbm-gib G] [KEY=VALUE ...]

The pipeline runs DPO (the policy), the reward model, then PPO from those two, wiring the
output directories together: PPO's ``model.name_or_path`` is DPO's ``final`` and its
``reward_model.name_or_path`` the reward run's ``final``. Overrides are prefixed by the stage
they apply to.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from torchxla_rlhf.config import ConfigError, load_config

TRAINERS = {
    "dpo": "DPO / IPO / cDPO on preference pairs",
    "reward": "a reward model (LlamaForSequenceClassification) on preference pairs",
    "ppo": "PPO with policy, reference, reward and value models",
}
STAGES = ("dpo", "reward", "ppo")
logger = logging.getLogger("torchxla_rlhf")


def check_stage_data(cfg: Any, tokenizer_source: str) -> None:
    """Build a stage's datasets once (tokenized, counted, checked) without touching a device:
    bad or mostly-dropped data fails before any stage has trained."""
    from torchxla_rlhf.configs import PPOConfig
    from torchxla_rlhf.data import PreferenceDataset, PromptDataset
    from torchxla_rlhf.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_source, cfg.tokenizer_pad_token_id,
                         sentencepiece_legacy=cfg.tokenizer_legacy)
    if isinstance(cfg, PPOConfig):
        ds = PromptDataset.build(cfg.train_dataset, tok, add_bos=cfg.prompt_add_bos, name="train_dataset")
        ds.report.check_fills_batch(cfg.train_dataset.batch_size, "train_dataset")
        return
    ds = PreferenceDataset.build(cfg.train_dataset, tok, name="train_dataset")
    ds.report.check_fills_batch(cfg.train_dataset.batch_size, "train_dataset")
    if cfg.eval_dataset is not None:
        PreferenceDataset.build(cfg.eval_dataset, tok, name="eval_dataset")


def run_pipeline(configs: str, output_root: str, overrides: list[str], *, resume: bool = False,
                 setup_logging: bool = False) -> dict[str, dict[str, float]]:
    """DPO -> reward -> PPO with the directories wired; returns each stage's last metrics.
    ``setup_logging``: console logging at each stage's ``log_level`` (the command line).

    Every stage's config and data are checked before the first stage trains. A preempted
    stage raises :class:`~torchxla_rlhf.errors.Preempted` (the pipeline stops there);
    ``resume`` skips the stages whose ``final`` checkpoint is complete and continues the
    others with ``resume_from=auto``.
    """
    from torchxla_rlhf.checkpoint import is_complete_checkpoint
    from torchxla_rlhf.configs import DPOConfig, PPOConfig, RewardConfig
    from torchxla_rlhf.trainers.base import run
    from torchxla_rlhf.trainers.dpo import DPOTrainer
    from torchxla_rlhf.trainers.ppo import PPOTrainer
    from torchxla_rlhf.trainers.reward import RewardTrainer

    per_stage: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in overrides:
        stage, _, rest = item.partition(".")
        if stage not in per_stage or not rest:
            raise ConfigError(f"override {item!r}: prefix it with the stage it applies to "
                              f"({', '.join(s + '.' for s in STAGES)})")
        per_stage[stage].append(rest)
    out = {s: f"{output_root.rstrip('/')}/{s}" for s in STAGES}
    wiring = {
        "dpo": [],
        "reward": [],
        "ppo": [f"model.name_or_path={out['dpo']}/final",
                f"reward_model.name_or_path={out['reward']}/final"],
    }
    kinds = {"dpo": (DPOConfig, DPOTrainer), "reward": (RewardConfig, RewardTrainer),
             "ppo": (PPOConfig, PPOTrainer)}
    done = {s: resume and is_complete_checkpoint(f"{out[s]}/final") for s in STAGES}
    resume_keys = {s: ["resume_from=auto"] if resume and not done[s] else [] for s in STAGES}
    # Parse every stage's config before running any, so a typo fails in seconds...
    cfgs = {
        s: load_config(kinds[s][0], os.path.join(configs, f"{s}.yaml"),
                       [f"output_dir={out[s]}", *wiring[s], *resume_keys[s], *per_stage[s]])
        for s in STAGES
    }
    # ...and read every stage's data, so bad PPO prompts do not wait for DPO and the RM.
    # PPO's model is DPO's output, whose tokenizer is DPO's.
    dpo = cfgs["dpo"]
    for s in STAGES:
        if not done[s]:
            source = cfgs[s].tokenizer or (
                dpo.tokenizer or dpo.model.name_or_path if s == "ppo" else cfgs[s].model.name_or_path)
            check_stage_data(cfgs[s], source)
    results: dict[str, dict[str, float]] = {}
    for i, s in enumerate(STAGES, 1):
        if done[s]:
            logger.info("pipeline --resume: %s/final is complete, skipping %s", out[s], s)
            continue
        print(f"stage {i}/{len(STAGES)}: {s} -> {out[s]}", flush=True)
        results[s] = run(kinds[s][1], cfgs[s], setup_logging=setup_logging,
                         label=f"{s} (stage {i}/{len(STAGES)})")
    print(pipeline_summary(out), flush=True)
    return results


OUTPUTS = {
    "dpo": [("final", "the DPO policy (AutoModelForCausalLM)")],
    "reward": [("final", "the reward model (AutoModelForSequenceClassification)")],
    "ppo": [("final", "the PPO policy (AutoModelForCausalLM)"),
            ("final-value", "its value model")],
}


def pipeline_summary(out: dict[str, str]) -> str:
    """Where the pipeline's outputs are: each stage's exported checkpoints and metrics."""
    lines = ["pipeline done; outputs:"]
    for s in STAGES:
        lines += [f"  {out[s]}/{name:<12} {what}" for name, what in OUTPUTS[s]]
    lines.append(f"  metrics: {', '.join(f'{out[s]}/metrics.jsonl' for s in STAGES)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("torchxla_rlhf: DPO, reward models and PPO for HF Llama models on PyTorch/XLA\n")
        for name, what in TRAINERS.items():
            print(f"  python -m torchxla_rlhf.{name:<7} --config FILE [key=value ...]   {what}")
        print("  python -m torchxla_rlhf pipeline [--configs DIR] [--output-root DIR] "
              "[STAGE.key=value ...]   DPO -> reward -> PPO, wired together")
        print("  python -m torchxla_rlhf plan --config FILE [--devices N] [--hbm-gib G] "
              "[key=value ...]   per-device memory plan: each term and whether it fits")
        print("  python -m torchxla_rlhf.launch --tpu NAME --zone ZONE [options] -- COMMAND ...   "
              "run COMMAND on every worker of a TPU pod")
        print("\nEach trainer's --help lists its config keys; --config FILE --help shows FILE's "
              "values,\n--print-config the resolved YAML, --check the device-free start-up checks.")
        return 0
    if argv[0] == "plan":
        return plan_main(argv[1:])
    if argv[0] != "pipeline":
        print(f"unknown command {argv[0]!r}; try: python -m torchxla_rlhf --help", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m torchxla_rlhf pipeline")
    parser.add_argument("--configs", default="configs/tiny", help="directory with dpo/reward/ppo.yaml")
    parser.add_argument("--output-root", default="outputs/tiny")
    parser.add_argument("--resume", action="store_true",
                        help="skip finished stages, continue the others with resume_from=auto")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("overrides", nargs="*", help="STAGE.key=value, e.g. ppo.total_steps=10")
    args = parser.parse_intermixed_args(argv[1:])
    from torchxla_rlhf.errors import debug_requested, run_guarded

    run_guarded(lambda: run_pipeline(args.configs, args.output_root, args.overrides,
                                     resume=args.resume, setup_logging=True),
                "python -m torchxla_rlhf pipeline", args.debug or debug_requested([]))
    return 0


# --- memory plan ---------------------------------------------------------------


def plan_main(argv: list[str]) -> int:
    """``plan``: print the per-device memory plan of a trainer config (no devices touched).
    The trainer is told by the config's keys (PPO has max_continuation_len, DPO beta)."""
    from torchxla_rlhf import memory_plan
    from torchxla_rlhf.configs import DPOConfig, PPOConfig, RewardConfig

    parser = argparse.ArgumentParser(prog="python -m torchxla_rlhf plan")
    parser.add_argument("--config", required=True, help="a dpo/reward/ppo YAML config")
    parser.add_argument("--devices", type=int, default=None,
                        help="device count (default: the mesh_dim's product, which must be fixed)")
    parser.add_argument("--hbm-gib", type=float, default=None, help="memory per device, GiB")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    kind = _config_kind(args.config)
    cls = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig}[kind]
    try:
        cfg = load_config(cls, args.config, args.overrides)
        devices = args.devices or _fixed_mesh_devices(cfg.mesh_dim)
        p = memory_plan.plan(cfg, devices, None if args.hbm_gib is None else args.hbm_gib * 2**30)
    except (ConfigError, memory_plan.PlanError) as e:
        print(f"python -m torchxla_rlhf plan: error: {e}", file=sys.stderr)
        return 2
    print(memory_plan.format_plan(p))
    return 1 if p.fits is False else 0


def _config_kind(path: str) -> str:
    """dpo, reward or ppo, from the keys only that trainer has."""
    import yaml

    with open(path) as f:
        keys = set((yaml.safe_load(f) or {}).keys())
    if keys & {"max_continuation_len", "reward_model", "mini_batch_size", "kl_coef"}:
        return "ppo"
    if keys & {"beta", "use_ipo", "label_smoothing", "load_reference_checkpoint"}:
        return "dpo"
    return "reward"


def _fixed_mesh_devices(mesh_dim: str) -> int:
    dims = [int(x) for x in str(mesh_dim).split(",")]
    if -1 in dims:
        raise ConfigError(f"mesh_dim={mesh_dim!r} has a -1 axis: pass --devices N")
    return dims[0] * dims[1] * dims[2]


if __name__ == "__main__":
    sys.exit(main())
