"""The trainers' config trees (one dataclass tree per trainer; a docstring per field).

Field names follow EasyLM's flags (the paper's JAX code) where one exists, so the paper's commands carry
over: ``mesh_dim``, ``tokenizer_pad_token_id``, ``train_dataset.seq_length``,
``optimizer.accumulate_gradient_steps``, ``save_model_freq``, ``max_continuation_len``, ...
The README maps every EasyLM flag to its key here. This module imports neither torch nor
model code, so that ``--help`` and config errors answer in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from torchxla_rlhf import memory_plan
from torchxla_rlhf.data.config import DataSource, DatasetConfig
from torchxla_rlhf.roles import Batch, ModelRole

# The sections below are defined here, not next to the code that uses them (models,
# optim, generation, tracking re-import them), so that parsing a config or printing --help
# loads no model code: transformers' Llama import pulls in torch_xla.


@dataclass
class TinyModelConfig:
    """Shape of the ``tiny`` model (random init, seeded)."""

    vocab_size: int = 320
    """Embedding rows; >= the tiny byte-level tokenizer's 259 ids."""
    hidden_size: int = 64
    """Model width."""
    intermediate_size: int = 128
    """MLP width."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Attention heads (must divide by the mesh's mp)."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention; must divide by mp)."""
    max_position_embeddings: int = 1024
    """Longest sequence the rotary embedding is set up for."""
    seed: int = 0
    """Seed of the random initialisation."""


@dataclass
class ModelConfig:
    """Which model to load and how to run it."""

    name_or_path: str = "tiny"
    """Local HF directory, hub name, ``gs://`` directory, or ``tiny`` (random, seeded)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name_or_path`` is a hub name."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype parameters (and optimizer state) are kept in. The paper: float32."""
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Dtype of the forward/backward matmuls (autocast). The paper: bfloat16."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (13B at 4096 tokens needs it)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the model built when ``name_or_path`` is ``tiny``."""

    attn_implementation: Literal["auto", "eager", "xla_einsum"] = "auto"
    """Attention: auto = xla_einsum (keeps heads split over mp; attention.py); eager = HF's
    (all-gathers q/k/v over mp and computes every head's scores on every device)."""
    frozen_dtype: Literal["compute", "param"] = "compute"
    """Dtype the matmul weights of a frozen copy of this model (reference, reward) are stored
    in: compute_dtype (it never trains; under autocast the outputs are the same) or param_dtype
    (keep fp32)."""

    def validate(self) -> None:
        if not self.name_or_path:
            raise ValueError("name_or_path: must name a model directory, hub name or 'tiny'")



@dataclass
class AdamWConfig:
    """AdamW hyper-parameters, clipping and accumulation (docs/training.md)."""

    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon (added to sqrt(v_hat))."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices (not norms)."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping."""
    accumulate_gradient_steps: int = 1
    """Micro-batches per optimizer update; the schedule counts updates, not micro-batches."""

    def validate(self) -> None:
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError("b1/b2: must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"eps: must be > 0, got {self.eps}")
        if self.accumulate_gradient_steps < 1:
            raise ValueError(
                f"accumulate_gradient_steps: must be >= 1, got {self.accumulate_gradient_steps}"
            )
        if self.max_grad_norm < 0:
            raise ValueError("max_grad_norm: must be >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass
class OptimizerConfig(AdamWConfig):
    """AdamW plus the DPO/RM schedule: linear warmup from 0, then linear decay to end_lr."""

    lr: float = 5e-7
    """Peak learning rate."""
    end_lr: float = 0.0
    """Learning rate reached by linear decay at the end of training."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer updates spent warming up linearly from 0 to ``lr``."""

    def validate(self) -> None:
        super().validate()
        if self.lr < 0 or self.end_lr < 0:
            raise ValueError("lr: learning rates must be >= 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio: must be in [0, 1], got {self.warmup_ratio}")



GATHER_WEIGHTS = ("auto", "per_layer", "hoisted", "generation_layout")
"""The values of ``SamplingConfig.gather_weights``."""


