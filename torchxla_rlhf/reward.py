"""``python -m torchxla_rlhf.reward --config configs/reward_13b.yaml [key=value ...]``

parse -> build -> train -> close. ``main(config)`` is importable (the tests call it).
"""

from __future__ import annotations

from torchxla_rlhf.config import cli_main
from torchxla_rlhf.configs import RewardConfig


def main(cfg: RewardConfig) -> dict[str, float]:
    """Train a reward model as configured; returns the last logged metrics."""
    from torchxla_rlhf.trainers.base import run
    from torchxla_rlhf.trainers.reward import RewardTrainer

    return run(RewardTrainer, cfg)


if __name__ == "__main__":
    from torchxla_rlhf.trainers.base import setup_logging

    setup_logging()
    cli_main(RewardConfig, main, prog="python -m torchxla_rlhf.reward")
