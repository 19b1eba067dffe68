"""``python -m torchxla_rlhf.grpo --config FILE_OR_SHIPPED_NAME [--print-config | --check] [key=value ...]``

GRPO (and DAPO / Dr. GRPO / GSPO settings) or RLOO (``advantage=rloo``) with verifiable
rewards. ``main(config)`` is importable.
"""

from __future__ import annotations

from torchxla_rlhf.preflight.startup import run_checks
from torchxla_rlhf.configs.loader import cli_main
from torchxla_rlhf.configs.grpo import GRPOConfig


def main(cfg: GRPOConfig, *, setup_logging: bool = False) -> dict[str, float]:
    """Train GRPO / RLOO as configured; returns the last logged metrics."""
    from torchxla_rlhf.trainers.base import run
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    return run(GRPOTrainer, cfg, setup_logging=setup_logging)


if __name__ == "__main__":
    cli_main(GRPOConfig, lambda cfg: main(cfg, setup_logging=True), prog="python -m torchxla_rlhf.grpo",
             check=run_checks)
