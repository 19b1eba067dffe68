"""The sections every trainer's config tree shares: models, optimizer, sampling, logging, the
run's common keys (:class:`RunConfig`), and the bases of the preference-pair and rollout
trainers' trees. A docstring per field.

Field names follow EasyLM's flags (the paper's JAX code) where one exists, so the paper's commands carry
over: ``mesh_dim``, ``tokenizer_pad_token_id``, ``train_dataset.seq_length``,
``optimizer.accumulate_gradient_steps``, ``save_model_freq``, ``max_continuation_len``, ...
The README maps every EasyLM flag to its key here. This module imports neither torch nor
model code, so that ``--help`` and config errors answer in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping

from torchxla_rlhf.preflight import memory_plan
from torchxla_rlhf.configs.data import DataSource, DatasetConfig
from torchxla_rlhf.roles import Batch

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
        return plan_pairs(self, shapes, mesh, hbm_bytes, notes,
                                      gradients=gradients, compiler=compiler)

    def sequence_length(self) -> tuple[str, int]:
        """The longest sequence a model sees, and the keys that set it."""
        lengths = [self.train_dataset.seq_length]
        if self.eval_dataset is not None:
            lengths.append(self.eval_dataset.seq_length)
        return "train_dataset.seq_length", max(lengths)


class RolloutShapes:
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


def plan_pairs(cfg: Any, shapes: Mapping[str, memory_plan.Shape], mesh: memory_plan.Mesh,
               hbm_bytes: float | None, notes: list[str], gradients: str = "reduce_scatter",
               compiler: str = "tpu") -> memory_plan.Plan:
    """Memory terms of a trainer on preference pairs (DPO: policy with LM head and its frozen
    reference; reward model: a classifier): one trained model, frozen models held meanwhile."""
    n = mesh.devices
    roles = cfg.model_roles()
    trained = next(r for r in roles if r.trained)
    frozen = [r for r in roles if not r.trained and r.resident]
    shape, model_cfg = shapes[trained.key], getattr(cfg, trained.key)
    lm_head = trained.head == "causal"
    seq = cfg.train_dataset.seq_length
    rows = memory_plan.rows_per_device(2 * cfg.train_dataset.batch_size, mesh,
                                       "train_dataset.batch_size (x2: chosen, rejected)")
    tiled = mesh if compiler == "tpu" else None
    persistent = memory_plan.trained_terms(trained.key, shape, lm_head, model_cfg.param_dtype,
                                           n, tiled)
    for r in frozen:
        persistent.append(memory_plan.frozen_term(r.role, shapes[r.key], r.head == "causal",
                                                  getattr(cfg, r.key), n, tiled))
    passes = [memory_plan.TrainedPass(trained.key, shape, model_cfg, rows, seq, lm_head)]
    if compiler == "tpu":
        phases = {"train micro-step": memory_plan.train_terms_tpu(passes, mesh),
                  "train update": memory_plan.update_terms_tpu(persistent)}
    else:
        phases = {"train micro-step": memory_plan.train_terms(
            passes, mesh, gradients, memory_plan.forward_gathered(cfg, shapes, mesh))}
    return memory_plan.Plan(cfg.trainer, mesh, hbm_bytes, persistent, phases, notes)
