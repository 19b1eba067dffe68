"""``python -m torchxla_rlhf.dpo --config configs/dpo_13b.yaml [key=value ...]``

parse -> build -> train -> close. ``main(config)`` is importable (the tests call it).
"""

from __future__ import annotations

from torchxla_rlhf.config import cli_main
from torchxla_rlhf.configs import DPOConfig


def main(cfg: DPOConfig) -> dict[str, float]:
    """Train DPO as configured; returns the last logged metrics."""
    from torchxla_rlhf.trainers.base import run
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    return run(DPOTrainer, cfg)


if __name__ == "__main__":
    from torchxla_rlhf.trainers.base import setup_logging

    setup_logging()
    cli_main(DPOConfig, main, prog="python -m torchxla_rlhf.dpo")
