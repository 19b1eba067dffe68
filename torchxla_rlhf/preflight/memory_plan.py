"""Per-device memory plan of a run, from its config: each term, the peak, and whether it fits.

    python -m torchxla_rlhf plan --config dpo_13b.yaml --tpu v3-256

Every trainer runs the plan in its pre-flight (``preflight/checks.py``, before loading any
weights) and stops with the table when the run cannot fit. Each trainer's config hands over its
terms (``memory_terms``), built in the kind's own config module (``configs/sections.py``'s
``plan_pairs`` for DPO and the reward model, ``configs/ppo.py``, ``configs/grpo.py``,
``configs/sft.py``) from the pieces below (:func:`trained_terms`, :func:`frozen_term`,
:func:`rows_per_device`, :class:`TrainedPass`, :func:`train_terms_tpu`, :func:`update_terms_tpu`,
:func:`rollout_plan`...). The figures are what the
compiled per-device programs hold, counted the way XLA lays them out, and checked against
XLA:CPU's buffer assignment on 13B-shaped proxies at 2 to 16 layers, two meshes and two
sequence lengths by ``bench/memory.py`` (``tests/test_memory_depth.py`` repeats two of them):

- Persistent state, split over all devices (every large weight is sharded over ``fsdp`` and
  ``mp``): trained parameters, their gradient shards and both AdamW moments
  (``param_dtype``), frozen models (matmul weights in ``frozen_dtype``), rollout buffers.
- The rollout (PPO, GRPO): the policy's weights whole over ``fsdp`` as
  ``sampling.gather_weights`` says, the KV cache, the prefill's largest layer.
- A training step (forward, backward and AdamW in one graph): one layer's recompute and
  backward and its weights whole over ``fsdp``, plus the largest of the backward's start
  (saved layer inputs, logits), the backward's end (gradients whole over ``fsdp`` where the
  compiler all-reduces them: ``gradients="all_reduce"``, XLA:CPU) and the forwards (weights
  gathered ahead: shallow models only).

Rows per device are a micro-batch's rows over ``dp * fsdp``. Between layers the residual
stream is split over ``mp`` (GSPMD keeps the row-parallel matmuls' output sharded and
all-gathers it before the column-parallel ones), so saved layer inputs are ``H / mp`` wide.
"""

from __future__ import annotations

import functools
import logging
import math
import re
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


def heads_per_device(shape: Shape, mp: int, compiler: str = "xla_cpu") -> int:
    """Heads whose scores one device computes: ``heads / mp`` when ``mp`` divides both head
    counts (einsum attention keeps them split). Else XLA:CPU computes all of them on every
    device, while the TPU compiler splits the heads over the largest factor of ``mp`` that
    divides both counts (13B's 40 heads on mp=16: 5 a device, ``[1,5,4096,4096]`` scores in
    the compiled module)."""
    if shape.heads % mp == 0 and shape.kv_heads % mp == 0:
        return shape.heads // mp
    if compiler == "tpu":
        return shape.heads // math.gcd(shape.heads, shape.kv_heads, mp)
    return shape.heads


def model_bytes(shape: Shape, lm_head: bool, dtype: str, linear_dtype: str | None = None) -> float:
    """Bytes of one model's weights per device of an ``n``-device mesh, times ``n``."""
    linear = shape.linear_params(lm_head) * BYTES[linear_dtype or dtype]
    return linear + shape.other_params() * BYTES[dtype]


def checkpoint_bytes(shape: Shape, mesh: Mesh, rows: float, seq: int, r: int) -> float:
    """One layer's saved input with checkpointing, per device: the residual stream
    ``[rows, S, H]`` in ``r`` (param dtype), split over ``mp`` (the optimized HLO keeps the
    residual stream split over ``mp`` between layers and all-gathers it before the
    column-parallel matmuls)."""
    return rows * seq * shape.hidden * r / mesh.mp


def layer_backward_bytes(shape: Shape, mesh: Mesh, rows: float, seq: int, c: int, r: int) -> float:
    """One decoder layer's recompute and backward, per device (its weights and the saved
    inputs apart): the larger of its two moments, as XLA holds them (measured on the trainer
    proxies and the 1-layer attention probe of bench/memory.py).

    - MLP: per token, seven ``[tokens, I/mp]`` tensors and gradients (gate, up, activation,
      product) in ``c``, nine ``[tokens, H/mp]`` residual-stream, norm and attention tensors in
      ``r``, seven ``[tokens, H]`` in ``c`` (the residual stream all-gathered over ``mp`` for
      the q/k/v and gate/up matmuls and their weight gradients); the fp32 probabilities the
      attention's backward still needs and the fp32 ``[S, S]`` attention mask of each row.
    - The softmax's backward: per score of the heads a device holds, fp32 scores, their
      gradient and the probabilities (8 + ``c`` bytes); per ``[S, S]`` row pair the fp32
      causal mask; two ``[tokens, H]`` in ``c``. (The probe at seq 2048 holds 3.5 fp32
      ``[S, S]`` buffers per head: 2 heads' scores x 3 and the mask.)
    """
    h, i = shape.hidden, shape.intermediate
    tokens = rows * seq
    mlp = (tokens * (7 * i / mesh.mp * c + 7 * h * c + 9 * h / mesh.mp * r)
           + scores_bytes(shape, mesh, rows, seq, seq, 4) + rows * seq * seq * 4)
    softmax = (tokens * 2 * h * c + scores_bytes(shape, mesh, rows, seq, seq, 8 + c)
               + rows * seq * seq * 4)
    return max(mlp, softmax)


def scores_bytes(shape: Shape, mesh: Mesh, rows: float, q: int, k: int,
                 per_score: float = 4, compiler: str = "xla_cpu") -> float:
    """One layer's attention scores per device, for the heads a device holds:
    ``per_score`` bytes each (a training layer's backward: the fp32 scores; an inference
    forward: fp32 scores, fp32 softmax and the probabilities in the compute dtype)."""
    return rows * heads_per_device(shape, mesh.mp, compiler) * q * k * per_score


