"""The pairwise reward model (``trainer: reward``, docs/reward.md): its config tree; its
memory terms are the preference-pair trainers' (:class:`~torchxla_rlhf.configs.sections.PairRunConfig`).

Torch-free, like every config module. The trainer is :mod:`torchxla_rlhf.trainers.reward`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchxla_rlhf.configs.sections import PairRunConfig
from torchxla_rlhf.roles import ModelRole


@dataclass
class RewardConfig(PairRunConfig):
    """``python -m torchxla_rlhf.reward``: a pairwise reward model (docs/reward.md)."""

    trainer: str = "reward"
    """The trainer this config is for; a trainer refuses a file that names another."""

    output_dir: str = "outputs/reward"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
    use_margin: bool = False
    """Margin loss -logsigmoid(r_chosen - r_rejected - margin), margin from the data."""
    head_seed: int = 0
    """Seed of the score head's normal(0, initializer_range) init (causal-LM starts only)."""

    def model_roles(self) -> list:

        return [ModelRole("reward model", "model", True, "classifier")]
