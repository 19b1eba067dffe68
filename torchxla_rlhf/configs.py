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
from torchxla_rlhf.generation import SamplingConfig
from torchxla_rlhf.models import ModelConfig
from torchxla_rlhf.optim import AdamWConfig, OptimizerConfig
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
    save_training_state: bool = False
    """Also save parameters, optimizer state and data position for exact resume (the seed's
    --checkpointer.save_optimizer_state; costs 3x the model's fp32 size per checkpoint)."""
    resume_from: str | None = None
    """Resume from this checkpoint's training_state; 'auto': output_dir/checkpoint-latest if it
    has one (else start fresh)."""
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
class PairRunConfig(RunConfig):
    """Keys of the trainers that learn from preference pairs (DPO, reward model)."""

    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Preference pairs (chosen/rejected message lists, optional numeric margin)."""
    eval_dataset: DatasetConfig | None = None
    """Held-out preference pairs (optional): reward accuracy for DPO, accuracy for the RM."""
    eval_freq: int = 0
    """Evaluate every N updates and at the end (0: only at start and end, if eval_dataset)."""

    def validate(self) -> None:
        super().validate()
        if self.eval_freq < 0:
            raise ValueError("eval_freq: must be >= 0")


@dataclass
class DPOConfig(PairRunConfig):
    """``python -m torchxla_rlhf.dpo``: DPO / IPO / cDPO (spec section 4)."""

    output_dir: str = "outputs/dpo"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
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


@dataclass
class RewardConfig(PairRunConfig):
    """``python -m torchxla_rlhf.reward``: a pairwise reward model (spec section 5)."""

    output_dir: str = "outputs/reward"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
    use_margin: bool = False
    """Margin loss -logsigmoid(r_chosen - r_rejected - margin), margin from the data."""
    head_seed: int = 0
    """Seed of the score head's normal(0, initializer_range) init (causal-LM starts only)."""


@dataclass
class PPOConfig(RunConfig):
    """``python -m torchxla_rlhf.ppo``: PPO with policy, reference, reward and value models on
    one mesh (spec section 6). ``model`` is the policy (and the reference's start)."""

    output_dir: str = "outputs/ppo"
    """Where checkpoints, the resolved config, metrics.jsonl and samples.jsonl go."""
    reward_model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen reward model (a LlamaForSequenceClassification directory)."""
    value_model: ModelConfig | None = None
    """Where the value model starts (default: the reward model); its head runs at every token."""
    optimizer: AdamWConfig = field(default_factory=AdamWConfig)
    """AdamW settings shared by the policy's and the value model's optimizers."""
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Prompts; seq_length is the prompt length PL, batch_size the prompts per step."""
    prompt_add_bos: bool = True
    """Put BOS before each prompt, as the models were trained (the paper's JAX runs did not)."""
    rollouts_per_prompt: int = 1
    """Samples per prompt (adjacent copies in the rollout batch)."""
    max_continuation_len: int = 1024
    """CL: new tokens sampled per rollout (static; rows stop at eos and are padded)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Rollout sampling: temperature 0.7, top-k 50, top-p 1.0 as the paper's runs."""
    # --- per-device memory (issue 9) ---
    rollout_micro_batch_size: int | None = None
    """Rollouts generated at once (over all hosts; default: the whole rollout batch). Smaller
    pieces shrink the KV cache and decode activations; each piece runs the same compiled
    graphs. Must divide train_dataset.batch_size * rollouts_per_prompt."""
    logprobs_at_temperature: bool = False
    """Take log-probs from logits / temperature (the paper's runs: no, raw logits)."""
    mode: Literal["standard", "interleaved"] = "standard"
    """standard: old log-probs, values and advantages once per rollout batch before the
    updates; interleaved: recomputed inside each mini-batch's step (the paper's JAX code)."""
    mini_batch_size: int = 64
    """Rollouts per PPO update (over all hosts)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    lr: float = 1e-6
    """Learning rate of the policy and the value model (the seed's --lr)."""
    value_lr: float | None = None
    """Learning rate of the value model (default: lr)."""
    warmup_epochs: float = 0.1
    """Linear warmup over this many epochs' worth of updates, then constant."""
    policy_freeze_epochs: float = 0.0
    """The policy's lr stays 0 for this many epochs' worth of updates (value warm-up)."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the old values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten per-token rewards (without re-centering) before GAE."""
    reward_gain: float = 1.0
    """score = reward * reward_gain + reward_bias."""
    reward_bias: float = 0.0
    """score = reward * reward_gain + reward_bias."""
    missing_eos_penalty: float | None = -10.0
    """Reward of a response cut off without eos (the paper: -10); null keeps the RM's score."""
    max_steps_per_epoch: int | None = None
    """Stop each epoch after this many steps (debugging aid, as the seed's flag)."""
    generate_only: bool = False
    """Roll out and score, log the samples, but never update (debugging aid)."""
    num_logged_samples: int = 8
    """(prompt, response, reward) rows logged to the samples table each logging step."""
    oracle: str | None = None
    """Name of a scoring function for responses logged as oracle/score_mean ('tiny_vowels')."""

    def validate(self) -> None:
        super().validate()
        if self.rollouts_per_prompt < 1:
            raise ValueError("rollouts_per_prompt: must be >= 1")
        if self.max_continuation_len < 1:
            raise ValueError("max_continuation_len: must be >= 1")
        rollouts = self.train_dataset.batch_size * self.rollouts_per_prompt
        if self.mini_batch_size < 1 or rollouts % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size: {self.mini_batch_size} must divide the rollouts per step "
                f"(train_dataset.batch_size * rollouts_per_prompt = {rollouts})"
            )
        if self.mini_batch_size % self.optimizer.accumulate_gradient_steps:
            raise ValueError(
                f"optimizer.accumulate_gradient_steps: {self.optimizer.accumulate_gradient_steps}"
                f" must divide mini_batch_size={self.mini_batch_size}"
            )
        if self.ppo_epochs < 1:
            raise ValueError("ppo_epochs: must be >= 1")
        micro = self.rollout_micro_batch_size
        if micro is not None and (micro < 1 or rollouts % micro):
            raise ValueError(
                f"rollout_micro_batch_size: {micro} must divide the rollouts per step "
                f"(train_dataset.batch_size * rollouts_per_prompt = {rollouts})"
            )
        for name in ("warmup_epochs", "policy_freeze_epochs", "kl_coef", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.oracle is not None and self.oracle not in ORACLES:
            raise ValueError(f"oracle: unknown {self.oracle!r}; known: {sorted(ORACLES)}")


def _tiny_vowels(text: str) -> float:
    from torchxla_rlhf.data.synthetic import oracle_score

    return oracle_score(text)


ORACLES = {"tiny_vowels": _tiny_vowels}
"""Named response-scoring functions for ``PPOConfig.oracle`` (a registry: no eval of strings)."""