def logits_bytes(shape: Shape, mesh: Mesh, rows: float, seq: int, c: int, backward: bool) -> float:
    """LM-head logits (vocab over ``mp``): the ``c`` logits plus fp32 copies (upcast,
    log-softmax; in training also its exponent, the gradient and a frozen reference's logits:
    five ``[rows, S, V/mp]`` fp32 buffers in all)."""
    return rows * seq * shape.vocab / mesh.mp * (c + (16 if backward else 8))


def whole_gradient_bytes(shape: Shape, mesh: Mesh, lm_head: bool, dtype: str) -> float:
    """A trained model's gradients whole over ``fsdp`` (split over ``mp`` only): what a
    device holds at the end of the backward when the compiler reduces gradients with an
    all-reduce and slices the shard only in the optimizer (XLA:CPU), instead of a
    reduce-scatter (TPU and GPU compilers turn all-reduce + slice into one)."""
    vocab = shape.vocab * shape.hidden * (1 + int(lm_head))
    return (shape.layers * shape.layer_linear + vocab) * BYTES[dtype] / mesh.mp


def gathered_weights_bytes(shape: Shape, mesh: Mesh, lm_head: bool, dtype: str,
                           linear_dtype: str | None = None) -> float:
    """Weights a device holds whole over ``fsdp`` while a model's forward runs: FSDP
    all-gathers each matrix before its matmul and XLA gathers ahead, about two layers' worth,
    plus the embedding and the LM head (each split over ``mp`` only)."""
    layers = min(shape.layers, 2) * shape.layer_linear * BYTES[linear_dtype or dtype]
    vocab = shape.vocab * shape.hidden * (BYTES[dtype] + (BYTES[linear_dtype or dtype] if lm_head else 0))
    return (layers + vocab) / mesh.mp


def rollout_gathered_weights_bytes(shape: Shape, mesh: Mesh, gather_weights: str,
                                   dtype: str) -> float:
    """The policy's weights a device holds whole over ``fsdp`` during a rollout
    (``sampling.gather_weights``), and the LM head (split over ``mp``; the embedding lookup
    reads its shards and sums over the devices, it gathers no table). ``per_layer``: the
    generation engine makes each layer's gather wait for that layer's input, in the prefill
    and inside the decode loop, so one layer is whole at a time; ``hoisted``: every layer is
    gathered once before the loop and held for the whole rollout."""
    layers = 1 if gather_weights == "per_layer" else shape.layers
    return (layers * shape.layer_linear + shape.vocab * shape.hidden) * BYTES[dtype] / mesh.mp


def prefill_bytes(shape: Shape, mesh: Mesh, rows: float, prompt: int, total: int, c: int,
                  r: int, compiler: str = "xla_cpu") -> float:
    """The prefill's largest working set per device besides weights and the KV cache: an
    inference forward frees each layer's tensors as it goes, and a layer's attention scores
    (against the ``total``-slot cache) before its MLP runs, so the larger of the two (the
    MLP: the residual input in ``r``; gate, up and their product over ``mp`` in ``c``), and
    the last position's logits."""
    mlp = rows * prompt * (shape.hidden * r + 3 * shape.intermediate * c / mesh.mp)
    logits = rows * shape.vocab / mesh.mp * (c + 8)
    return max(mlp, scores_bytes(shape, mesh, rows, prompt, total, 8 + c, compiler)) + logits


# -- the generation layout (sampling.gather_weights: generation_layout) ----------------------


def generation_tp_choices(mesh: Mesh) -> list[int]:
    """Tensor-parallel group sizes of the generation layout: ``mp * f``, ``f`` dividing
    ``fsdp`` (``runtime.generation_tp_choices``, on the planner's torch-free ``Mesh``)."""
    return [mesh.mp * f for f in range(1, mesh.fsdp + 1) if mesh.fsdp % f == 0]


def generation_tp(cfg: Any, mesh: Mesh) -> int:
    """The configured ``sampling.generation_tp``, or ``mp * fsdp`` (one copy per dp replica)."""
    return cfg.sampling.generation_tp or mesh.mp * mesh.fsdp


def generation_copy_bytes(shape: Shape, tp: int, param_dtype: str, compute_dtype: str) -> float:
    """The rollout's copy of the policy per device: matmul weights (layers and LM head) in the
    compute dtype, embedding and norms in the parameter dtype, all split over ``tp``."""
    return model_bytes(shape, True, param_dtype, compute_dtype) / tp


def generation_reshard_bytes(shape: Shape, mesh: Mesh, param_dtype: str, tp: int = 0) -> float:
    """The reshard graph's transient besides its output, in the parameter dtype. With ``tp =
    mp`` (the layout splits ``fsdp`` only): the largest weight on its way from the training
    layout (``fsdp``, ``mp``) to the tensor-parallel one, whole over ``fsdp`` (GSPMD gathers,
    then slices). With ``tp = mp * f``, ``f > 1``, the tp groups cut across the ``mp`` split:
    XLA:TPU holds the embedding and the LM head whole, both at once (libtpu's compile of the
    13B PPO rollout on a v3-128, tp=8: exactly two fp32 ``[vocab, hidden]``)."""
    if tp and tp != mesh.mp:
        return 2 * shape.vocab * shape.hidden * BYTES[param_dtype]
    largest = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate,
                  shape.hidden * shape.heads * shape.head_dim)
    return largest * BYTES[param_dtype] / mesh.mp


