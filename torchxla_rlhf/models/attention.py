"""Attention that keeps heads split over ``mp`` under GSPMD, registered with transformers.

Why not HF ``eager``: it computes scores with 4-D ``torch.matmul``, which torch_xla lowers by
folding ``(batch, heads)`` into one dimension. GSPMD cannot carry the ``mp`` split of the head
dimension through that reshape, so it all-gathers q/k/v over ``mp`` and every device computes
*all* heads' ``[S, S]`` scores, forward and backward. At 13B and 4096 tokens that one tensor
is the largest per-device term of DPO and the reward model.

:func:`einsum_attention_forward` is the same math written with ``torch.einsum``, which lowers
to one ``dot_general`` with ``batch`` and the (kv-)head dimension as batch dimensions: the head
split survives and each device holds ``heads / mp`` heads' scores. Grouped-query attention is
done by viewing queries as ``[B, kv_heads, group, S, D]`` rather than repeating k/v
(``repeat_kv`` materialises ``group`` copies of the keys and values).

It is registered under :data:`NAME` through transformers' ``AttentionInterface`` (the mask
through ``AttentionMaskInterface``, as HF's eager additive mask), so the HF Llama classes are
used unchanged: ``config._attn_implementation = NAME``. (torch_xla's Pallas flash attention is
not offered: it cannot run or be tested on XLA:CPU, and under SPMD it needs the mesh and
partition specs passed in explicitly.)

Numerics equal ``eager``'s (tests/test_attention.py): fp32 softmax, probabilities cast back to
the query dtype before the value product, exactly as ``eager_attention_forward``.
"""

from __future__ import annotations

import torch
from transformers import StaticCache

NAME = "xla_einsum"
"""``attn_implementation`` name of :func:`einsum_attention_forward`."""

IMPLEMENTATIONS = ("auto", "eager", NAME)
"""Values of ``ModelConfig.attn_implementation``; ``auto`` is :data:`NAME`."""


def einsum_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``eager_attention_forward`` as einsums over ``[B, kv_heads, group, S, D]``.

    ``query`` is ``[B, H, Sq, D]``, ``key``/``value`` ``[B, KV, Sk, D]``, ``attention_mask``
    HF's additive eager mask ``[B, 1, Sq, Sk]`` (or None). Returns ``([B, Sq, H, D], None)``:
    the attention probabilities are not returned (nothing in training reads them, and keeping
    them alive would cost one ``[B, H, Sq, Sk]`` tensor per layer).
    """
    b, h, sq, d = query.shape
    kv = key.shape[1]
    q = query.reshape(b, kv, h // kv, sq, d)
    scores = torch.einsum("bkgqd,bksd->bkgqs", q, key) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, : key.shape[-2]]
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.einsum("bkgqs,bksd->bkgqd", probs, value)
    return out.reshape(b, h, sq, d).transpose(1, 2).contiguous(), None


_REGISTERED = {"done": False}


def register() -> None:
    """Register :data:`NAME` with transformers' attention and mask interfaces; idempotent."""
    if _REGISTERED["done"]:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, einsum_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    _REGISTERED["done"] = True


def resolve(choice: str) -> str:
    """The ``attn_implementation`` to build models with: ``auto`` is the einsum form (the one
    that keeps heads split over ``mp``); ``eager`` is HF's, kept for comparison."""
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation: {choice!r} is not one of {IMPLEMENTATIONS}")
    if choice == "eager":
        return "eager"
    register()
    return NAME


class ComputeDtypeStaticCache(StaticCache):
    """HF ``StaticCache`` that stores keys and values in the autocast dtype when autocast is
    on (the compute dtype), else in the dtype the model produces them.

    Why: under bf16 autocast Llama's values come out bf16 but its keys fp32 (rotary ``cos``/
    ``sin`` take the fp32 residual stream's dtype), and ``StaticCache`` allocates each tensor
    in the dtype of the first states it sees, so the key cache would be fp32: 1.5x the cache
    bytes. Casting on write changes no result: the score einsum casts keys to bf16 anyway.
    """

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        device_type = key_states.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def static_cache(config, max_cache_len: int) -> ComputeDtypeStaticCache:
    """The rollout's KV cache (see :class:`ComputeDtypeStaticCache`)."""
    return ComputeDtypeStaticCache(config=config, max_cache_len=max_cache_len)
