"""DPO (``trainer: dpo``, docs/dpo.md): its config tree; its memory terms are the
preference-pair trainers' (:class:`~torchxla_rlhf.configs.sections.PairRunConfig`).

Torch-free, like every config module. The trainer is :mod:`torchxla_rlhf.trainers.dpo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchxla_rlhf.configs.sections import PairRunConfig
from torchxla_rlhf.roles import ModelRole


@dataclass
class DPOConfig(PairRunConfig):
    """``python -m torchxla_rlhf.dpo``: DPO / IPO / cDPO (docs/dpo.md)."""

    trainer: str = "dpo"
    """The trainer this config is for; a trainer refuses a file that names another."""

    output_dir: str = "outputs/dpo"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
    beta: float = 0.1
    """DPO temperature beta."""
    label_smoothing: float = 0.0
    """cDPO label smoothing (0 = standard DPO)."""
    use_ipo: bool = False
    """IPO loss (z - 1/(2 beta))^2 instead of the sigmoid loss (an alias of loss_type=ipo)."""
    loss_type: Literal["dpo", "ipo", "dpo_norm", "simpo"] = "dpo"
    """dpo: sigmoid loss on summed log-probs (cDPO with label_smoothing); ipo; dpo_norm: the
    sigmoid loss on log-probs averaged over the response tokens (Tulu 3, open-instruct);
    simpo: reference-free, length-normalized, with target margin gamma (no reference model is
    loaded)."""
    gamma: float = 0.5
    """SimPO's target reward margin: loss = -logsigmoid(beta * (avg_chosen - avg_rejected) -
    gamma) (open-instruct's gamma_beta_ratio = gamma / beta)."""
    load_reference_checkpoint: str | None = None
    """Reference model (default: a frozen copy of the starting policy)."""
    precalculate_reference_logps: bool = False
    """Compute reference log-probs once (cached in output_dir) and drop the reference model."""

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.use_ipo and self.loss_type not in ("dpo", "ipo"):
            raise ValueError(f"use_ipo: true contradicts loss_type={self.loss_type}; drop use_ipo")
        if (self.use_ipo or self.loss_type == "ipo") and self.label_smoothing:
            raise ValueError("label_smoothing: not used by IPO (use_ipo=true); set it to 0")
        if not self.needs_reference and (self.precalculate_reference_logps
                                         or self.load_reference_checkpoint):
            raise ValueError(f"loss_type: {self.loss_type} is reference-free; unset "
                             "precalculate_reference_logps and load_reference_checkpoint")

    @property
    def objective(self) -> str:
        """The loss_type in effect (use_ipo folded in)."""
        return "ipo" if self.use_ipo else self.loss_type

    @property
    def needs_reference(self) -> bool:
        """Whether the objective uses a reference model (simpo does not)."""
        return self.objective != "simpo"

    def model_roles(self) -> list:
        """The policy and its frozen reference (freed after start-up when its log-probs are
        precalculated)."""
        policy = [ModelRole("policy", "model", True, "causal")]
        if not self.needs_reference:  # simpo: no reference model at all
            return policy
        return policy + [ModelRole("reference", "model", False, "causal",
                                   resident=not self.precalculate_reference_logps)]
