"""Compile a small sharded Llama's training step (and optionally a rollout) so that XLA dumps
its per-device programs: what tests/test_attention_hlo.py and bench/memory.py read.

    XLA_FLAGS=--xla_dump_to=DIR CPU_NUM_DEVICES=8 PJRT_DEVICE=CPU \\
        python -m torchxla_rlhf.memory_probe '{"mesh": "1,2,4", "hidden": 320, ...}'

The device count is fixed per process, so callers run this in a subprocess. Graph names in
the dump: ``probe_train`` (forward + backward of ``logsumexp(logits)``, checkpointing as
configured), ``generation_prefill`` and ``generation_decode_step`` (under the compute dtype's
autocast, through the same :class:`~torchxla_rlhf.generation.Generator` PPO uses).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch


@dataclass
class ProbeSpec:
    """One probe: model shape, mesh, batch and what to compile."""

    mesh: str = "1,2,4"
    attn_implementation: str = "auto"
    hidden: int = 320
    heads: int = 8
    kv_heads: int = 8
    layers: int = 1
    intermediate: int = 640
    vocab: int = 320
    batch: int = 8
    seq: int = 512
    gradient_checkpointing: bool = True
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    train: bool = True
    decode: dict = field(default_factory=dict)
    """``{"batch": B, "prompt": PL, "new": CL}`` to also compile a rollout (empty: none)."""


def model_config(spec: ProbeSpec):
    """The probe's :class:`~torchxla_rlhf.models.ModelConfig` (a ``tiny`` random Llama)."""
    from torchxla_rlhf import models

    return models.ModelConfig(
        name_or_path="tiny",
        attn_implementation=spec.attn_implementation,
        gradient_checkpointing=spec.gradient_checkpointing,
        param_dtype=spec.param_dtype,
        compute_dtype=spec.compute_dtype,
        tiny=models.TinyModelConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads, max_position_embeddings=max(spec.seq, 64) * 2,
        ),
    )


def run(spec: ProbeSpec) -> dict:
    """Compile (and run once) the probe's graphs; returns their input shapes."""
    from torchxla_rlhf import models, runtime
    from torchxla_rlhf.generation import Generator, SamplingConfig

    mesh = runtime.make_mesh(spec.mesh)
    cfg = model_config(spec)
    model = models.load_causal_lm(cfg, mesh)
    runtime.sync()
    gen = torch.Generator().manual_seed(0)
    if spec.train:
        model.train()
        ids = torch.randint(3, spec.vocab, (spec.batch, spec.seq), generator=gen)
        batch = runtime.batch_to_device({"ids": ids, "mask": torch.ones_like(ids)}, mesh)
        runtime.sync()

        def step(ids, mask):
            with models.autocast(spec.compute_dtype, spec.param_dtype):
                logits = models.causal_lm_logits(model, ids, mask)
            loss = logits.float().logsumexp(-1).mean()
            loss.backward()
            return loss

        runtime.compile(step, name="probe_train")(batch["ids"], batch["mask"])
        runtime.sync()
    if spec.decode:
        b, pl, cl = spec.decode["batch"], spec.decode["prompt"], spec.decode["new"]
        ids = torch.randint(3, spec.vocab, (b, pl), generator=gen)
        prompts = runtime.batch_to_device({"ids": ids, "mask": torch.ones_like(ids)}, mesh)
        generator = Generator(model, SamplingConfig(), eos_token_id=2, pad_token_id=0, mesh=mesh)
        with models.autocast(spec.compute_dtype, spec.param_dtype):
            generator.generate(prompts["ids"], prompts["mask"], max_new_tokens=cl)
        runtime.sync()
    return {"spec": spec.__dict__}


if __name__ == "__main__":
    print(json.dumps(run(ProbeSpec(**json.loads(sys.argv[1])))))
