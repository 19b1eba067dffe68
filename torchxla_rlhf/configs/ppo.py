"""PPO (``trainer: ppo``, docs/ppo.md): its config tree and its memory terms.

Torch-free, like every config module. The trainer is :mod:`torchxla_rlhf.trainers.ppo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from torchxla_rlhf.preflight import memory_plan
from torchxla_rlhf.configs.sections import AdamWConfig, ModelConfig, RolloutShapes, RunConfig, SamplingConfig
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.roles import ModelRole


@dataclass
class PPOConfig(RolloutShapes, RunConfig):
    """``python -m torchxla_rlhf.ppo``: PPO with policy, reference, reward and value models on
    one mesh (docs/ppo.md). ``model`` is the policy (and the reference's start)."""

    trainer: str = "ppo"
    """The trainer this config is for; a trainer refuses a file that names another."""

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
    """Put BOS before each prompt, as the models were trained and as the paper's JAX code did."""
    rollouts_per_prompt: int = 1
    """Samples per prompt (adjacent copies in the rollout batch)."""
    max_continuation_len: int = 1024
    """CL: new tokens sampled per rollout (static; rows stop at eos and are padded)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Rollout sampling: temperature 0.7, top-k 50, top-p 1.0 as the paper's runs."""
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
    """Learning rate of the policy and the value model (EasyLM's --lr)."""
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
    """Stop each epoch after this many steps (debugging aid, as EasyLM's flag)."""
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
        for name in ("warmup_epochs", "policy_freeze_epochs", "kl_coef", "lr", "value_lr",
                     "vf_coef"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("cliprange", "cliprange_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.oracle is not None and self.oracle not in ORACLES:
            raise ValueError(f"oracle: unknown {self.oracle!r}; known: {sorted(ORACLES)}")

    def model_roles(self) -> list:
        """Policy and value model trained; reference and reward model frozen. The value model
        starts from ``value_model`` when set, else from the reward model."""
        value_key = "value_model" if self.value_model is not None else "reward_model"
        return [ModelRole("policy", "model", True, "causal"),
                ModelRole("reference", "model", False, "causal"),
                ModelRole("reward model", "reward_model", False, "classifier"),
                ModelRole("value model", value_key, True, "classifier")]

    def memory_terms(self, shapes, mesh, hbm_bytes, notes, *, gradients, compiler):
        return plan_ppo(self, shapes, mesh, hbm_bytes, notes,
                                    gradients=gradients, compiler=compiler)


def _tiny_vowels(text: str) -> float:
    from torchxla_rlhf.data.synthetic import oracle_score

    return oracle_score(text)


ORACLES = {"tiny_vowels": _tiny_vowels}
"""Named response-scoring functions for ``PPOConfig.oracle`` (a registry: no eval of strings)."""


def plan_ppo(cfg: Any, shapes: Mapping[str, memory_plan.Shape], mesh: memory_plan.Mesh, hbm_bytes: float | None,
             notes: list[str], gradients: str = "reduce_scatter", compiler: str = "tpu") -> memory_plan.Plan:
    """Memory terms of PPO: policy and value model trained, reference and reward model frozen;
    the rollout and the training micro-step are the two phases."""
    n = mesh.devices
    shape = shapes["model"]
    rm_shape = shapes["reward_model"]
    value_cfg = cfg.value_model or cfg.reward_model
    value_shape = shapes["value_model" if cfg.value_model is not None else "reward_model"]
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    t = pl + cl
    n_roll = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    tiled = mesh if compiler == "tpu" else None
    persistent = (
        memory_plan.trained_terms("policy", shape, True, cfg.model.param_dtype, n, tiled)
        + memory_plan.trained_terms("value", value_shape, False, value_cfg.param_dtype, n, tiled)
        + [memory_plan.frozen_term("reference", shape, True, cfg.model, n, tiled),
           memory_plan.frozen_term("reward model", rm_shape, False, cfg.reward_model, n, tiled)]
    )
    all_rows = memory_plan.rows_per_device(n_roll, mesh, "rollouts per step")
    # sequences, attention_mask (int64, T), continuation_mask (CL) and, in standard mode, old
    # and reference log-probs, values, rewards, advantages and returns (fp32, CL).
    scored = 6 * cl * 4 if cfg.mode == "standard" else 0
    persistent.append(memory_plan.Term("rollout buffers", all_rows * ((2 * t + cl) * 8 + scored),
                           f"{all_rows:g} rows x {t} tokens"))
    chunk = memory_plan.rows_per_device(cfg.mini_batch_size // cfg.optimizer.accumulate_gradient_steps, mesh,
                  "mini_batch_size / accumulate_gradient_steps")
    passes = [memory_plan.TrainedPass("policy", shape, cfg.model, chunk, t, True, cl),
              memory_plan.TrainedPass("value", value_shape, value_cfg, chunk, t, False)]
    return memory_plan.rollout_plan("ppo", cfg, shapes, mesh, hbm_bytes, persistent, passes, notes,
                         gradients, compiler)
