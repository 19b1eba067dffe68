"""``python -m torchxla_rlhf.ppo --config configs/ppo_13b.yaml [key=value ...]``

parse -> build -> train -> close. ``main(config)`` is importable (the tests call it).
"""

from __future__ import annotations

from torchxla_rlhf.config import cli_main
from torchxla_rlhf.configs import PPOConfig


def main(cfg: PPOConfig) -> dict[str, float]:
    """Train PPO as configured; returns the last logged metrics."""
    from torchxla_rlhf.trainers.base import run
    from torchxla_rlhf.trainers.ppo import PPOTrainer

    return run(PPOTrainer, cfg)


if __name__ == "__main__":
    from torchxla_rlhf.trainers.base import setup_logging

    setup_logging()
    cli_main(PPOConfig, main, prog="python -m torchxla_rlhf.ppo")
