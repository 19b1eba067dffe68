"""GRPO / RLOO (``trainer: grpo``, docs/grpo.md): its config tree (with the rewards a
completion earns) and its memory terms.

Torch-free, like every config module. The trainer is :mod:`torchxla_rlhf.trainers.grpo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from torchxla_rlhf.preflight import memory_plan
from torchxla_rlhf.configs.sections import AdamWConfig, ModelConfig, RolloutShapes, RunConfig, SamplingConfig
from torchxla_rlhf.configs.data import DataSource, DatasetConfig
from torchxla_rlhf.roles import ModelRole


@dataclass
class GRPORewardsConfig:
    """What a completion earns in GRPO / RLOO: a weighted sum of a verifiable reward, a format
    check and a reward model's score (a term with weight 0 or no source is off)."""

    verifier: str | None = "by_dataset"
    """Verifiable reward: 'by_dataset' (each record's dataset field picks its verifier:
    gsm8k, math, ifeval, or a name mapped in verifiers), one verifier for every record
    ('gsm8k': the number after ####, else the last number, exact; 'math': MATH-style LaTeX
    answers judged by math-verify; 'ifeval': the instruction constraint the ground_truth
    names), or a user function 'module:function' called once per step as
    function(completions, records) -> list of floats. null: none. docs/grpo.md has the rules."""
    verifiers: str = ""
    """With verifier=by_dataset: more dataset names and their verifiers, as
    'name=verifier, name=verifier' (a built-in or module:function; names are matched
    case-insensitively; gsm8k, math and ifeval map to their namesakes unless named here)."""
    verifier_timeout_s: int = 5
    """math-verify's limit (whole seconds) per parse and per comparison; a record that hits it
    scores 0 and is counted in rewards/math/frac_timeout (main thread only: signal.alarm)."""
    verifier_weight: float = 1.0
    """Weight of the verifiable reward."""
    format_weight: float = 0.0
    """Weight of the format check (1 when the final answer is given as \\boxed{} or ####)."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score (the top-level reward_model key)."""

    def validate(self) -> None:
        from torchxla_rlhf.algos.verifiers import parse_verifier_map  # noqa: PLC0415 - no torch inside

        parse_verifier_map(self.verifiers)
        if self.verifier_timeout_s < 1:
            raise ValueError(f"verifier_timeout_s: must be >= 1 (whole seconds), got "
                             f"{self.verifier_timeout_s}")


