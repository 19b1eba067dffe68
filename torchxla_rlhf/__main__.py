"""``python -m torchxla_rlhf``: the trainers, and the tiny pipeline in one command.

    python -m torchxla_rlhf                       # lists the entry points
    python -m torchxla_rlhf pipeline [--configs configs/tiny] [--output-root outputs/tiny]
                                     [dpo.KEY=VALUE ...] [reward.KEY=VALUE ...] [ppo.KEY=VALUE ...]
    python -m torchxla_rlhf plan --config FILE [--devices N] [--hbm-gib G] [KEY=VALUE ...]

The pipeline runs DPO (the policy), the reward model, then PPO from those two, wiring the
output directories together: PPO's ``model.name_or_path`` is DPO's ``final`` and its
``reward_model.name_or_path`` the reward run's ``final``. Overrides are prefixed by the stage
they apply to.
"""

from __future__ import annotations

import argparse
import os
import sys

from torchxla_rlhf.config import ConfigError, load_config

TRAINERS = {
    "dpo": "DPO / IPO / cDPO on preference pairs",
    "reward": "a reward model (LlamaForSequenceClassification) on preference pairs",
    "ppo": "PPO with policy, reference, reward and value models",
}
STAGES = ("dpo", "reward", "ppo")


def run_pipeline(configs: str, output_root: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    """DPO -> reward -> PPO with the directories wired; returns each stage's last metrics."""
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
    # Parse every stage's config before running any, so a typo fails in seconds.
    cfgs = {
        s: load_config(kinds[s][0], os.path.join(configs, f"{s}.yaml"),
                       [f"output_dir={out[s]}", *wiring[s], *per_stage[s]])
        for s in STAGES
    }
    return {s: run(kinds[s][1], cfgs[s]) for s in STAGES}


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
        return 0
    if argv[0] == "plan":
        return plan_main(argv[1:])
    if argv[0] != "pipeline":
        print(f"unknown command {argv[0]!r}; try: python -m torchxla_rlhf --help", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m torchxla_rlhf pipeline")
    parser.add_argument("--configs", default="configs/tiny", help="directory with dpo/reward/ppo.yaml")
    parser.add_argument("--output-root", default="outputs/tiny")
    parser.add_argument("overrides", nargs="*", help="STAGE.key=value, e.g. ppo.total_steps=10")
    args = parser.parse_args(argv[1:])
    from torchxla_rlhf.trainers.base import setup_logging

    setup_logging()
    try:
        run_pipeline(args.configs, args.output_root, args.overrides)
    except ConfigError as e:
        print(f"python -m torchxla_rlhf pipeline: error: {e}", file=sys.stderr)
        return 2
    return 0


# --- memory plan (issue 9) ---------------------------------------------------------------


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