@dataclass
class SamplingConfig:
    """How the next token is chosen. All fields are Python constants baked into the graph."""

    temperature: float = 0.7
    """Logits are divided by this before top-k/top-p and sampling (paper default 0.7).
    Ignored when ``greedy``."""

    top_k: int = 50
    """Keep only the ``top_k`` largest logits (ties with the k-th kept, as HF does); 0 = off.
    Paper runs had 50 (the generation library's default)."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to more than
    ``top_p`` (HF ``TopPLogitsWarper`` rule, at least one token kept); 1.0 = off."""

    greedy: bool = False
    """Take ``argmax`` of the raw logits (no temperature, top-k, top-p or noise)."""

    stop_check_every: int = 0
    """0: always run all ``max_new_tokens`` steps.
    k > 0: stop once every row has emitted eos. On XLA the decode loop checks this on the
    device before every step (no host sync; the k only needs to be > 0). On the eager CPU path
    one boolean is read to the host every k tokens. The output is the same either way (the
    skipped steps would only write pad); what is saved is device time when most batches finish
    well before ``max_new_tokens``."""

    gather_weights: Literal["auto", "per_layer", "hoisted", "generation_layout"] = "auto"
    """How the rollout gets the policy's FSDP-sharded weights (docs/ppo.md, "Weights in the
    rollout"; ``plan`` prints each policy's memory and per-token traffic).

    ``generation_layout``: once per rollout, one compiled graph copies the weights (matmul
    weights in the compute dtype) into a tensor-parallel layout over groups of
    ``generation_tp`` devices, data parallel across the groups; the prefill and the decode
    loop read that copy, so a token moves only activations (two all-reduces of
    ``[rows per group, hidden]`` per layer), no weights. Costs the copy, ``model /
    generation_tp`` per device, for the rollout (freed after it).
    ``per_layer``: each layer's weights are all-gathered over ``fsdp`` inside the loop when
    that layer runs, at every token (a device holds about two layers gathered; weight
    traffic grows with tokens: the whole model over ``mp`` per token).
    ``hoisted``: every weight is gathered once before the loop and held whole over ``fsdp``
    for the whole rollout (the whole model / mp per device; the TPU compiler does not hoist).
    ``auto`` (default): the trainers ask the memory planner
    (``memory_plan.resolve_sampling``): ``generation_layout`` with the smallest
    ``generation_tp`` whose rollout fits beside the training state, else ``per_layer``. A
    :class:`Generator` given ``auto`` directly behaves as ``per_layer``."""

    generation_tp: int = 0
    """Devices per tensor-parallel group of the generation layout: ``mp * f`` with ``f``
    dividing ``fsdp``. 0 (default): chosen by the planner under ``auto`` (the smallest that
    fits, preferring sizes that divide the heads), else ``mp * fsdp`` (one copy per dp
    replica: the compute-dtype size of the training shards)."""

    def __post_init__(self) -> None:
        if self.gather_weights not in GATHER_WEIGHTS:
            raise ValueError(
                f"SamplingConfig.gather_weights={self.gather_weights!r}: expected one of "
                f"{', '.join(GATHER_WEIGHTS)}"
            )
        if not isinstance(self.generation_tp, int) or self.generation_tp < 0:
            raise ValueError(
                f"SamplingConfig.generation_tp={self.generation_tp!r}: expected an int >= 0 "
                "(0 = chosen by the planner)"
            )
        if not self.greedy and not self.temperature > 0:
            raise ValueError(
                f"SamplingConfig.temperature={self.temperature!r}: expected a number > 0 "
                "(use greedy=True for argmax decoding)"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k!r}: expected an int >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p={self.top_p!r}: expected 0 < top_p <= 1")
        if not isinstance(self.stop_check_every, int) or self.stop_check_every < 0:
            raise ValueError(
                f"SamplingConfig.stop_check_every={self.stop_check_every!r}: expected an int >= 0"
            )