@dataclass
class GRPOConfig(RolloutShapes, RunConfig):
    """``python -m torchxla_rlhf.grpo``: critic-free RL (GRPO and its DAPO / Dr. GRPO / GSPO
    variants, or RLOO) on the rollout engine it shares with PPO: G rollouts per prompt, advantages from the group,
    no value model; the frozen reference only when a KL term is on (beta > 0)."""

    trainer: str = "grpo"
    """The trainer this config is for; a trainer refuses a file that names another."""
    output_dir: str = "outputs/grpo"
    """Where checkpoints, the resolved config, metrics.jsonl and samples.jsonl go."""
    optimizer: AdamWConfig = field(default_factory=AdamWConfig)
    """AdamW settings of the policy's optimizer."""
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Prompts (open-instruct's RLVR schema: messages, ground_truth, dataset); seq_length is the
    prompt length PL, batch_size the prompts per step."""
    eval_dataset: DataSource | None = None
    """Held-out prompts: mean reward of greedy completions, at start, every eval_freq steps and
    at the end (in order, in train_dataset.batch_size batches)."""
    eval_freq: int = 0
    """Evaluate every N steps (0: only at start and end, if eval_dataset)."""
    rewards: GRPORewardsConfig = field(default_factory=GRPORewardsConfig)
    """The reward: verifiable function, format check, reward model, weighted."""
    reward_model: ModelConfig | None = None
    """A frozen reward model (LlamaForSequenceClassification directory) scoring each rollout,
    weighted by rewards.reward_model_weight (null: none)."""
    prompt_add_bos: bool = True
    """Put BOS before each prompt."""
    rollouts_per_prompt: int = 4
    """G: completions sampled per prompt, one group (TRL's num_generations); >= 2."""
    max_continuation_len: int = 256
    """CL: new tokens per completion (static; rows stop at eos and are padded)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_k=0))
    """Rollout sampling (default: plain sampling at temperature 1, as TRL)."""
    rollout_micro_batch_size: int | None = None
    """Rollouts generated at once (default: all); must divide batch_size * rollouts_per_prompt."""
    logprobs_at_temperature: bool = True
    """Log-probs from logits / temperature (TRL does), so the ratio is of the sampling policy."""
    mini_batch_size: int = 64
    """Rollouts per optimizer update (over all hosts)."""
    num_iterations: int = 1
    """Passes over each generation (TRL's num_iterations, mu); the old log-probs are kept from
    before the first pass (with 1 they equal the current ones: ratio 1, no extra forward)."""
    lr: float = 1e-6
    """Learning rate (constant after warmup)."""
    warmup_epochs: float = 0.0
    """Linear warmup over this many epochs' worth of updates."""
    advantage: Literal["grpo", "rloo"] = "grpo"
    """grpo: (r - mean_group) / (std + eps) per scale_rewards; rloo: r minus the mean of the
    group's other G - 1 rewards, with the sequence-level RLOO loss."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: divide by the group's std, the batch's, or not at all (none = Dr. GRPO)."""
    normalize_advantages: bool = False
    """RLOO: whiten the advantages over the batch (TRL's normalize_advantages)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """GRPO loss aggregation, TRL's meaning: grpo (per-sequence token mean, then rows), bnpo
    (token mean over the micro-batch), dr_grpo (sum / (rows * max_continuation_len)), dapo
    (sum / tokens of the generation batch per micro-batch)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token, or one per sequence from the mean log-ratio (GSPO)."""
    epsilon: float = 0.2
    """Lower clip of the ratio: 1 - epsilon (and the upper one unless epsilon_high)."""
    epsilon_high: float | None = None
    """Upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); null: epsilon."""
    beta: float = 0.0
    """KL coefficient to the frozen reference (k3 estimator in the loss; RLOO: see kl_in).
    0: the reference is not loaded at all."""
    kl_in: Literal["loss", "reward"] = "loss"
    """RLOO only: the KL as a loss term (k3) or subtracted from the reward (beta * sum of
    log-ratios per sequence, TRL's RLOO). GRPO always puts it in the loss."""
    eps: float = 1e-4
    """Added to the std before dividing (TRL: 1e-4)."""
    overlong_cache_len: int = 0
    """DAPO's soft overlong penalty over the last N tokens before max_continuation_len
    (0: off): a completion of length L > CL - N gets (CL - N - L) / N added to its reward."""
    missing_eos_penalty: float | None = None
    """Reward of a completion cut off without eos (replaces its reward); null: off."""
    max_steps_per_epoch: int | None = None
    """Stop each epoch after this many steps (debugging aid)."""
    num_logged_samples: int = 8
    """(prompt, completion, reward) rows logged to the samples table each logging step."""

    def validate(self) -> None:
        super().validate()
        if self.rewards.verifier is None and self.reward_model is None and not self.rewards.format_weight:
            raise ValueError("rewards: no reward configured (set rewards.verifier, "
                             "rewards.format_weight or reward_model)")
        G = self.rollouts_per_prompt
        if G < 2:
            raise ValueError(f"rollouts_per_prompt: {G}; a group needs at least 2 completions")
        if self.max_continuation_len < 1:
            raise ValueError("max_continuation_len: must be >= 1")
        rollouts = self.train_dataset.batch_size * G
        if self.mini_batch_size < 1 or rollouts % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size: {self.mini_batch_size} must divide the rollouts per step "
                f"(train_dataset.batch_size * rollouts_per_prompt = {rollouts})")
        if self.mini_batch_size % G:
            raise ValueError(f"mini_batch_size: {self.mini_batch_size} must be a multiple of "
                             f"rollouts_per_prompt={G} (whole groups per update)")
        if self.mini_batch_size % self.optimizer.accumulate_gradient_steps:
            raise ValueError(
                f"optimizer.accumulate_gradient_steps: {self.optimizer.accumulate_gradient_steps}"
                f" must divide mini_batch_size={self.mini_batch_size}")
        micro = self.rollout_micro_batch_size
        if micro is not None and (micro < 1 or rollouts % micro):
            raise ValueError(f"rollout_micro_batch_size: {micro} must divide the rollouts per "
                             f"step ({rollouts})")
        if self.num_iterations < 1:
            raise ValueError("num_iterations: must be >= 1")
        for name in ("lr", "warmup_epochs", "beta", "epsilon", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError("epsilon_high: must be >= 0")
        if not 0 <= self.overlong_cache_len <= self.max_continuation_len:
            raise ValueError(f"overlong_cache_len: must be in [0, max_continuation_len="
                             f"{self.max_continuation_len}]")
        if self.eval_freq < 0:
            raise ValueError("eval_freq: must be >= 0")

    @property
    def needs_reference(self) -> bool:
        """The frozen reference is loaded only for a KL term."""
        return self.beta > 0

    def model_roles(self) -> list:
        """The policy trained; the reference only with a KL term; a reward model if set."""
        roles = [ModelRole("policy", "model", True, "causal")]
        if self.needs_reference:
            roles.append(ModelRole("reference", "model", False, "causal"))
        if self.reward_model is not None:
            roles.append(ModelRole("reward model", "reward_model", False, "classifier"))
        return roles

    def memory_terms(self, shapes, mesh, hbm_bytes, notes, *, gradients, compiler):
        return plan_grpo(self, shapes, mesh, hbm_bytes, notes,
                                     gradients=gradients, compiler=compiler)


def plan_grpo(cfg: Any, shapes: Mapping[str, memory_plan.Shape], mesh: memory_plan.Mesh, hbm_bytes: float | None,
              notes: list[str], gradients: str = "reduce_scatter", compiler: str = "tpu") -> memory_plan.Plan:
    """Memory terms of GRPO / RLOO: G x prompts rollout rows, the policy with AdamW, no value
    model, the frozen reference only with a KL term (beta > 0), a reward model only when one
    is configured (``cfg.model_roles()``)."""
    n = mesh.devices
    shape = shapes["model"]
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    t = pl + cl
    n_roll = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    frozen = [r for r in cfg.model_roles() if not r.trained]
    if not cfg.needs_reference:
        notes.append("beta=0: no reference model is loaded")
    tiled = mesh if compiler == "tpu" else None
    persistent = memory_plan.trained_terms("policy", shape, True, cfg.model.param_dtype, n, tiled)
    persistent += [memory_plan.frozen_term(r.role, shapes[r.key], r.head == "causal", getattr(cfg, r.key), n, tiled)
                   for r in frozen]
    all_rows = memory_plan.rows_per_device(n_roll, mesh, "rollouts per step (batch_size x rollouts_per_prompt)")
    # sequences, attention_mask (int64, T), continuation_mask (CL); old and reference
    # log-probs (fp32, CL) when kept.
    kept = (int(cfg.num_iterations > 1) + int(cfg.needs_reference)) * cl * 4
    persistent.append(memory_plan.Term("rollout buffers", all_rows * ((2 * t + cl) * 8 + kept),
                           f"{all_rows:g} rows x {t} tokens"))
    chunk = memory_plan.rows_per_device(cfg.mini_batch_size // cfg.optimizer.accumulate_gradient_steps, mesh,
                  "mini_batch_size / accumulate_gradient_steps")
    passes = [memory_plan.TrainedPass("policy", shape, cfg.model, chunk, t, True, cl)]
    return memory_plan.rollout_plan("grpo", cfg, shapes, mesh, hbm_bytes, persistent, passes, notes,
                         gradients, compiler)
