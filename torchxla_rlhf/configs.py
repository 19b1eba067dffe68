"""The trainers' config trees (one dataclass tree per trainer; a docstring per field).

Field names follow the seed's EasyLM flags where one exists, so the paper's commands carry
over: ``mesh_dim``, ``tokenizer_pad_token_id``, ``train_dataset.seq_length``,
``optimizer.accumulate_gradient_steps``, ``save_model_freq``, ``max_continuation_len``, ...
The README maps every seed flag to its key here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torchxla_rlhf.data.config import DatasetConfig
from torchxla_rlhf.models import ModelConfig
from torchxla_rlhf.optim import OptimizerConfig
from torchxla_rlhf.tracking import LoggingConfig


@dataclass
class RunConfig:
    """Keys every trainer has."""

    output_dir: str = "outputs/run"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
    mesh_dim: str = "1,-1,1"
    """Device mesh 'dp,fsdp,mp' (EasyLM's spelling); one -1 takes the remaining devices."""
    seed: int = 42
    """Seed of the device RNG and of the data shuffle."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train (policy, or reward-model backbone)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub name (default: the model's); 'tiny' for the byte-level one."""
    tokenizer_pad_token_id: int = 0
    """Pad id (the seed's --tokenizer_pad_token_id; LLaMA-2/Tulu 2 use 0)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW, clipping, accumulation and schedule."""
    num_epochs: float = 1.0
    """Passes over the training data (may be fractional)."""
    total_steps: int | None = None
    """Optimizer updates to run; overrides num_epochs when set."""
    save_model_freq: int = 0
    """Write checkpoint-latest every N updates, replacing the previous one (0: never)."""
    save_milestone_freq: int = 0
    """Write checkpoint-<step> every N updates, kept (0: never)."""
    save_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Dtype of saved weights (config.json's torch_dtype matches)."""
    logger: LoggingConfig = field(default_factory=LoggingConfig)
    """wandb, progress bar and metrics.jsonl."""

    def validate(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir: must be set")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps: must be >= 1, got {self.total_steps}")
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs: must be > 0, got {self.num_epochs}")
        if self.save_model_freq < 0 or self.save_milestone_freq < 0:
            raise ValueError("save_model_freq/save_milestone_freq: must be >= 0")


@dataclass
class DPOConfig(RunConfig):
    """``python -m torchxla_rlhf.dpo``: DPO / IPO / cDPO (spec section 4)."""

    output_dir: str = "outputs/dpo"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Preference pairs (chosen/rejected message lists)."""
    eval_dataset: DatasetConfig | None = None
    """Held-out preference pairs for reward accuracy (optional)."""
    eval_freq: int = 0
    """Evaluate every N updates and at the end (0: only if eval_dataset, at start and end)."""
    beta: float = 0.1
    """DPO temperature beta."""
    label_smoothing: float = 0.0
    """cDPO label smoothing (0 = standard DPO)."""
    use_ipo: bool = False
    """IPO loss (z - 1/(2 beta))^2 instead of the sigmoid loss."""
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
        if self.use_ipo and self.label_smoothing:
            raise ValueError("label_smoothing: not used by IPO (use_ipo=true); set it to 0")
        if self.eval_freq < 0:
            raise ValueError("eval_freq: must be >= 0")


@dataclass
class RewardConfig(RunConfig):
    """``python -m torchxla_rlhf.reward``: a pairwise reward model (spec section 5)."""

    output_dir: str = "outputs/reward"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Preference pairs (chosen/rejected message lists, optional numeric margin)."""
    eval_dataset: DatasetConfig | None = None
    """Held-out preference pairs for accuracy (optional)."""
    eval_freq: int = 0
    """Evaluate every N updates and at the end (0: only at start and end, if eval_dataset)."""
    use_margin: bool = False
    """Margin loss -logsigmoid(r_chosen - r_rejected - margin), margin from the data."""
    head_seed: int = 0
    """Seed of the score head's normal(0, initializer_range) init (causal-LM starts only)."""

    def validate(self) -> None:
        super().validate()
        if self.eval_freq < 0:
            raise ValueError("eval_freq: must be >= 0")
