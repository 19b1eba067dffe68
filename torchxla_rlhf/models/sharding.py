"""Partition rules for HF Llama parameters, as data, and the function that matches them.

A rule is ``(regex, spec)``: the first rule whose regex matches a parameter's name
(``re.search``) gives its partition spec, one entry per tensor dim, each a mesh axis name,
``None`` (replicated) or a tuple of axes. PyTorch ``nn.Linear`` weights are ``[out, in]``, so
the Megatron-style split of docs/training.md reads:

- column-parallel (``q/k/v/gate/up`` and ``lm_head``): out over ``mp``, in over ``fsdp``
- row-parallel (``o/down``): out over ``fsdp``, in over ``mp``
- embeddings ``[vocab, hidden]``: vocab over ``fsdp``, hidden over ``mp``
- norms and the ``[1, hidden]`` reward/value ``score`` head: replicated (they are tiny)

:func:`match_specs` (which the model loader applies) fails when a rule matches no parameter (a stale or misspelled rule) or when
a parameter matches no rule, and refuses to leave a large weight fully replicated. There is no
silent catch-all rule.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Iterable, Sequence

from torchxla_rlhf.errors import UserError

if TYPE_CHECKING:  # the rules and match_specs serve the torch-free pre-flight too
    import torch

    from torchxla_rlhf import runtime

logger = logging.getLogger(__name__)

Rule = tuple[str, tuple]

LLAMA_BACKBONE_RULES: tuple[Rule, ...] = (
    (r"^model\.embed_tokens\.weight$", ("fsdp", "mp")),
    (r"^model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)\.weight$", ("mp", "fsdp")),
    (r"^model\.layers\.\d+\.self_attn\.o_proj\.weight$", ("fsdp", "mp")),
    (r"^model\.layers\.\d+\.mlp\.(gate_proj|up_proj)\.weight$", ("mp", "fsdp")),
    (r"^model\.layers\.\d+\.mlp\.down_proj\.weight$", ("fsdp", "mp")),
    (r"^model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight$", (None,)),
    (r"^model\.norm\.weight$", (None,)),
)
"""Rules for the ``LlamaModel`` backbone shared by every head."""

CAUSAL_LM_RULES: tuple[Rule, ...] = LLAMA_BACKBONE_RULES + (
    (r"^lm_head\.weight$", ("mp", "fsdp")),
)
"""``LlamaForCausalLM``: backbone plus the column-parallel LM head."""

SEQUENCE_CLASSIFIER_RULES: tuple[Rule, ...] = LLAMA_BACKBONE_RULES + (
    (r"^score\.weight$", (None, None)),
)
"""``LlamaForSequenceClassification`` (reward and value models): backbone plus the
``[num_labels, hidden]`` score head, replicated."""

GENERATION_RULES: tuple[Rule, ...] = (
    (r"^model\.embed_tokens\.weight$", (None, "tp")),
    (r"^model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)\.weight$", ("tp", None)),
    (r"^model\.layers\.\d+\.self_attn\.o_proj\.weight$", (None, "tp")),
    (r"^model\.layers\.\d+\.mlp\.(gate_proj|up_proj)\.weight$", ("tp", None)),
    (r"^model\.layers\.\d+\.mlp\.down_proj\.weight$", (None, "tp")),
    (r"^model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight$", (None,)),
    (r"^model\.norm\.weight$", (None,)),
    (r"^lm_head\.weight$", ("tp", None)),
)
"""``LlamaForCausalLM`` in the rollout's generation layout (``sampling.gather_weights:
generation_layout``, mesh axes ``(data, tp)``, :func:`runtime.generation_mesh`): Megatron
tensor parallelism over ``tp`` and nothing over ``data`` (each tp group holds one whole
copy). Column-parallel q/k/v/gate/up and LM head (out over tp), row-parallel o/down (in over
tp), the embedding's hidden dim over tp (the lookup then needs no table gather), norms
replicated. A decode step then moves activations only: an all-reduce of ``[rows, hidden]``
after o and after down in every layer."""

GENERATION_COMPUTE_DTYPE = re.compile(r"(_proj|lm_head)\.weight$")
"""Weights the generation layout stores in the compute dtype: the matmul weights (what
autocast would cast them to anyway). The embedding and the norms keep the parameter dtype, so
the rollout's numerics are those of the other ``gather_weights`` policies."""

LARGE_WEIGHT_NUMEL = 1 << 20
"""A parameter with at least this many elements must be sharded on some mesh axis (when the
mesh has more than one device), so a missing rule cannot silently replicate a big matrix."""


class ShardingError(UserError, ValueError):
    """Partition rules that do not fit the model or the mesh."""


def rules_for(model: torch.nn.Module) -> tuple[Rule, ...]:
    """The rule set for a transformers Llama model class."""
    name = type(model).__name__
    if name == "LlamaForCausalLM":
        return CAUSAL_LM_RULES
    if name == "LlamaForSequenceClassification":
        return SEQUENCE_CLASSIFIER_RULES
    raise ShardingError(f"no partition rules for model class {name}")


