"""``sampling.gather_weights`` on one XLA:CPU device: both policies give the same tokens bit for
bit, and under PPO's bf16 autocast (trainable fp32 weights, whose bf16 casts autocast caches)
an in-place weight update reaches the next rollout with no re-trace. The HLO side (where the
all-gathers sit) is tests/test_decode_weights_hlo.py."""

from __future__ import annotations

import pytest
import torch

from tests.test_generation import EOS, PAD, left_padded, tiny_model
from torchxla_rlhf import runtime
from torchxla_rlhf.generation import Generator, SamplingConfig


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="gather_weights"):
        SamplingConfig(gather_weights="sometimes")


def test_policies_agree_and_see_new_weights_under_autocast():
    dev = runtime.init()
    model = tiny_model(3).to(dev).requires_grad_(True)
    ids, mask = (t.to(dev) for t in left_padded([6, 2, 5], 6, seed=4))
    gens = {p: Generator(model, SamplingConfig(gather_weights=p), eos_token_id=EOS,
                         pad_token_id=PAD) for p in ("per_layer", "hoisted")}

    def rollouts() -> dict[str, torch.Tensor]:
        with torch.autocast("xla", dtype=torch.bfloat16):
            return {p: g.generate(ids, mask, 10, seed=2).sequences.cpu() for p, g in gens.items()}

    first = rollouts()
    assert torch.equal(first["per_layer"], first["hoisted"])
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # reverses every logit ranking
    runtime.sync()
    second = rollouts()
    with torch.autocast("xla", dtype=torch.bfloat16):
        fresh = Generator(model, SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD).generate(
            ids, mask, 10, seed=2).sequences.cpu()
    for p, g in gens.items():
        assert g._loop.captures == 1
        assert torch.equal(second[p], fresh), f"{p}: the decode loop kept the old weights"
        assert not torch.equal(second[p], first[p])
