"""Per-device memory plan of a run, from its config: each term, the peak, and whether it fits.

    python -m torchxla_rlhf plan --config dpo_13b.yaml --tpu v3-256

Every trainer runs the plan in its pre-flight (``preflight/checks.py``, before loading any
weights) and stops with the table when the run cannot fit. Each trainer's terms are a function
registered with it (``trainers/registry.py``): :func:`plan_pairs`, :func:`plan_ppo`; the terms
below are what they are built from. The figures are what the compiled per-device programs hold,
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

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from torchxla_rlhf.errors import UserError
from torchxla_rlhf.preflight.mesh import Mesh, MeshError, parse_mesh_dim
from torchxla_rlhf.preflight.shapes import BYTES, Shape, frozen_dtype, read_shape

logger = logging.getLogger(__name__)

GIB = 1 << 30


class PlanError(UserError, ValueError):
    """A config the planner cannot size (a mesh or batch that does not fit)."""


class DoesNotFit(UserError, RuntimeError):
    """The run's per-device peak exceeds the device memory; the message is the table."""


# ----------------------------------------------------------------------------------------
# Terms (``Shape``: preflight/shapes.py; ``Mesh``: preflight/mesh.py)
# ----------------------------------------------------------------------------------------


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
    linear = frozen_dtype(model_cfg)
    return Term(f"{name} (frozen)", model_bytes(shape, lm_head, model_cfg.param_dtype, linear) / n,
                f"matmul weights {linear}")


def _frozen_gathered(shape: Shape, mesh: Mesh, lm_head: bool, model_cfg: Any) -> float:
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
    try:
        return parse_mesh_dim(cfg.mesh_dim, n_devices)
    except MeshError as e:
        raise PlanError(str(e)) from None


def _rows(global_rows: int, mesh: Mesh, what: str) -> float:
    if global_rows % mesh.batch:
        raise PlanError(f"{what}: {global_rows} rows do not split over dp*fsdp={mesh.batch}")
    return global_rows / mesh.batch


def read_shapes(cfg: Any) -> dict[str, Shape]:
    """The shape of every model the config's trainer puts on the mesh, by config key."""
    keys = dict.fromkeys(r.key for r in cfg.model_roles())
    return {key: read_shape(getattr(cfg, key), key, cfg.remote_timeout_s) for key in keys}


def plan(cfg: Any, n_devices: int, hbm_bytes: float | None = None,
         shapes: Mapping[str, Shape] | None = None, mesh: Mesh | None = None) -> Plan:
    """The per-device plan of a trainer config on ``n_devices`` devices: the trainer's own
    memory terms (registered with it in ``trainers/registry.py``). ``shapes``: the models'
    shapes by config key (default: read from their config.json); ``mesh``: another mesh than
    the config's ``mesh_dim`` (the start-up checks try them all)."""
    from torchxla_rlhf.trainers import registry

    spec = registry.spec_for(cfg)
    mesh = mesh or _mesh(cfg, n_devices)
    shapes = dict(shapes) if shapes is not None else read_shapes(cfg)
    shape = shapes["model"]
    notes = []
    if heads_per_device(shape, mesh.mp) == shape.heads and mesh.mp > 1:
        notes.append(f"mp={mesh.mp} does not divide heads={shape.heads}/kv_heads="
                     f"{shape.kv_heads}: every device computes all heads' scores")
    return spec.memory(cfg, shapes, mesh, hbm_bytes, notes)


def plan_pairs(cfg: Any, shapes: Mapping[str, Shape], mesh: Mesh, hbm_bytes: float | None,
               notes: list[str]) -> Plan:
    """Memory terms of a trainer on preference pairs (DPO: policy with LM head and its frozen
    reference; reward model: a classifier): one trained model, frozen models held meanwhile."""
    n = mesh.devices
    roles = cfg.model_roles()
    trained = next(r for r in roles if r.trained)
    frozen = [r for r in roles if not r.trained and r.resident]
    shape, model_cfg = shapes[trained.key], getattr(cfg, trained.key)
    lm_head = trained.head == "causal"
    seq = cfg.train_dataset.seq_length
    rows = _rows(2 * cfg.train_dataset.batch_size, mesh, "train_dataset.batch_size (x2: chosen, rejected)")
    persistent = _trained(trained.key, shape, lm_head, model_cfg.param_dtype, n)
    for r in frozen:
        persistent.append(_frozen(r.role, shapes[r.key], r.head == "causal", getattr(cfg, r.key), n))
    train = _train_terms("train", shape, mesh, rows, seq, model_cfg, lm_head)
    gathered = gathered_weights_bytes(shape, mesh, lm_head, model_cfg.param_dtype)
    for r in frozen:
        gathered += _frozen_gathered(shapes[r.key], mesh, r.head == "causal", getattr(cfg, r.key))
    train.append(Term("gathered weights", gathered, "2 layers + embeddings, whole over fsdp"))
    phases = {"train micro-step": train}
    return Plan(cfg.trainer, mesh, hbm_bytes, persistent, phases, notes)


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


def plan_ppo(cfg: Any, shapes: Mapping[str, Shape], mesh: Mesh, hbm_bytes: float | None,
             notes: list[str]) -> Plan:
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


def plan_grpo(cfg: Any, shapes: Mapping[str, Shape], mesh: Mesh, hbm_bytes: float | None,
              notes: list[str]) -> Plan:
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
    persistent = _trained("policy", shape, True, cfg.model.param_dtype, n)
    persistent += [_frozen(r.role, shapes[r.key], r.head == "causal", getattr(cfg, r.key), n)
                   for r in frozen]
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
        _frozen_gathered(shapes[r.key], mesh, r.head == "causal", getattr(cfg, r.key))
        for r in frozen)
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


def check_fits(cfg: Any, n_devices: int, hbm_bytes: float | None,
               shapes: Mapping[str, Shape] | None = None) -> Plan | None:
    """Start-up check: log the plan; raise :class:`DoesNotFit` (message: the table) when the
    peak exceeds ``hbm_bytes``. A config the planner cannot size is logged and not checked."""
    try:
        p = plan(cfg, n_devices, hbm_bytes, shapes)
    except PlanError as e:
        logger.warning("memory plan skipped: %s", e)
        return None
    if p.fits is False:
        raise_does_not_fit(p)
    logger.info("%s", format_plan(p))
    return p


def raise_does_not_fit(p: Plan) -> None:
    raise DoesNotFit(
        f"{format_plan(p)}\nThe run cannot fit in device memory: lower the batch, turn on "
        "model.gradient_checkpointing, use more devices, or a mesh whose mp divides the heads."
    )