def generation_layout_terms(cfg: Any, shape: Shape, mesh: Mesh, micro: float, t: int) -> list[Term]:
    """The rollout's terms under ``generation_layout`` (``micro``: rows per device in the
    training layout, ``t``: prompt + continuation): the copy, the KV cache in the layout (rows
    over ``data``, kv-heads over ``tp`` where they divide), and the larger of the prefill,
    the decode loop's cache copies and the reshard's transient (three graphs, one after the
    other)."""
    tp = generation_tp(cfg, mesh)
    data = mesh.devices // tp
    c = BYTES[cfg.model.compute_dtype]
    rows = micro * mesh.batch / data  # rows per device in the layout
    kv_split = tp if shape.kv_heads % tp == 0 and shape.heads % tp == 0 else 1
    cache = 2 * shape.layers * rows * t * shape.kv_heads / kv_split * shape.head_dim * c
    prefill = prefill_bytes(shape, Mesh(1, data, tp), rows, cfg.train_dataset.seq_length, t, c,
                            BYTES[cfg.model.param_dtype])
    copies = DECODE_CACHE_COPIES * cache
    reshard = generation_reshard_bytes(shape, mesh, cfg.model.param_dtype, tp)
    biggest = max((prefill, "prefill (one layer) + logits"), (copies, "decode loop's cache copies"),
                  (reshard, "reshard (one weight whole over fsdp)"))
    return [
        Term("weights copy (generation layout)",
             generation_copy_bytes(shape, tp, cfg.model.param_dtype, cfg.model.compute_dtype),
             f"policy over tp={tp} (data={data}); matmuls {cfg.model.compute_dtype}"),
        Term("KV cache", cache, f"{rows:g} rows x {t} x {shape.layers} layers, kv-heads over "
             f"{kv_split}, {cfg.model.compute_dtype}"),
        Term(biggest[1], biggest[0], f"prefill {_gib(prefill)}, decode copies {_gib(copies)}, "
             f"reshard {_gib(reshard)}"),
    ]


