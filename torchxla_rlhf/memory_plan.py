"""Per-device memory plan of a run, from its config: each term, the peak, and whether it fits.

    python -m torchxla_rlhf plan --config configs/dpo_13b.yaml --devices 256 --hbm-gib 16

Every trainer calls :func:`check_fits` at start-up (before loading any weights) and stops with
the table when the run cannot fit. The figures are what the compiled per-device programs hold,
counted the way XLA lays them out (checked against XLA:CPU's buffer assignment on scaled-down
proxies by ``bench/memory.py``):

- Persistent state, split over all devices (every large weight is sharded over ``fsdp`` and
  ``mp``): trained parameters, their gradients and both AdamW moments (``param_dtype``), frozen
  models (matmul weights in ``frozen_dtype``), PPO's rollout buffers.
- Transient per phase, the largest phase counts: activations of a training forward kept for
  backward (with checkpointing: one ``[rows, S, H]`` layer input per layer plus one layer's
  recompute), the attention scores (``heads / mp`` heads per device when ``mp`` divides the heads
  (attention.py); every head when it does not, since GSPMD then cannot split them), the logits,
  the KV cache of a rollout and its prefill.

Rows per device are a micro-batch's rows over ``dp * fsdp``. The residual stream and the
per-layer checkpoints are whole on each device of an ``mp`` group (what the optimized HLO of
the proxies holds); what the column-parallel matmuls produce is split over ``mp``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from torchxla_rlhf.errors import UserError

logger = logging.getLogger(__name__)

GIB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(UserError, ValueError):
    """A config the planner cannot size (unknown model shape, mesh that does not fit)."""


class DoesNotFit(UserError, RuntimeError):
    """The run's per-device peak exceeds the device memory; the message is the table."""


# ----------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a Llama: sizes of its matrices."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_linear(self) -> int:
        """Matmul weights of one decoder layer (q, k, v, o, gate, up, down)."""
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * self.hidden + 2 * kv) + 3 * self.hidden * self.intermediate

    def linear_params(self, lm_head: bool) -> int:
        """Matmul weights: layers plus the LM head (or the 1-row score head)."""
        return self.layers * self.layer_linear + (self.vocab if lm_head else 1) * self.hidden

    def other_params(self) -> int:
        """Embeddings and norms."""
        return self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden


LLAMA2 = {
    "7b": Shape(32000, 4096, 11008, 32, 32, 32),
    "13b": Shape(32000, 5120, 13824, 40, 40, 40),
    "70b": Shape(32000, 8192, 28672, 80, 64, 8),
}
"""Llama-2 shapes, used for hub names that say their size (``allenai/tulu-2-13b``) so that
planning needs no network."""


