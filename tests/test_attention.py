"""The einsum attention (attention.py) computes what HF ``eager`` computes: logits, gradients,
and generation through a KV cache, with grouped-query heads and left padding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from torchxla_rlhf.models import attention
from torchxla_rlhf.algos.rl import position_ids_from_mask


def _pair(kv_heads: int, dtype=torch.float32) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """The same random Llama twice: HF eager and the einsum form."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    eager = LlamaForCausalLM(cfg).to(dtype)
    cfg_e = LlamaConfig(**cfg.to_dict())
    cfg_e._attn_implementation = attention.resolve("auto")
    einsum = LlamaForCausalLM(cfg_e).to(dtype)
    einsum.load_state_dict(eager.state_dict())
    eager.config._attn_implementation = "eager"
    return eager, einsum


def _batch(b: int = 3, s: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows of different lengths."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_resolve_names_and_errors():
    assert attention.resolve("auto") == attention.NAME
    assert attention.resolve("eager") == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        attention.resolve("flash")


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_logits_and_grads_equal_eager(kv_heads):
    eager, einsum = _pair(kv_heads)
    ids, mask = _batch()
    pos = position_ids_from_mask(mask)
    outs = []
    for model in (eager, einsum):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        (logits.float().logsumexp(-1) * mask).sum().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (le, ge), (li, gi) = outs
    real = mask.bool()
    torch.testing.assert_close(li[real], le[real], rtol=1e-5, atol=1e-5)
    for name in ge:
        torch.testing.assert_close(gi[name], ge[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_matches_eager_bf16():
    """Same dtype handling as eager: fp32 softmax, probabilities back in the query dtype."""
    eager, einsum = _pair(2, torch.bfloat16)
    ids, mask = _batch()
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        le = eager(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        li = einsum(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert li.dtype == torch.bfloat16
    torch.testing.assert_close(li[mask.bool()], le[mask.bool()], rtol=0, atol=0)


def test_decode_through_static_cache_equals_eager():
    """A prompt forward into a StaticCache, then one-token steps (the Generator's pattern)."""
    eager, einsum = _pair(2)
    ids, mask = _batch(s=8)
    steps = []
    for model in (eager, einsum):
        cache = StaticCache(config=model.config, max_cache_len=12)
        m = mask.clone()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=m, position_ids=position_ids_from_mask(m),
                        cache=cache, use_cache=True)
            seq = [out.logits[:, -1]]
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            for t in range(3):
                m = torch.cat([m, torch.ones_like(tok)], dim=1)
                pos = (m.sum(-1, keepdim=True) - 1)
                out = model(input_ids=tok, attention_mask=m, position_ids=pos,
                            cache=cache, use_cache=True,
                            cache_position=torch.tensor([8 + t]))
                seq.append(out.logits[:, -1])
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(torch.stack(seq))
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-5)