def per_token_collective_bytes(shape: Shape, mesh: Mesh, gather_weights: str, rows: int,
                               param_dtype: str, compute_dtype: str, tp: int = 0,
                               compiler: str = "xla_cpu") -> dict[str, float]:
    """What one decode step moves per device, from shapes (bytes of the collectives' outputs,
    the measure ``tools/xla_dump.loop_collectives`` reads from compiled HLO), for ``rows``
    rollout rows: ``{"weights": ..., "activations": ...}``.

    ``generation_layout``: two all-reduces of ``[rows / data, hidden]`` per layer, plus the
    embedding's gather of ``[rows / data, hidden]``; no weights. Otherwise the training
    layout's two all-reduces of ``[rows / (dp * fsdp), hidden]`` per layer over ``mp``, plus:

    - ``compiler="xla_cpu"`` (how the XLA:CPU proxies are read): ``per_layer`` all-gathers
      every matmul weight and the LM head over ``fsdp`` (split over ``mp``) in the parameter
      dtype, counted as written (XLA:CPU gathers only the column-parallel ones and moves
      activations for o/down); ``hoisted`` gathers before the loop, so nothing per token.
    - ``compiler="tpu"`` (libtpu's 13B compiles, docs/tpu-compiler.md): both ``per_layer``
      and ``hoisted`` (XLA:TPU does not hoist the gathers out of the ``While``) all-gather the
      column-parallel weights (q, k, v, gate, up) and the LM head in the compute dtype every
      token, and move activations for o and down."""
    c, p = BYTES[compute_dtype], BYTES[param_dtype]
    if gather_weights == "generation_layout":
        tp = tp or mesh.mp * mesh.fsdp
        rows_dev = rows / (mesh.devices // tp)
        return {"weights": 0.0,
                "activations": (2 * shape.layers * c + p) * rows_dev * shape.hidden}
    if compiler not in COMPILERS:
        raise ValueError(f"compiler={compiler!r}: expected one of {COMPILERS}")
    rows_dev = rows / mesh.batch
    act = 2 * shape.layers * rows_dev * shape.hidden * c if mesh.mp > 1 else 0.0
    weights = 0.0
    if mesh.fsdp > 1 and compiler == "tpu":
        column = shape.hidden * (shape.heads + 2 * shape.kv_heads) * shape.head_dim \
            + 2 * shape.hidden * shape.intermediate
        weights = (shape.layers * column + shape.vocab * shape.hidden) * c / mesh.mp
    elif mesh.fsdp > 1 and gather_weights in ("per_layer", "auto"):
        weights = (shape.layers * shape.layer_linear + shape.vocab * shape.hidden) * p / mesh.mp
    return {"weights": weights, "activations": act}


def resolve_sampling(cfg: Any, n_devices: int, hbm_bytes: float | None,
                     shapes: Mapping[str, Shape] | None = None, mesh: Mesh | None = None,
                     compiler: str = "tpu") -> Any:
    """``sampling`` with ``gather_weights: auto`` resolved (anything else is returned as is):
    ``generation_layout`` with the smallest ``generation_tp`` (preferring one that divides the
    heads, so the KV cache and attention split over tp) whose plan fits ``hbm_bytes``, else
    ``per_layer``. With the device memory unknown (XLA:CPU) nothing is known to fit:
    ``per_layer``."""
    import dataclasses

    s = cfg.sampling
    if s.gather_weights != "auto":
        return s
    if hbm_bytes is None or cfg.trainer not in ("ppo", "grpo"):
        return dataclasses.replace(s, gather_weights="per_layer")
    mesh = mesh or _mesh(cfg, n_devices)
    shapes = dict(shapes) if shapes is not None else read_shapes(cfg)
    shape = shapes["model"]
    choices = [s.generation_tp] if s.generation_tp else generation_tp_choices(mesh)
    even = [t for t in choices if shape.heads % t == 0 and shape.kv_heads % t == 0]
    for tp in even + [t for t in choices if t not in even]:
        trial = dataclasses.replace(s, gather_weights="generation_layout", generation_tp=tp)
        p = plan(dataclasses.replace(cfg, sampling=trial), n_devices, hbm_bytes, shapes, mesh,
                 compiler=compiler)
        if p.fits:
            return trial
    return dataclasses.replace(s, gather_weights="per_layer")


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


def trained_terms(name: str, shape: Shape, lm_head: bool, param_dtype: str, n: int,
             tpu_mesh: Mesh | None = None) -> list[Term]:
    """Parameters, gradients and the two AdamW moments of a trained model, per device
    (``tpu_mesh``: each shard as XLA:TPU lays it out on that mesh, :func:`tpu_model_bytes`)."""
    if tpu_mesh is None:
        p = model_bytes(shape, lm_head, param_dtype) / n
    else:
        p = tpu_model_bytes(shape, tpu_mesh, "causal" if lm_head else "classifier", param_dtype)
    return [Term(f"{name} parameters", p, param_dtype), Term(f"{name} gradients", p, param_dtype),
            Term(f"{name} AdamW moments", 2 * p, f"2 x {param_dtype}")]


def frozen_term(name: str, shape: Shape, lm_head: bool, model_cfg: Any, n: int,
            tpu_mesh: Mesh | None = None) -> Term:
    linear = frozen_dtype(model_cfg)
    if tpu_mesh is None:
        b = model_bytes(shape, lm_head, model_cfg.param_dtype, linear) / n
    else:
        b = tpu_model_bytes(shape, tpu_mesh, "causal" if lm_head else "classifier",
                            model_cfg.param_dtype, linear)
    return Term(f"{name} (frozen)", b, f"matmul weights {linear}")


TPU_TILE = (8, 128)
"""XLA:TPU's HBM layout of an array: its two minor dimensions in tiles of 8 x 128 32-bit words
(16 x 128 for a 16-bit dtype, two elements a word), each dimension padded up to a whole
tile; a 1-D array in runs of 1024. The compiled 13B modules (``plan --compile``) lay out the
parameter shards so (``f32[1280,80]{0,1:T(8,128)}``: the 1280 minor), and the update graphs'
argument bytes per layer are the padded shards': on mesh 1,16,16 a q/k/v/o shard is
``[320, 320]``, 384 x 320 once padded, and the MLP's ``[864, 320]`` is 896 x 320: 9 % over the
unpadded weights per device (measured 9.7 % with the replicated norms); on 1,64,4 (shards
``[1280, 80]``, ``[3456, 80]``) nothing pads."""


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def tpu_shard_elements(dims: tuple[int, ...], itemsize: int) -> int:
    """Elements one device stores for a shard of ``dims`` on XLA:TPU (:data:`TPU_TILE`): the
    two minor dimensions padded to the tile, the compiler taking as minor the one that pads
    less (the layout it chose for every 13B parameter shard)."""
    if not dims:
        return 1
    if len(dims) == 1:
        return _round_up(dims[0], 1024)
    *major, a, b = dims
    sub, lane = TPU_TILE[0] * max(1, 4 // itemsize), TPU_TILE[1]
    tiled = min(_round_up(a, sub) * _round_up(b, lane), _round_up(b, sub) * _round_up(a, lane))
    return math.prod(major) * tiled


TPU_SPLITS = (
    (re.compile(r"embed_tokens\.weight$"), ("fsdp", "mp")),
    (re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$|^lm_head\.weight$"), ("mp", "fsdp")),
    (re.compile(r"(o_proj|down_proj)\.weight$"), ("fsdp", "mp")),
)
"""How ``sharding.py``'s partition rules split each matrix over the mesh axes (its Llama rules;
norms and the score head replicated), restated here because the planner sits below it and
imports no torch-side module; ``tests/test_memory_plan.py`` checks the two agree."""


def tpu_split(name: str) -> tuple:
    """The mesh axes each dimension of parameter ``name`` is split over (:data:`TPU_SPLITS`;
    ``(None, ...)``: replicated)."""
    return next((spec for regex, spec in TPU_SPLITS if regex.search(name)), None)


@functools.lru_cache(maxsize=256)
def tpu_model_bytes(shape: Shape, mesh: Mesh, head: str, dtype: str,
                    linear_dtype: str | None = None) -> float:
    """One model's weights per device on XLA:TPU: every parameter's shard (:func:`tpu_split`),
    padded to :data:`TPU_TILE`; matmul weights in ``linear_dtype``, the rest in ``dtype``."""
    sizes = mesh.sizes
    total = 0.0
    for name, dims in shape.params(head):
        spec = tpu_split(name) or (None,) * len(dims)
        shard = tuple(-(-d // (sizes[axis] if axis else 1)) for d, axis in zip(dims, spec))
        b = BYTES[linear_dtype or dtype] if _LINEAR.search(name) else BYTES[dtype]
        total += tpu_shard_elements(shard, b) * b
    return total


_LINEAR = re.compile(r"(_proj|lm_head|score)\.weight$")
"""The matmul weights (``model_bytes``'s linear parameters: a frozen copy stores them in its
matmul dtype)."""


GRADIENT_REDUCTIONS = ("reduce_scatter", "all_reduce")
"""How the compiled step reduces FSDP gradients over ``fsdp``: ``reduce_scatter`` (TPU and
GPU compilers: each device receives its shard) or ``all_reduce`` (XLA:CPU: every gradient is
whole over ``fsdp`` until the optimizer slices it)."""

INTERLEAVED = 0.5
"""Share of a second trained model's layer working set at the backward's peak. PPO's policy
and value model run their backwards in one graph and XLA interleaves them: on the PPO proxies
(bench/memory.py) the peak holds one layer of the first and about half a layer of the other."""


DECODE_CACHE_COPIES = 0.5
"""Share of the KV cache the decode loop's module holds a second time: XLA copies the carried
cache into the ``While``'s state and back (copy insertion for a carry that may alias its
input), and at the module's peak the 8- and 16-layer PPO proxies hold 0.5 and 0.44 of the
cache in those copies (bench/memory.py)."""


@dataclass
class TrainedPass:
    """One trained model's forward + backward in a training step."""

    prefix: str
    shape: Shape
    model_cfg: Any
    rows: float
    """Rows per device."""
    seq: int
    lm_head: bool
    logit_positions: int | None = None
    """Positions a row whose logits are taken (default: every position)."""


def train_terms(passes: list[TrainedPass], mesh: Mesh, gradients: str,
                 forward_gathered: float) -> list[Term]:
    """The transient terms of a training step (forward, backward, optimizer in one graph).

    Per layer of the backward, a device holds that layer's recompute and gradients and its
    weights whole over fsdp. Walking the backward from the last layer to the first, the saved
    layer inputs of the layers still to go shrink while the finished gradients grow, so the
    backward's peak is at one of its two ends; the step's peak is the larger of those and the
    forwards (``forward_gathered``: the weights every model's forward holds whole over fsdp,
    frozen models included: it is the peak of shallow models only):

    - start: every saved layer input (checkpointing; without it, every layer's tensors) and
      the logits and their gradient, as far as they exceed one layer's working set (the
      logits' backward ends before the last layer's recompute starts);
    - end: every gradient whole over fsdp, when gradients are all-reduced (``all_reduce``);
      with a reduce-scatter they are shards, counted with the persistent state.
    """
    terms, layer_total, saved, logits, whole = [], 0.0, 0.0, 0.0, 0.0
    for k, t in enumerate(passes):
        share = 1.0 if k == 0 else INTERLEAVED
        c, r = BYTES[t.model_cfg.compute_dtype], BYTES[t.model_cfg.param_dtype]
        layer = layer_backward_bytes(t.shape, mesh, t.rows, t.seq, c, r)
        layer_total += share * layer
        terms += [
            Term(f"{t.prefix} layer recompute + backward", share * layer,
                 f"{t.rows:g} rows x {t.seq}, {heads_per_device(t.shape, mesh.mp)} heads/device"
                 + ("" if k == 0 else f"; {share:g} of a layer (interleaved)")),
            Term(f"{t.prefix} gathered weights", share * t.shape.layer_linear
                 * BYTES[t.model_cfg.param_dtype] / mesh.mp, "one layer, whole over fsdp"),
        ]
        if t.model_cfg.gradient_checkpointing:
            saved += t.shape.layers * checkpoint_bytes(t.shape, mesh, t.rows, t.seq, r)
        else:
            saved += t.shape.layers * layer
        if t.lm_head:
            logits += logits_bytes(t.shape, mesh, t.rows, t.logit_positions or t.seq, c, True)
        if gradients == "all_reduce":
            whole += (whole_gradient_bytes(t.shape, mesh, t.lm_head, t.model_cfg.param_dtype)
                      - model_bytes(t.shape, t.lm_head, t.model_cfg.param_dtype) / mesh.devices)
    start = saved + max(0.0, logits - layer_total)
    forward = forward_gathered - sum(t.bytes for t in terms)
    ckpt = all(t.model_cfg.gradient_checkpointing for t in passes)
    note = (f"start: {'saved layer inputs' if ckpt else 'every layer kept'} {_gib(saved)} + logits "
            f"{_gib(logits)} beyond a layer; end: gradients whole over fsdp {_gib(whole)} "
            f"({gradients.replace('_', '-')}); forwards: weights whole over fsdp "
            f"{_gib(forward_gathered)}")
    moments = {"backward start": start, "backward end": whole, "forwards (gathered weights)": forward}
    name = max(moments, key=moments.get)
    terms.append(Term(f"peak moment: {name}", max(0.0, moments[name]), note))
    return terms


TPU_MLP_TENSORS = (2, 6.5)
"""XLA:TPU's moment in a layer's MLP backward: ``[tokens, H]`` and ``[tokens, I / mp]``
tensors in the compute dtype alive together (fitted on libtpu compiles of the DPO proxy at
hidden 256 on meshes 1,4,2 and 1,2,4, where the MLP is the larger moment; XLA:TPU fuses most
of what XLA:CPU keeps: seven ``[tokens, H]`` there)."""

TPU_SCORE_BYTES = (4, 1.5)
"""Bytes per attention score of the heads a device holds at the softmax's backward on XLA:TPU:
``4 + 1.5 * c`` (fp32 scores, and compute-dtype probabilities and gradients partly fused);
the causal mask is fused, never held. Fitted on two compiles that the scores dominate: the
DPO proxy at 2048 tokens in fp32 (2.6 ``[2048, 2048]`` fp32 buffers a row) and 13B's DPO
micro-step in bf16 on a v3-256 (1.9 fp32 ``[5, 4096, 4096]`` buffers a device)."""

# No term for the frozen models a training step runs (a reference, a reward model): at the
# model's depth XLA:TPU holds nothing per layer of their forwards beside the trained model's
# backward. libtpu's 13B micro-steps compiled at 40 layers (bench/tpu_compile.py --deeper):
# DPO on 1,16,8 and PPO on 1,64,4 and 1,32,4 hold 2.10, 2.06 and 4.14 GiB, within 4 % of these
# terms without one. At 2 to 8 layers they do hold a part of it (0.3 GiB more for PPO at 4 and
# 8 layers), which is what a line through 2 and 4 layers took to 40 (1.6 to 2.3 times too much).


def _largest_matrix(shape: Shape) -> int:
    """Elements of the largest weight of a decoder layer (XLA:TPU gathers one at a time)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return max(shape.hidden * shape.intermediate, shape.hidden * q, shape.hidden * kv)


def train_terms_tpu(passes: list[TrainedPass], mesh: Mesh) -> list[Term]:
    """A training micro-step's transient terms as XLA:TPU holds them (libtpu's compile-only
    client, ``plan --compile``): one layer's recompute and backward (the larger of its MLP and
    its softmax moments, :data:`TPU_MLP_TENSORS`, :data:`TPU_SCORE_BYTES`; a second trained
    model's backward does not overlap it) and each trained model's largest weight whole over
    fsdp in the compute dtype (XLA:TPU gathers one matrix at a time, after the cast), plus the
    larger of the backward's two ends:

    - its start: per layer of each trained model its checkpointed input (every layer's
      tensors without checkpointing), and the LM head's logits where they exceed the layer
      (the frozen models' forwards add nothing at the model's depth: see the note above);
    - its end: each trained model's embedding gradient whole over fsdp (the embedding's
      backward scatters the device's tokens' gradients into a whole ``[vocab, H / mp]`` buffer
      in the parameter dtype, reduce-scattered over fsdp afterwards), beside the first layer's
      backward. It is the larger at few layers: GRPO's micro-step on 1,64,4 holds 0.38, 0.40
      and 0.46 GiB at 2, 4 and 8 layers, its ``[32000, 1280]`` fp32 embedding gradient
      (0.15 GiB) beside the first layer's backward at 2 and 4."""
    terms, start, layer_total, logits, embeddings = [], [], 0.0, 0.0, 0.0
    for k, t in enumerate(passes):
        c, r = BYTES[t.model_cfg.compute_dtype], BYTES[t.model_cfg.param_dtype]
        shape, tokens = t.shape, t.rows * t.seq
        heads = heads_per_device(shape, mesh.mp, "tpu")
        scores = t.rows * heads * t.seq * t.seq
        mlp = tokens * c * (TPU_MLP_TENSORS[0] * shape.hidden
                            + TPU_MLP_TENSORS[1] * shape.intermediate / mesh.mp)
        softmax = scores * (TPU_SCORE_BYTES[0] + TPU_SCORE_BYTES[1] * c) + tokens * 2 * shape.hidden * c
        layer = max(mlp, softmax)
        # Per layer, XLA:TPU keeps one row's worth whatever the rows per device (the 13B PPO
        # micro-step grows 0.13 GiB a layer with 1 and with 2 rows a device).
        saved = (checkpoint_bytes(shape, mesh, t.rows, t.seq, r)
                 if t.model_cfg.gradient_checkpointing else layer)
        if k == 0:
            layer_total = layer
            terms.append(Term(f"{t.prefix} layer recompute + backward", layer,
                              f"{t.rows:g} rows x {t.seq}, {heads} heads/device; "
                              f"{'softmax' if softmax >= mlp else 'MLP'} moment"))
        terms.append(Term(f"{t.prefix} gathered weight", _largest_matrix(shape) * c / mesh.mp,
                          f"the largest matrix, whole over fsdp, {t.model_cfg.compute_dtype}"))
        start.append(Term(f"{t.prefix} kept for the backward", shape.layers * saved,
                          f"{shape.layers} layers x {_gib(saved)}"))
        embeddings += shape.vocab * shape.hidden / mesh.mp * r
        if t.lm_head:  # XLA:TPU fuses the log-softmax: the logits and one fp32 copy
            logits += t.rows * (t.logit_positions or t.seq) * shape.vocab / mesh.mp * (c + 4)
    if logits > layer_total:
        start.append(Term("logits beyond a layer", logits - layer_total,
                          "the LM head's backward, before the last layer's recompute"))
    if embeddings > sum(t.bytes for t in start):
        return terms + [Term("embedding gradients (backward end)", embeddings,
                             f"whole over fsdp, beside the first layer's backward; the start "
                             f"holds {_gib(sum(t.bytes for t in start))}")]
    return terms + start


TPU_UPDATE_COPIES = 0.45
"""The AdamW update's transient on XLA:TPU, in trained parameters' bytes per device. The
parameters and both moments are donated and updated in place, but XLA:TPU writes about two
thirds of the new values beside their buffers and copies them in afterwards (copy insertion:
226 to 238 copies in 13B's 40-layer update modules), and its scheduler holds some of those at
once. Fitted on
libtpu's 13B update graphs compiled at 40 layers (``bench/tpu_compile.py --deeper``): 0.69 to
0.73 of the parameters on the v3-256's meshes, 0.17 (PPO) to 0.30 and 0.69 (reward model) on
the v3-128's; at 0.45 each update graph is within 7 %, the update being mostly its
arguments (parameters, gradients, moments: 4 x)."""


def update_terms_tpu(trained: list[Term]) -> list[Term]:
    """The AdamW update graph's transient (XLA:TPU): :data:`TPU_UPDATE_COPIES` of the trained
    parameters."""
    params = sum(t.bytes for t in trained if t.name.endswith(" parameters"))
    return [Term("AdamW update", TPU_UPDATE_COPIES * params, "the update's fp32 temporaries")]


def forward_gathered(cfg: Any, shapes: Mapping[str, Shape], mesh: Mesh) -> float:
    """Weights whole over fsdp while a training step's forwards run: every model the step
    runs (the config's resident model roles; frozen ones in their matmul dtype)."""
    total = 0.0
    for r in cfg.model_roles():
        if r.resident:
            model_cfg = getattr(cfg, r.key)
            total += gathered_weights_bytes(shapes[r.key], mesh, r.head == "causal",
                                            model_cfg.param_dtype,
                                            None if r.trained else frozen_dtype(model_cfg))
    return total


def _mesh(cfg: Any, n_devices: int) -> Mesh:
    try:
        return parse_mesh_dim(cfg.mesh_dim, n_devices)
    except MeshError as e:
        raise PlanError(str(e)) from None


def rows_per_device(global_rows: int, mesh: Mesh, what: str) -> float:
    if global_rows % mesh.batch:
        raise PlanError(f"{what}: {global_rows} rows do not split over dp*fsdp={mesh.batch}")
    return global_rows / mesh.batch


def read_shapes(cfg: Any) -> dict[str, Shape]:
    """The shape of every model the config's trainer puts on the mesh, by config key."""
    keys = dict.fromkeys(r.key for r in cfg.model_roles())
    return {key: read_shape(getattr(cfg, key), key, cfg.remote_timeout_s) for key in keys}


COMPILERS = ("tpu", "xla_cpu")
"""Whose memory layout the plan follows: XLA:TPU's (calibrated on libtpu's compile-only
client, ``plan --compile``; the pre-flight's) or XLA:CPU's (calibrated on its buffer
assignment, ``bench/memory.py``; what the CPU tests measure)."""


def plan(cfg: Any, n_devices: int, hbm_bytes: float | None = None,
         shapes: Mapping[str, Shape] | None = None, mesh: Mesh | None = None,
         gradients: str = "reduce_scatter", compiler: str = "tpu") -> Plan:
    """The per-device plan of a trainer config on ``n_devices`` devices: the trainer's own
    memory terms, handed over by its config (``cfg.memory_terms``). ``shapes``: the models'
    shapes by config key (default: read from their config.json); ``mesh``: another mesh than
    the config's ``mesh_dim`` (the start-up checks try them all); ``gradients``: how the
    compiler reduces them on XLA:CPU (:data:`GRADIENT_REDUCTIONS`; XLA:TPU always
    reduce-scatters); ``compiler``: :data:`COMPILERS`."""
    if gradients not in GRADIENT_REDUCTIONS:
        raise ValueError(f"gradients={gradients!r}: expected one of {GRADIENT_REDUCTIONS}")
    if compiler not in COMPILERS:
        raise ValueError(f"compiler={compiler!r}: expected one of {COMPILERS}")
    mesh = mesh or _mesh(cfg, n_devices)
    shapes = dict(shapes) if shapes is not None else read_shapes(cfg)
    shape = shapes["model"]
    notes = []
    if getattr(getattr(cfg, "sampling", None), "gather_weights", None) == "auto":
        import dataclasses

        sampling = resolve_sampling(cfg, n_devices, hbm_bytes, shapes, mesh, compiler)
        notes.append(f"sampling.gather_weights=auto: {sampling.gather_weights}"
                     + (f" (generation_tp={sampling.generation_tp or generation_tp(cfg, mesh)})"
                        if sampling.gather_weights == "generation_layout" else ""))
        cfg = dataclasses.replace(cfg, sampling=sampling)
    elif (compiler == "tpu"
          and getattr(getattr(cfg, "sampling", None), "gather_weights", None) == "hoisted"):
        notes.append("sampling.gather_weights=hoisted: XLA:TPU does not hoist the weight "
                     "gathers out of the decode loop (it gathers every token, as per_layer) and "
                     "on some meshes holds more than these terms (docs/tpu-compiler.md); "
                     "per_layer and generation_layout are planned as XLA:TPU compiles them")
    heads = heads_per_device(shape, mesh.mp, compiler)
    if shape.heads % mesh.mp or shape.kv_heads % mesh.mp:
        notes.append(f"mp={mesh.mp} does not divide heads={shape.heads}/kv_heads="
                     f"{shape.kv_heads}: every device computes {heads} heads' scores")
    return cfg.memory_terms(shapes, mesh, hbm_bytes, notes, gradients=gradients, compiler=compiler)


def _rollout_terms(cfg: Any, shape: Shape, mesh: Mesh) -> list[Term]:
    """The generation phase of PPO and GRPO: the policy's gathered weights, its KV cache, and
    the larger of the prefill of one rollout piece and the decode loop's copies of the cache
    (two graphs, one after the other)."""
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    t = pl + cl
    n_roll = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    c = BYTES[cfg.model.compute_dtype]
    micro = rows_per_device(cfg.rollout_micro_batch_size or n_roll, mesh, "rollout_micro_batch_size")
    kv = heads_per_device(shape, mesh.mp) * shape.kv_heads // shape.heads * shape.head_dim
    cache = 2 * shape.layers * micro * t * kv * c
    if cfg.sampling.gather_weights == "generation_layout":
        return generation_layout_terms(cfg, shape, mesh, micro, t)
    rollout = [
        Term("gathered weights", rollout_gathered_weights_bytes(
            shape, mesh, cfg.sampling.gather_weights, cfg.model.param_dtype),
             f"policy, sampling.gather_weights={cfg.sampling.gather_weights}: "
             f"{'1 layer' if cfg.sampling.gather_weights == 'per_layer' else 'every layer'} "
             "+ LM head, whole over fsdp"),
        Term("KV cache", cache, f"{micro:g} rows x {t} x {shape.layers} layers, {cfg.model.compute_dtype}"),
    ]
    prefill = prefill_bytes(shape, mesh, micro, pl, t, c, BYTES[cfg.model.param_dtype])
    copies = DECODE_CACHE_COPIES * cache
    rollout.append(
        Term("prefill (one layer) + logits" if prefill >= copies else "decode loop's cache copies",
             max(prefill, copies), f"prefill: {micro:g} rows x {pl} prompt tokens, {_gib(prefill)}; "
             f"decode loop: {DECODE_CACHE_COPIES:g} of the KV cache copied, {_gib(copies)}"))
    return rollout


TPU_DECODE_CACHE_COPIES = 0.5
"""Share of the KV cache XLA:TPU's decode-loop module holds a second time (its ``While``
state's copies), calibrated on libtpu compiles (``bench/tpu_compile.py``)."""


def _rollout_terms_tpu(cfg: Any, shape: Shape, mesh: Mesh) -> tuple[list[Term], list[Term]]:
    """The rollout's two graphs as XLA:TPU holds them: the KV cache, and the policy's LM head
    and largest layer weight whole over fsdp in the compute dtype (XLA:TPU gathers one matrix
    at a time, after the cast, with either ``sampling.gather_weights``: ``hoisted`` does not
    hoist there); the prefill one layer's MLP and residual stream (its attention is fused:
    no ``[S, S]`` scores are held), the decode loop its copies of the cache
    (:data:`TPU_DECODE_CACHE_COPIES`)."""
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    t = pl + cl
    n_roll = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    c, r = BYTES[cfg.model.compute_dtype], BYTES[cfg.model.param_dtype]
    micro = rows_per_device(cfg.rollout_micro_batch_size or n_roll, mesh, "rollout_micro_batch_size")
    heads = heads_per_device(shape, mesh.mp, "tpu")
    cache = 2 * shape.layers * micro * t * heads * shape.kv_heads // shape.heads * shape.head_dim * c
    weights = Term("gathered weights", (shape.vocab * shape.hidden + _largest_matrix(shape)) * c / mesh.mp,
                   f"the policy's LM head and largest matrix, whole over fsdp, {cfg.model.compute_dtype}")
    kv = Term("KV cache", cache, f"{micro:g} rows x {t} x {shape.layers} layers, {cfg.model.compute_dtype}")
    # Measured on XLA:CPU; XLA:TPU's 13B compiles agree within 15 % (bench/tpu_compile_rollout.py).
    if cfg.sampling.gather_weights == "generation_layout":
        terms = generation_layout_terms(cfg, shape, mesh, micro, t)
        return terms, terms
    tokens = micro * pl
    prefill = tokens * (shape.hidden * r + 3 * shape.intermediate / mesh.mp * c)
    return ([weights, kv, Term("prefill: one layer's MLP", prefill, f"{micro:g} rows x {pl} prompt tokens")],
            [weights, kv, Term("decode loop's cache copies", TPU_DECODE_CACHE_COPIES * cache,
                               f"{TPU_DECODE_CACHE_COPIES:g} of the KV cache")])


def rollout_plan(trainer: str, cfg: Any, shapes: Mapping[str, Shape], mesh: Mesh,
                  hbm_bytes: float | None, persistent: list[Term], passes: list[TrainedPass],
                  notes: list[str], gradients: str, compiler: str) -> Plan:
    """A plan with a rollout and the training phases. Gradients live from the first
    micro-batch's backward to the optimizer step, which clears them: they belong to the
    training phases, and the rollouts run without them. XLA:TPU: the rollout's two graphs
    (prefill, decode loop) and the training's two (micro-step, update) are a phase each."""
    grads = [t for t in persistent if t.name.endswith(" gradients")]
    persistent = [t for t in persistent if t not in grads]
    shape = shapes["model"]
    if compiler == "tpu":
        prefill, decode = _rollout_terms_tpu(cfg, shape, mesh)
        phases = {"rollout prefill": prefill, "rollout decode": decode,
                  "train micro-step": train_terms_tpu(passes, mesh) + grads,
                  "train update": update_terms_tpu(persistent) + grads}
    else:
        phases = {"rollout": _rollout_terms(cfg, shape, mesh),
                  "train micro-step": train_terms(passes, mesh, gradients,
                                                   forward_gathered(cfg, shapes, mesh)) + grads}
    return Plan(trainer, mesh, hbm_bytes, persistent, phases, notes)


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


def rollout_policies(cfg: Any, n_devices: int, hbm_bytes: float | None,
                     shapes: Mapping[str, Shape] | None = None,
                     mesh: Mesh | None = None) -> list[str]:
    """One line per ``sampling.gather_weights`` policy of a PPO/GRPO config: the rollout's
    per-token collective bytes per device (weights, activations), the rollout phase's
    memory and the run's peak, and whether it fits (``auto`` picks the first that does in the
    order generation_layout, per_layer). Empty for other trainers."""
    import dataclasses

    if getattr(cfg, "trainer", None) not in ("ppo", "grpo"):
        return []
    mesh = mesh or _mesh(cfg, n_devices)
    shapes = dict(shapes) if shapes is not None else read_shapes(cfg)
    shape = shapes["model"]
    rows = cfg.rollout_micro_batch_size or cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    chosen = resolve_sampling(cfg, n_devices, hbm_bytes, shapes, mesh)
    tp = chosen.generation_tp if chosen.gather_weights == "generation_layout" else 0
    lines = []
    for policy in ("per_layer", "hoisted", "generation_layout"):
        s = dataclasses.replace(cfg.sampling, gather_weights=policy,
                                generation_tp=tp if policy == "generation_layout" else
                                cfg.sampling.generation_tp)
        p = plan(dataclasses.replace(cfg, sampling=s), n_devices, hbm_bytes, shapes, mesh)
        b = per_token_collective_bytes(shape, mesh, policy, rows, cfg.model.param_dtype,
                                       cfg.model.compute_dtype, generation_tp(s_cfg(cfg, s), mesh),
                                       compiler="tpu")
        # Lower case: the plan's own verdict line is the one that says FITS / DOES NOT FIT.
        verdict = {None: "fits: unknown", True: "fits", False: "does not fit"}[p.fits]
        name = policy + (f" (tp={generation_tp(s_cfg(cfg, s), mesh)})"
                         if policy == "generation_layout" else "")
        lines.append(f"  rollout {name:<26} per token per device: weights "
                     f"{b['weights'] / 2**20:9.2f} MiB, activations {b['activations'] / 2**20:7.2f} "
                     f"MiB; rollout +{_gib(max(p.phase_total(k) for k in p.phases if k.startswith('rollout')))}"
                     f", peak {_gib(p.peak)}: "
                     f"{verdict}" + ("  <- auto" if policy == chosen.gather_weights
                                    and cfg.sampling.gather_weights == "auto" else ""))
    return lines


def s_cfg(cfg: Any, sampling: Any) -> Any:
    """``cfg`` with another ``sampling`` (a shallow copy)."""
    import dataclasses

    return dataclasses.replace(cfg, sampling=sampling)


def raise_does_not_fit(p: Plan) -> None:
    raise DoesNotFit(
        f"{format_plan(p)}\nThe run cannot fit in device memory: lower the batch, turn on "
        "model.gradient_checkpointing, use more devices, or a mesh whose mp divides the heads."
    )