@dataclass
class LoggingConfig:
    """Where and how often training metrics go. The W&B keys left unset (null) follow the
    environment, as in TRL and accelerate: ``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``,
    ``WANDB_RUN_GROUP`` (and wandb reads ``WANDB_API_KEY`` and ``WANDB_NAME`` itself); a value
    set here wins over the environment."""

    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode: ``online`` syncs to wandb.ai (needs ``WANDB_API_KEY`` or ``wandb login``),
    ``offline`` writes a run directory under output_dir to upload later with ``wandb sync``,
    ``disabled`` makes every wandb call a no-op; null: ``$WANDB_MODE``, else disabled.
    ``metrics.jsonl`` is written in all modes."""

    project: str | None = None
    """W&B project name; null: ``$WANDB_PROJECT``, else torchxla_rlhf."""

    entity: str | None = None
    """W&B entity (user or team); null: ``$WANDB_ENTITY``, else the account's default."""

    group: str | None = None
    """W&B run group (e.g. the three stages of one pipeline); null: ``$WANDB_RUN_GROUP``."""

    run_name: str | None = None
    """W&B run name; null: ``$WANDB_NAME``, else wandb picks one."""

    log_freq: int = 1
    """Log device metrics every N optimizer steps (and at the last step). Reading them is
    cheap but not free: one device-to-host copy of a packed metrics vector per graph, made
    by a background thread once the graph has run (the loop does not wait for it)."""

    progress_bar: bool = True
    """Show a tqdm bar over the optimizer steps with the latest few metrics, named after the
    trainer. The first step's compilation is shown as such and left out of the ETA."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("online", "offline", "disabled", None):
            raise ValueError(
                f"logging.wandb_mode={self.wandb_mode!r}: expected 'online', 'offline', 'disabled' "
                "or null (follow $WANDB_MODE)"
            )
        if isinstance(self.log_freq, bool) or not isinstance(self.log_freq, int) or self.log_freq < 1:
            raise ValueError(f"logging.log_freq={self.log_freq!r}: expected an integer >= 1")


@dataclass
class RunConfig:
    """Keys every trainer has."""

    trainer: str = ""
    """The trainer this config is for (dpo, reward, ppo: each trainer's config class sets its
    own). Every shipped config sets it at the top; ``python -m torchxla_rlhf plan`` reads it,
    and a trainer refuses a file that names another."""
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
    """Pad id (EasyLM's --tokenizer_pad_token_id; LLaMA-2/Tulu 2 use 0)."""
    tokenizer_legacy: bool = True
    """LLaMA-family SentencePiece tokenizers only: true (the paper's JAX code, Tulu 2) puts the
    dummy-prefix '▁' after every special token ('<s><|user|>' -> [1, 529]); false is
    transformers 5's non-legacy rule ([1, 29966]), for models trained that way."""
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
    """Also save parameters, optimizer state and data position for exact resume (EasyLM's
    --checkpointer.save_optimizer_state; costs 3x the model's fp32 size per checkpoint)."""
    save_every_minutes: float = 0.0
    """Save the training state alone (each host its own shards, no gather) to
    training-state-latest at most this many minutes apart, bounding the work a crash loses
    (0: never). A preemption always saves it."""
    resume_from: str | None = None
    """Resume from this checkpoint's training_state; 'auto': the complete checkpoint with the
    highest step in output_dir, of any kind (start fresh, with a warning, when it has none)."""
    logger: LoggingConfig = field(default_factory=LoggingConfig)
    """wandb, progress bar and metrics.jsonl."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console log level of process 0 on the command line (other processes: WARNING)."""
    overwrite_output_dir: bool = False
    """Replace what output_dir holds even when it is another run's (a different trainer or
    config); without it such a run is refused before anything is written."""
    remote_timeout_s: float = 20.0
    """Start-up probe of every remote URL in the config (gs://...): fail within this many
    seconds, naming the URL, when the network or credentials are missing."""

    def validate(self) -> None:
        own = {f.name: f.default for f in fields(self)}["trainer"]
        if self.trainer != own:
            raise ValueError(
                f"trainer: this file is a {self.trainer!r} config, this command trains {own!r} "
                f"(run python -m torchxla_rlhf.{self.trainer} --config ...)")
        if not self.output_dir:
            raise ValueError("output_dir: must be set")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps: must be >= 1, got {self.total_steps}")
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs: must be > 0, got {self.num_epochs}")
        if self.save_model_freq < 0 or self.save_milestone_freq < 0:
            raise ValueError("save_model_freq/save_milestone_freq: must be >= 0")
        if self.save_every_minutes < 0:
            raise ValueError(f"save_every_minutes: must be >= 0, got {self.save_every_minutes}")
        if self.remote_timeout_s <= 0:
            raise ValueError(f"remote_timeout_s: must be > 0, got {self.remote_timeout_s}")

    # What the run puts on the mesh, for the pre-flight and the memory plan (each trainer's
    # config class says it; see trainers/registry.py).

    def model_roles(self) -> list:
        """The models the trainer puts on the mesh (:class:`~torchxla_rlhf.roles.ModelRole`)."""
        raise NotImplementedError

    def batches(self) -> list:
        """The rows it uploads per step and how they split (:class:`~torchxla_rlhf.roles.Batch`)."""
        raise NotImplementedError

    def memory_terms(self, shapes, mesh, hbm_bytes, notes, *, gradients, compiler):
        """The trainer's per-device memory plan (:class:`memory_plan.Plan`) from the models'
        shapes on ``mesh``: what :func:`memory_plan.plan` is handed by the config."""
        raise NotImplementedError

    def sequence_length(self) -> tuple[str, int]:
        """``(keys, tokens)``: the longest sequence a model sees."""
        raise NotImplementedError


@dataclass
class PairRunConfig(RunConfig):
    """Keys of the trainers that learn from preference pairs (DPO, reward model)."""

    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Preference pairs (chosen/rejected message lists, optional numeric margin)."""
    eval_dataset: DataSource | None = None
    """Held-out preference pairs (optional): reward accuracy for DPO, accuracy for the RM.
    Evaluated in order, in ``train_dataset.batch_size`` batches (no batch size or shuffling
    of its own)."""
    eval_freq: int = 0
    """Evaluate every N updates and at the end (0: only at start and end, if eval_dataset)."""

    def validate(self) -> None:
        super().validate()
        if self.eval_freq < 0:
            raise ValueError("eval_freq: must be >= 0")

    def batches(self) -> list:
        """Rows uploaded per micro-batch (held-out pairs come in batches of the same size)."""
        return [Batch("train_dataset.batch_size x 2 (chosen + rejected rows)",
                      "train_dataset.batch_size", 2 * self.train_dataset.batch_size)]

    def memory_terms(self, shapes, mesh, hbm_bytes, notes, *, gradients, compiler):
        return memory_plan.plan_pairs(self, shapes, mesh, hbm_bytes, notes,
                                      gradients=gradients, compiler=compiler)

    def sequence_length(self) -> tuple[str, int]:
        """The longest sequence a model sees, and the keys that set it."""
        lengths = [self.train_dataset.seq_length]
        if self.eval_dataset is not None:
            lengths.append(self.eval_dataset.seq_length)
        return "train_dataset.seq_length", max(lengths)


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


class _RolloutShapes:
    """What a rollout trainer (PPO, GRPO) puts on the mesh per step: ``rollouts_per_prompt``
    completions per prompt, updated in chunks of ``mini_batch_size / accumulate_gradient_steps``
    rows, over sequences of prompt + continuation."""

    def batches(self) -> list:
        """The rollout rows per step, and the rows of each update's chunk."""

        chunk = self.mini_batch_size // self.optimizer.accumulate_gradient_steps
        return [Batch("train_dataset.batch_size x rollouts_per_prompt (rollout rows)",
                      "train_dataset.batch_size", self.train_dataset.batch_size * self.rollouts_per_prompt),
                Batch("mini_batch_size / accumulate_gradient_steps (rows per chunk)",
                      "mini_batch_size", chunk, must_divide=False)]

    def sequence_length(self) -> tuple[str, int]:
        return ("train_dataset.seq_length + max_continuation_len",
                self.train_dataset.seq_length + self.max_continuation_len)


@dataclass
class PPOConfig(_RolloutShapes, RunConfig):
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
        return memory_plan.plan_ppo(self, shapes, mesh, hbm_bytes, notes,
                                    gradients=gradients, compiler=compiler)


def _tiny_vowels(text: str) -> float:
    from torchxla_rlhf.data.synthetic import oracle_score

    return oracle_score(text)


ORACLES = {"tiny_vowels": _tiny_vowels}
"""Named response-scoring functions for ``PPOConfig.oracle`` (a registry: no eval of strings)."""


@dataclass
class RewardsConfig:
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
        from torchxla_rlhf.rewards import parse_verifier_map  # noqa: PLC0415 - no torch inside

        parse_verifier_map(self.verifiers)
        if self.verifier_timeout_s < 1:
            raise ValueError(f"verifier_timeout_s: must be >= 1 (whole seconds), got "
                             f"{self.verifier_timeout_s}")


@dataclass
class GRPOConfig(_RolloutShapes, RunConfig):
    """``python -m torchxla_rlhf.grpo``: critic-free RL (GRPO and its DAPO / Dr. GRPO / GSPO
    variants, or RLOO) on the PPO engine: G rollouts per prompt, advantages from the group,
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
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
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
        return memory_plan.plan_grpo(self, shapes, mesh, hbm_bytes, notes,
                                     gradients=gradients, compiler=compiler)

