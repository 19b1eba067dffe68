"""``python -m torchxla_rlhf.ppo --config FILE_OR_SHIPPED_NAME [--print-config | --check] [key=value ...]``

parse -> run (set up, build, resume, train, close), or print the resolved config, or run the
device-free start-up checks (:mod:`torchxla_rlhf.preflight.startup`). ``main(config)`` is importable.
"""

from __future__ import annotations

from torchxla_rlhf.preflight.startup import run_checks
from torchxla_rlhf.configs.loader import cli_main
from torchxla_rlhf.configs.ppo import PPOConfig


def main(cfg: PPOConfig, *, setup_logging: bool = False) -> dict[str, float]:
    """Train PPO as configured; returns the last logged metrics."""
    from torchxla_rlhf.trainers.base import run
    from torchxla_rlhf.trainers.ppo import PPOTrainer

    return run(PPOTrainer, cfg, setup_logging=setup_logging)


if __name__ == "__main__":
    cli_main(PPOConfig, lambda cfg: main(cfg, setup_logging=True), prog="python -m torchxla_rlhf.ppo",
             check=run_checks)