def match_specs(
    names_and_shapes: Iterable[tuple[str, Sequence[int]]],
    rules: Sequence[Rule],
    *,
    axis_sizes: dict[str, int] | None = None,
    large_weight_numel: int = LARGE_WEIGHT_NUMEL,
) -> dict[str, tuple]:
    """Resolve a partition spec for every parameter name; pure (no devices touched).

    Errors: a parameter no rule matches, a rule that matches nothing, a spec whose rank differs
    from the tensor's, a dim not divisible by its axes' size, and (when the mesh has more than
    one device) a parameter of ``large_weight_numel`` elements or more left replicated.
    """
    compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]
    used = [False] * len(compiled)
    specs: dict[str, tuple] = {}
    sizes = axis_sizes or {}
    multi_device = any(size > 1 for size in sizes.values())
    for name, shape in names_and_shapes:
        for i, (regex, spec) in enumerate(compiled):
            if regex.search(name):
                used[i] = True
                break
        else:
            raise ShardingError(
                f"parameter {name!r} (shape {tuple(shape)}) matches no partition rule; add a rule "
                f"for it to the rule set (rules: {[p for p, _ in rules]})"
            )
        if len(spec) != len(shape):
            raise ShardingError(
                f"rule {rules[i][0]!r} gives spec {spec} of rank {len(spec)} for parameter "
                f"{name!r} of shape {tuple(shape)}"
            )
        for dim, (axes, size) in enumerate(zip(spec, shape)):
            ways = _axes_size(axes, sizes)
            if size % ways:
                raise ShardingError(
                    f"parameter {name!r} dim {dim} has size {size}, not divisible by mesh "
                    f"axes {axes} of size {ways}"
                )
        numel = 1
        for s in shape:
            numel *= s
        if multi_device and numel >= large_weight_numel and _axes_size_all(spec, sizes) == 1:
            raise ShardingError(
                f"parameter {name!r} ({numel} elements) would stay replicated on every device "
                f"under spec {spec} on mesh {sizes}: give it a sharded rule"
            )
        specs[name] = spec
    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        raise ShardingError(f"partition rule(s) {unused} match no parameter of the model")
    return specs


def _axes_size(axes, sizes: dict[str, int]) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    n = 1
    for a in axes:
        n *= sizes.get(a, 1)
    return n


def _axes_size_all(spec: tuple, sizes: dict[str, int]) -> int:
    n = 1
    for axes in spec:
        n *= _axes_size(axes, sizes)
    return n


def heads_split_cost(heads: int, kv_heads: int, mp: int) -> str | None:
    """What it costs when ``mp`` does not divide the attention (or kv) heads, else None.

    The weights still shard: the rules split the q/k/v/o projection dims (heads x head_dim,
    e.g. 40 x 128 = 5120 over mp=16 is 320 each), as the paper's JAX code split its matrix
    dims. But a device's 320 columns are 2.5 heads, so at the reshape to heads GSPMD reshards
    q, k and v (an all-gather over mp of the layer's activations) and attention runs with heads
    not split over mp: up to mp times the attention FLOPs and score memory of an even split.
    """
    if heads % mp == 0 and kv_heads % mp == 0:
        return None
    return (
        f"mp={mp} does not divide num_attention_heads={heads} / num_key_value_heads={kv_heads}: "
        f"the projection weights still shard {mp} ways, but each layer reshards q/k/v "
        f"(all-gather over mp of [rows, seq, hidden]) and computes attention with heads "
        f"replicated over the {mp} mp devices (up to {mp}x attention FLOPs and score memory). "
        f"An mp dividing the heads (e.g. {_divisors_text(heads, kv_heads)}) avoids it."
    )


def _divisors_text(heads: int, kv_heads: int) -> str:
    fits = [d for d in range(2, 65) if heads % d == 0 and kv_heads % d == 0]
    return ", ".join(f"mp={d}" for d in fits[-4:]) or "mp=1"


_WARNED: set[tuple[int, int, int]] = set()


def check_heads_fit(config, mesh: runtime.MeshInfo) -> None:
    """Heads that ``mp`` does not divide are allowed (GSPMD reshards, see
    :func:`heads_split_cost`); say once per shape what it costs. The projection dims must
    still divide, which :func:`match_specs` checks."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    cost = heads_split_cost(heads, kv_heads, mesh.mp)
    key = (heads, kv_heads, mesh.mp)
    if cost and key not in _WARNED:
        _WARNED.add(key)
        logger.warning("%s", cost)



def shard_model(
    model: torch.nn.Module,
    mesh: runtime.MeshInfo,
    rules: Sequence[Rule] | None = None,
    *,
    large_weight_numel: int = LARGE_WEIGHT_NUMEL,
) -> dict[str, tuple]:
    """Annotate every parameter of ``model`` (already on the XLA device) with its partition
    spec on ``mesh``; returns the specs by name. See :func:`match_specs` for the errors.
    (Used where parameters are replaced after loading: :func:`models.freeze`'s dtype cast
    makes new tensors without the annotation.)"""
    rules = rules if rules is not None else rules_for(model)
    if hasattr(model, "config"):
        check_heads_fit(model.config, mesh)
    params = dict(model.named_parameters())
    specs = match_specs(
        ((n, tuple(p.shape)) for n, p in params.items()),
        rules,
        axis_sizes=mesh.sizes,
        large_weight_numel=large_weight_numel,
    )
    from torchxla_rlhf import runtime

    for name, spec in specs.items():
        runtime.mark_sharding(params[name], mesh, spec)
    return specs
