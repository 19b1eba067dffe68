"""Compile a small sharded Llama's training step (and optionally a rollout) so that XLA dumps
its per-device programs: what tests/test_attention_hlo.py and bench/memory.py read.

    XLA_FLAGS=--xla_dump_to=DIR CPU_NUM_DEVICES=8 PJRT_DEVICE=CPU \\
        python -m tools.memory_probe '{"mesh": "1,2,4", "hidden": 320, ...}'
        python -m tools.memory_probe dpo|reward|ppo|grpo CONFIG.yaml [key=value ...]

The device count is fixed per process, so callers run this in a subprocess. Graph names in
the dump: ``probe_train`` (forward + backward of ``logsumexp(logits)``, checkpointing as
configured), ``generation_prefill`` and ``generation_decode_loop`` (under the compute dtype's
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
    gather_weights: str = "per_layer"
    """The rollout's ``SamplingConfig.gather_weights``."""
    generation_tp: int = 0
    """The rollout's ``SamplingConfig.generation_tp`` (``generation_layout``)."""
    greedy: bool = False
    """Greedy decoding (the default samples with top-k, as the trainers do)."""


def model_config(spec: ProbeSpec):
    """The probe's :class:`~torchxla_rlhf.models.llama.ModelConfig` (a ``tiny`` random Llama)."""
    from torchxla_rlhf.models import llama

    return llama.ModelConfig(
        name_or_path="tiny",
        attn_implementation=spec.attn_implementation,
        gradient_checkpointing=spec.gradient_checkpointing,
        param_dtype=spec.param_dtype,
        compute_dtype=spec.compute_dtype,
        tiny=llama.TinyModelConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads, max_position_embeddings=max(spec.seq, 64) * 2,
        ),
    )


def run(spec: ProbeSpec) -> dict:
    """Compile (and run once) the probe's graphs; returns their input shapes."""
    from torchxla_rlhf import runtime
    from torchxla_rlhf.models import llama
    from torchxla_rlhf.generation import Generator, SamplingConfig

    mesh = runtime.make_mesh(spec.mesh)
    cfg = model_config(spec)
    model = llama.load_causal_lm(cfg, mesh)
    runtime.sync()
    gen = torch.Generator().manual_seed(0)
    if spec.train:
        model.train()
        batch = _random_rows(spec.vocab, spec.batch, spec.seq, mesh, gen)
        runtime.sync()

        def step(ids, mask):
            with runtime.autocast(spec.compute_dtype, spec.param_dtype):
                logits = llama.causal_lm_logits(model, ids, mask)
            loss = logits.float().logsumexp(-1).mean()
            loss.backward()
            return loss

        runtime.compile(step, name="probe_train")(batch["ids"], batch["mask"])
        runtime.sync()
    if spec.decode:
        b, pl, cl = spec.decode["batch"], spec.decode["prompt"], spec.decode["new"]
        prompts = _random_rows(spec.vocab, b, pl, mesh, gen)
        generator = Generator(model, SamplingConfig(
            gather_weights=spec.gather_weights, generation_tp=spec.generation_tp,
            greedy=spec.greedy),
                              eos_token_id=2, pad_token_id=0, mesh=mesh)
        with runtime.autocast(spec.compute_dtype, spec.param_dtype):
            generator.generate(prompts["ids"], prompts["mask"], max_new_tokens=cl)
        runtime.sync()
    return {"spec": spec.__dict__}


# ----------------------------------------------------------------------------------------
# Trainer proxies (bench/memory.py): one config, the trainer's models, each phase one graph
# ----------------------------------------------------------------------------------------


def _random_rows(vocab: int, rows: int, seq: int, mesh, gen) -> dict:
    from torchxla_rlhf.aot.trace import random_rows

    return random_rows(vocab, rows, seq, mesh, gen)


def run_trainer_proxy(kind: str, config_path: str, overrides: list[str]) -> dict:
    """Build the ``kind`` trainer's models from its config (llama.py, as the trainer does)
    and compile its step's phases as single graphs (``proxy_train``: forward, backward and
    AdamW; PPO and GRPO also ``generation_*``): the same graphs ``plan --compile`` traces
    (``torchxla_rlhf.aot.trace.trainer_graphs``). Returns the bytes each device holds outside
    a phase's graph while it runs (the rollout: gradients, optimizer state, value and frozen
    models)."""
    from torchxla_rlhf import runtime
    from torchxla_rlhf.aot.trace import ModelSource, trainer_graphs
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.trainers import registry

    cfg = load_config(registry.get(kind).config, config_path, overrides)
    mesh = runtime.make_mesh(cfg.mesh_dim)
    return {"outside": trainer_graphs(kind, cfg, mesh, ModelSource(cfg, mesh))}


if __name__ == "__main__":
    if sys.argv[1] in ("dpo", "reward", "ppo", "grpo"):
        print(json.dumps(run_trainer_proxy(sys.argv[1], sys.argv[2], sys.argv[3:])))
    else:
        print(json.dumps(run(ProbeSpec(**json.loads(sys.argv[1])))))