def shape_of(model_cfg: Any) -> Shape:
    """The shape of ``ModelConfig`` ``model_cfg``: ``tiny``, a local directory's config.json, a
    hub name ending in its Llama-2 size, or (last) the hub's config.json."""
    if model_cfg.name_or_path == "tiny":
        t = model_cfg.tiny
        return Shape(t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                     t.num_attention_heads, t.num_key_value_heads)
    path = os.path.join(model_cfg.name_or_path, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return _shape_from_dict(json.load(f))
    size = re.search(r"(?<![\d.])(7|13|70)b\b", model_cfg.name_or_path.lower())
    if size:
        return LLAMA2[size.group(1) + "b"]
    try:
        import transformers

        return _shape_from_dict(
            transformers.AutoConfig.from_pretrained(model_cfg.name_or_path).to_dict()
        )
    except Exception as e:  # noqa: BLE001 - any failure means: cannot size this model
        raise PlanError(
            f"model {model_cfg.name_or_path!r}: cannot read its config.json ({e}); give a local "
            "directory or a name ending in 7b/13b/70b"
        ) from None


def _shape_from_dict(c: dict) -> Shape:
    heads = c["num_attention_heads"]
    return Shape(c["vocab_size"], c["hidden_size"], c["intermediate_size"],
                 c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads)


# ----------------------------------------------------------------------------------------
# Terms
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mesh:
    dp: int
    fsdp: int
    mp: int

    @property
    def devices(self) -> int:
        return self.dp * self.fsdp * self.mp

    @property
    def batch(self) -> int:
        return self.dp * self.fsdp


def heads_per_device(shape: Shape, mp: int) -> int:
    """Heads whose scores one device computes: ``heads / mp`` when ``mp`` divides both head
    counts (einsum attention keeps them split), else all of them."""
    if shape.heads % mp == 0 and shape.kv_heads % mp == 0:
        return shape.heads // mp
    return shape.heads


def model_bytes(shape: Shape, lm_head: bool, dtype: str, linear_dtype: str | None = None) -> float:
    """Bytes of one model's weights per device of an ``n``-device mesh, times ``n``."""
    linear = shape.linear_params(lm_head) * BYTES[linear_dtype or dtype]
    return linear + shape.other_params() * BYTES[dtype]


def layer_working_bytes(shape: Shape, mesh: Mesh, rows: float, q: int, c: int, r: int) -> float:
    """One decoder layer's tensors (scores apart) for ``rows`` rows of ``q`` tokens, per device:
    what a training forward keeps for backward (and a checkpointed layer recomputes).
    ``c``: compute dtype bytes, ``r``: residual (param) dtype bytes.

    Counted per token. Whole on every device of an ``mp`` group (the optimized HLO holds them
    as full-hidden ``[rows * S, H]`` buffers: the row-parallel o/down projections all-reduce
    over ``mp``): the residual stream, its norms and the residual sums (``3 H`` in ``r``) and
    the o/down projections' outputs (``2 H`` in ``c``). Split over ``mp``: the normed inputs
    as the column-parallel matmuls read them, q/k/v, rotated q/k and the attention output
    (``4 H + 3 kv`` in ``c``), the MLP's gate, up, activation and product (``4 I`` in ``c``).
    """
    kv = shape.kv_heads * shape.head_dim
    h, i = shape.hidden, shape.intermediate
    return rows * q * (3 * h * r + 2 * h * c + (4 * h + 3 * kv + 4 * i) * c / mesh.mp)


def scores_bytes(shape: Shape, mesh: Mesh, rows: float, q: int, k: int, c: int) -> float:
    """One layer's attention scores per device: fp32 scores, fp32 softmax and the
    probabilities in ``c``, for the heads a device holds."""
    return rows * heads_per_device(shape, mesh.mp) * q * k * (4 + 4 + c)


def activation_bytes(shape: Shape, mesh: Mesh, rows: float, seq: int, c: int, r: int,
                     checkpointing: bool) -> float:
    """What a training forward keeps for backward (scores apart), per device, at the peak of
    backward: with checkpointing one ``[rows, S, H]`` layer input per layer plus one layer
    recomputed with its gradients; without, every layer's tensors plus one layer's gradients.
    The saved layer inputs are whole over ``mp`` (the residual stream is)."""
    layer = layer_working_bytes(shape, mesh, rows, seq, c, r)
    if checkpointing:
        return shape.layers * rows * seq * shape.hidden * r + 2 * layer
    return (shape.layers + 1) * layer


def score_layers(shape: Shape, checkpointing: bool) -> int:
    """How many layers' scores are alive at the peak: the one recomputed layer with
    checkpointing (its backward reuses those buffers: the 1-layer probe of bench/memory.py
    holds one layer's scores, not two); every layer plus one gradient without."""
    return 1 if checkpointing else shape.layers + 1


def logits_bytes(shape: Shape, mesh: Mesh, rows: float, seq: int, c: int, backward: bool) -> float:
    """LM-head logits (vocab over ``mp``): the ``c`` logits plus fp32 copies (upcast,
    log-softmax; in training also its exponent, the gradient and a frozen reference's logits:
    five ``[rows, S, V/mp]`` fp32 buffers are alive at the DPO proxy's peak)."""
    return rows * seq * shape.vocab / mesh.mp * (c + (16 if backward else 8))


def gathered_weights_bytes(shape: Shape, mesh: Mesh, lm_head: bool, dtype: str,
                           linear_dtype: str | None = None) -> float:
    """Weights a device holds whole over ``fsdp`` while a model runs: FSDP all-gathers each
    matrix before its matmul; XLA keeps about two layers' worth in flight, plus the
    embedding and the LM head (each split over ``mp`` only)."""
    layers = min(shape.layers, 2) * shape.layer_linear * BYTES[linear_dtype or dtype]
    vocab = shape.vocab * shape.hidden * (BYTES[dtype] + (BYTES[linear_dtype or dtype] if lm_head else 0))
    return (layers + vocab) / mesh.mp


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    trainer: str
    mesh: Mesh
    hbm_bytes: float | None
    persistent: list[Term]
    phases: dict[str, list[Term]]
    notes: list[str] = field(default_factory=list)

    def phase_total(self, phase: str) -> float:
        return sum(t.bytes for t in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> float:
        return sum(t.bytes for t in self.persistent) + self.phase_total(self.peak_phase)

    @property
    def dominant(self) -> Term:
        return max(self.persistent + self.phases[self.peak_phase], key=lambda t: t.bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.peak <= self.hbm_bytes


def _trained(name: str, shape: Shape, lm_head: bool, param_dtype: str, n: int) -> list[Term]:
    """Parameters, gradients and the two AdamW moments of a trained model, per device."""
    p = model_bytes(shape, lm_head, param_dtype) / n
    return [Term(f"{name} parameters", p, param_dtype), Term(f"{name} gradients", p, param_dtype),
            Term(f"{name} AdamW moments", 2 * p, f"2 x {param_dtype}")]


def _frozen(name: str, shape: Shape, lm_head: bool, model_cfg: Any, n: int) -> Term:
    from torchxla_rlhf.models import frozen_dtype

    linear = frozen_dtype(model_cfg)
    return Term(f"{name} (frozen)", model_bytes(shape, lm_head, model_cfg.param_dtype, linear) / n,
                f"matmul weights {linear}")


def _frozen_gathered(shape: Shape, mesh: Mesh, lm_head: bool, model_cfg: Any) -> float:
    from torchxla_rlhf.models import frozen_dtype

    return gathered_weights_bytes(shape, mesh, lm_head, model_cfg.param_dtype, frozen_dtype(model_cfg))


def _train_terms(prefix: str, shape: Shape, mesh: Mesh, rows: float, seq: int, model_cfg: Any,
                 lm_head: bool, logit_positions: int | None = None) -> list[Term]:
    """A training forward + backward's transient terms (activations, scores, logits at
    ``logit_positions`` positions a row, default every position)."""
    c, r = BYTES[model_cfg.compute_dtype], BYTES[model_cfg.param_dtype]
    ckpt = model_cfg.gradient_checkpointing
    other = activation_bytes(shape, mesh, rows, seq, c, r, not ckpt)
    scores = scores_bytes(shape, mesh, rows, seq, seq, c)
    terms = [
        Term(f"{prefix} activations", activation_bytes(shape, mesh, rows, seq, c, r, ckpt),
             f"{rows:g} rows x {seq}, checkpointing {'on' if ckpt else 'off'} "
             f"({'off' if ckpt else 'on'}: {_gib(other)})"),
        Term(f"{prefix} attention scores", score_layers(shape, ckpt) * scores,
             f"{heads_per_device(shape, mesh.mp)} heads/device, {_gib(scores)} a layer "
             f"(checkpointing {'off' if ckpt else 'on'}: "
             f"{_gib(score_layers(shape, not ckpt) * scores)})"),
    ]
    if lm_head:
        positions = logit_positions or seq
        terms.append(Term(f"{prefix} logits", logits_bytes(shape, mesh, rows, positions, c, True),
                          f"{positions} positions, vocab/{mesh.mp}"))
    return terms


def _mesh(cfg: Any, n_devices: int) -> Mesh:
    from torchxla_rlhf.runtime import MeshError, parse_mesh_dim

    try:
        return Mesh(*parse_mesh_dim(cfg.mesh_dim, n_devices))
    except MeshError as e:
        raise PlanError(f"mesh_dim: {e}") from None


def _rows(global_rows: int, mesh: Mesh, what: str) -> float:
    if global_rows % mesh.batch:
        raise PlanError(f"{what}: {global_rows} rows do not split over dp*fsdp={mesh.batch}")
    return global_rows / mesh.batch


def plan(cfg: Any, n_devices: int, hbm_bytes: float | None = None) -> Plan:
    """The per-device plan of a DPO, reward, PPO or GRPO config on ``n_devices`` devices."""
    from torchxla_rlhf.configs import DPOConfig, GRPOConfig, PPOConfig, RewardConfig

    mesh = _mesh(cfg, n_devices)
    n = mesh.devices
    shape = shape_of(cfg.model)
    notes = []
    if heads_per_device(shape, mesh.mp) == shape.heads and mesh.mp > 1:
        notes.append(f"mp={mesh.mp} does not divide heads={shape.heads}/kv_heads="
                     f"{shape.kv_heads}: every device computes all heads' scores")
    if isinstance(cfg, PPOConfig):
        return _plan_ppo(cfg, shape, mesh, hbm_bytes, notes)
    if isinstance(cfg, GRPOConfig):
        return _plan_grpo(cfg, shape, mesh, hbm_bytes, notes)
    if not isinstance(cfg, (DPOConfig, RewardConfig)):
        raise PlanError(f"no memory plan for {type(cfg).__name__}")
    is_dpo = isinstance(cfg, DPOConfig)
    seq = cfg.train_dataset.seq_length
    rows = _rows(2 * cfg.train_dataset.batch_size, mesh, "train_dataset.batch_size (x2: chosen, rejected)")
    persistent = _trained("model", shape, is_dpo, cfg.model.param_dtype, n)
    with_reference = is_dpo and cfg.needs_reference and not cfg.precalculate_reference_logps
    if with_reference:
        persistent.append(_frozen("reference", shape, True, cfg.model, n))
    train = _train_terms("train", shape, mesh, rows, seq, cfg.model, is_dpo)
    gathered = gathered_weights_bytes(shape, mesh, is_dpo, cfg.model.param_dtype)
    if with_reference:
        gathered += _frozen_gathered(shape, mesh, True, cfg.model)
    train.append(Term("gathered weights", gathered, "2 layers + embeddings, whole over fsdp"))
    phases = {"train micro-step": train}
    return Plan("dpo" if is_dpo else "reward", mesh, hbm_bytes, persistent, phases, notes)


def _rollout_terms(cfg: Any, shape: Shape, mesh: Mesh) -> list[Term]:
    """The generation phase of PPO and GRPO: the policy's gathered weights, its KV cache and
    the prefill of one rollout piece."""
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    t = pl + cl
    n_roll = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    c = BYTES[cfg.model.compute_dtype]
    micro = _rows(cfg.rollout_micro_batch_size or n_roll, mesh, "rollout_micro_batch_size")
    kv = heads_per_device(shape, mesh.mp) * shape.kv_heads // shape.heads * shape.head_dim
    cache = 2 * shape.layers * micro * t * kv * c
    prefill = (layer_working_bytes(shape, mesh, micro, pl, c, BYTES[cfg.model.param_dtype])
               + scores_bytes(shape, mesh, micro, pl, t, c))
    rollout = [
        Term("gathered weights", gathered_weights_bytes(shape, mesh, True, cfg.model.param_dtype),
             "policy: 2 layers + embeddings, whole over fsdp"),
        Term("KV cache", cache, f"{micro:g} rows x {t} x {shape.layers} layers, {cfg.model.compute_dtype}"),
        Term("prefill (one layer) + logits", prefill + micro * shape.vocab / mesh.mp * (c + 8),
             f"{micro:g} rows x {pl} prompt tokens"),
    ]
    return rollout


def _plan_ppo(cfg: Any, shape: Shape, mesh: Mesh, hbm_bytes: float | None, notes: list[str]) -> Plan:
    n = mesh.devices
    rm_shape = shape_of(cfg.reward_model)
    value_cfg = cfg.value_model or cfg.reward_model
    value_shape = shape_of(value_cfg)
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    t = pl + cl
    n_roll = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    persistent = (
        _trained("policy", shape, True, cfg.model.param_dtype, n)
        + _trained("value", value_shape, False, value_cfg.param_dtype, n)
        + [_frozen("reference", shape, True, cfg.model, n),
           _frozen("reward model", rm_shape, False, cfg.reward_model, n)]
    )
    all_rows = _rows(n_roll, mesh, "rollouts per step")
    # sequences, attention_mask (int64, T), continuation_mask (CL) and, in standard mode, old
    # and reference log-probs, values, rewards, advantages and returns (fp32, CL).
    scored = 6 * cl * 4 if cfg.mode == "standard" else 0
    persistent.append(Term("rollout buffers", all_rows * ((2 * t + cl) * 8 + scored),
                           f"{all_rows:g} rows x {t} tokens"))
    rollout = _rollout_terms(cfg, shape, mesh)
    chunk = _rows(cfg.mini_batch_size // cfg.optimizer.accumulate_gradient_steps, mesh,
                  "mini_batch_size / accumulate_gradient_steps")
    train = (_train_terms("policy", shape, mesh, chunk, t, cfg.model, True, cl)
             + _train_terms("value", value_shape, mesh, chunk, t, value_cfg, False))
    gathered = (gathered_weights_bytes(shape, mesh, True, cfg.model.param_dtype)
                + gathered_weights_bytes(value_shape, mesh, False, value_cfg.param_dtype)
                + _frozen_gathered(shape, mesh, True, cfg.model)
                + _frozen_gathered(rm_shape, mesh, False, cfg.reward_model))
    train.append(Term("gathered weights", gathered, "4 models: 2 layers + embeddings each, whole over fsdp"))
    return Plan("ppo", mesh, hbm_bytes, persistent, {"rollout": rollout, "train micro-step": train},
                notes)


def _plan_grpo(cfg: Any, shape: Shape, mesh: Mesh, hbm_bytes: float | None, notes: list[str]) -> Plan:
    """GRPO / RLOO: G x prompts rollout rows, the policy with AdamW, no value model, the
    frozen reference only with a KL term (beta > 0), a reward model only when configured."""
    n = mesh.devices
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    t = pl + cl
    n_roll = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    persistent = _trained("policy", shape, True, cfg.model.param_dtype, n)
    frozen = []
    if cfg.needs_reference:
        frozen.append(("reference", shape, True, cfg.model))
    else:
        notes.append("beta=0: no reference model is loaded")
    rm_cfg = cfg.rewards.reward_model
    if rm_cfg is not None:
        frozen.append(("reward model", shape_of(rm_cfg), False, rm_cfg))
    persistent += [_frozen(name, s, lm, c, n) for name, s, lm, c in frozen]
    all_rows = _rows(n_roll, mesh, "rollouts per step (batch_size x rollouts_per_prompt)")
    # sequences, attention_mask (int64, T), continuation_mask (CL); old and reference
    # log-probs (fp32, CL) when kept.
    kept = (int(cfg.num_iterations > 1) + int(cfg.needs_reference)) * cl * 4
    persistent.append(Term("rollout buffers", all_rows * ((2 * t + cl) * 8 + kept),
                           f"{all_rows:g} rows x {t} tokens"))
    rollout = _rollout_terms(cfg, shape, mesh)
    chunk = _rows(cfg.mini_batch_size // cfg.optimizer.accumulate_gradient_steps, mesh,
                  "mini_batch_size / accumulate_gradient_steps")
    train = _train_terms("policy", shape, mesh, chunk, t, cfg.model, True, cl)
    gathered = gathered_weights_bytes(shape, mesh, True, cfg.model.param_dtype) + sum(
        _frozen_gathered(s, mesh, lm, c) for _, s, lm, c in frozen)
    train.append(Term("gathered weights", gathered,
                      f"{1 + len(frozen)} model(s): 2 layers + embeddings each, whole over fsdp"))
    return Plan("grpo", mesh, hbm_bytes, persistent, {"rollout": rollout, "train micro-step": train},
                notes)


# ----------------------------------------------------------------------------------------
# Output and the start-up check
# ----------------------------------------------------------------------------------------


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def format_plan(p: Plan) -> str:
    """The plan as a table: every term, each phase's total, the peak and the verdict."""
    m = p.mesh
    lines = [f"memory plan: {p.trainer}, mesh dp={m.dp} fsdp={m.fsdp} mp={m.mp} "
             f"({m.devices} devices), per device"]
    lines += [f"  {t.name:<34} {_gib(t.bytes):>11}  {t.note}" for t in p.persistent]
    for phase, terms in p.phases.items():
        lines.append(f"  -- {phase} (+{_gib(p.phase_total(phase))})")
        lines += [f"    {t.name:<32} {_gib(t.bytes):>11}  {t.note}" for t in terms]
    hbm = "unknown" if p.hbm_bytes is None else _gib(p.hbm_bytes)
    verdict = {None: "fits: unknown device memory", True: "FITS", False: "DOES NOT FIT"}[p.fits]
    lines.append(f"  peak ({p.peak_phase}): {_gib(p.peak)} of {hbm}: {verdict}; "
                 f"dominant term: {p.dominant.name} ({_gib(p.dominant.bytes)})")
    lines += [f"  note: {note}" for note in p.notes]
    return "\n".join(lines)


def check_fits(cfg: Any, n_devices: int, hbm_bytes: float | None) -> Plan | None:
    """Start-up check: log the plan; raise :class:`DoesNotFit` (message: the table) when the
    peak exceeds ``hbm_bytes``. A model the planner cannot size is logged and not checked."""
    try:
        p = plan(cfg, n_devices, hbm_bytes)
    except PlanError as e:
        logger.warning("memory plan skipped: %s", e)
        return None
    table = format_plan(p)
    if p.fits is False:
        raise DoesNotFit(
            f"{table}\nThe run cannot fit in device memory: lower the batch, turn on "
            "model.gradient_checkpointing, use more devices, or a mesh whose mp divides the heads."
        )
    logger.info("%s", table)
    return p
