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
        batch = _random_rows(spec.vocab, spec.batch, spec.seq, mesh, gen)
        runtime.sync()

        def step(ids, mask):
            with runtime.autocast(spec.compute_dtype, spec.param_dtype):
                logits = models.causal_lm_logits(model, ids, mask)
            loss = logits.float().logsumexp(-1).mean()
            loss.backward()
            return loss

        runtime.compile(step, name="probe_train")(batch["ids"], batch["mask"])
        runtime.sync()
    if spec.decode:
        b, pl, cl = spec.decode["batch"], spec.decode["prompt"], spec.decode["new"]
        prompts = _random_rows(spec.vocab, b, pl, mesh, gen)
        generator = Generator(model, SamplingConfig(gather_weights=spec.gather_weights),
                              eos_token_id=2, pad_token_id=0, mesh=mesh)
        with runtime.autocast(spec.compute_dtype, spec.param_dtype):
            generator.generate(prompts["ids"], prompts["mask"], max_new_tokens=cl)
        runtime.sync()
    return {"spec": spec.__dict__}


# ----------------------------------------------------------------------------------------
# Trainer proxies (bench/memory.py): one config, the trainer's models, each phase one graph
# ----------------------------------------------------------------------------------------


def _device_bytes(tensors) -> int:
    """Bytes one device holds of ``tensors`` (each sharded evenly over its mesh axes):
    read from the tensors' shard shapes, not from the planner."""
    from torchxla_rlhf import runtime

    return sum(runtime.shard_nbytes(t) for t in tensors)


def _random_rows(vocab: int, rows: int, seq: int, mesh, gen) -> dict:
    from torchxla_rlhf import runtime

    ids = torch.randint(3, vocab, (rows, seq), generator=gen)
    return runtime.batch_to_device({"ids": ids, "mask": torch.ones_like(ids)}, mesh)


def _logps(model, ids, mask, positions: int | None = None) -> torch.Tensor:
    """Per-token log-probs of ``ids`` (the last ``positions`` of them), as the trainers take
    them: LM head on the predicting positions, fp32 log-softmax, gather."""
    from torchxla_rlhf import models

    hidden = model.model(input_ids=ids, attention_mask=mask,
                         position_ids=models.position_ids_from_mask(mask), use_cache=False).last_hidden_state
    start = ids.shape[1] - (positions or ids.shape[1] - 1) - 1
    logits = model.lm_head(hidden[:, start:-1]).float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, start + 1:, None]).squeeze(-1)


def run_trainer_proxy(kind: str, config_path: str, overrides: list[str]) -> dict:
    """Build the ``kind`` trainer's models from its config (models.py, as the trainer does)
    and compile its step's phases as single graphs (``proxy_train``: forward, backward and
    AdamW; PPO and GRPO also ``generation_*``). Returns the bytes each device holds outside a
    phase's graph while it runs (the rollout: gradients, optimizer state, value and frozen
    models)."""
    from torchxla_rlhf import losses, models, runtime
    from torchxla_rlhf.config import load_config
    from torchxla_rlhf.configs import DPOConfig, GRPOConfig, PPOConfig, RewardConfig
    from torchxla_rlhf.generation import Generator
    from torchxla_rlhf.optim import AdamW, Schedule

    cls = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig}[kind]
    cfg = load_config(cls, config_path, overrides)
    mesh = runtime.make_mesh(cfg.mesh_dim)
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.model.tiny.vocab_size
    ac = runtime.autocast(cfg.model.compute_dtype, cfg.model.param_dtype)
    opt_cfg = cfg.optimizer

    def trained(model):
        model.train()
        return model, AdamW(model.parameters(), opt_cfg, Schedule.linear(1e-5, 0.0, 0.0, 10))

    outside: dict[str, int] = {}
    if kind in ("dpo", "reward"):
        rows, seq = 2 * cfg.train_dataset.batch_size, cfg.train_dataset.seq_length
        if kind == "dpo":
            policy, opt = trained(models.load_causal_lm(cfg.model, mesh))
            ref = models.freeze(models.load_causal_lm(cfg.model, mesh), cfg.model, mesh)
        else:
            policy, opt = trained(models.load_sequence_classifier(cfg.model, mesh))
        runtime.sync()
        batch = _random_rows(vocab, rows, seq, mesh, gen)

        def step(ids, mask):
            with ac:
                if kind == "dpo":
                    with torch.no_grad():
                        ref_lp = _logps(ref, ids, mask).sum(-1)
                    z = _logps(policy, ids, mask).sum(-1) - ref_lp
                else:
                    z = models.sequence_classifier_scores(policy, ids, mask)
            loss = -torch.nn.functional.logsigmoid(z.view(2, -1)[0] - z.view(2, -1)[1]).mean()
            loss.backward()
            return opt.step()

        runtime.compile(step, name="proxy_train")(batch["ids"], batch["mask"])
        runtime.sync()
        return {"outside": outside}

    pad = cfg.tokenizer_pad_token_id
    policy, popt = trained(models.load_causal_lm(cfg.model, mesh, pad_token_id=pad))
    value = vopt = rm = None  # GRPO: no value or reward model
    if kind == "ppo":
        value, vopt = trained(models.load_sequence_classifier(cfg.value_model or cfg.reward_model,
                                                              mesh, pad_token_id=pad))
        rm = models.freeze(models.load_sequence_classifier(cfg.reward_model, mesh, pad_token_id=pad),
                           cfg.reward_model, mesh)
    ref = (models.freeze(models.load_causal_lm(cfg.model, mesh, pad_token_id=pad), cfg.model, mesh)
           if kind == "ppo" or cfg.needs_reference else None)
    runtime.sync()
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    chunk = cfg.mini_batch_size // cfg.optimizer.accumulate_gradient_steps
    batch = _random_rows(vocab, chunk, pl + cl, mesh, gen)

    def ppo_step(ids, mask):
        with ac:
            with torch.no_grad():
                ref_lp = _logps(ref, ids, mask, cl)
                score = models.sequence_classifier_scores(rm, ids, mask)
            lp = _logps(policy, ids, mask, cl)
            v = models.sequence_classifier_scores(value, ids, mask, every_position=True)[:, pl - 1:-1]
        adv = (score[:, None] - ref_lp).detach()
        loss = -(torch.exp(lp - lp.detach()) * adv).mean() + ((v.float() - adv) ** 2).mean()
        loss.backward()
        return popt.step(), vopt.step()

    def grpo_step(ids, mask):
        # A group-relative advantage per row and, with beta > 0, the k3 KL to the reference.
        with ac:
            lp = _logps(policy, ids, mask, cl)
            if ref is not None:
                with torch.no_grad():
                    ref_lp = _logps(ref, ids, mask, cl)
        adv = (lp.detach().sum(-1, keepdim=True) - lp.detach().sum(-1).mean())
        loss = -(torch.exp(lp - lp.detach()) * adv).mean()
        if ref is not None:
            loss = loss + cfg.beta * losses.k3_kl(lp, ref_lp).mean()
        loss.backward()
        return popt.step()

    runtime.compile(ppo_step if kind == "ppo" else grpo_step, name="proxy_train")(
        batch["ids"], batch["mask"])
    runtime.sync()
    # The rollout graphs hold the policy only; everything else stays resident meanwhile.
    resident = [p.grad for m in (policy, value) if m is not None for p in m.parameters()
                if p.grad is not None]
    resident += [p for m in (value, ref, rm) if m is not None for p in m.parameters()]
    resident += [s for o in (popt, vopt) if o is not None for s in o.exp_avg + o.exp_avg_sq]
    outside["generation"] = _device_bytes(resident)
    n_roll = cfg.rollout_micro_batch_size or cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    prompts = _random_rows(vocab, n_roll, pl, mesh, gen)
    generator = Generator(policy, cfg.sampling, eos_token_id=2, pad_token_id=pad, mesh=mesh)
    with ac:  # the whole continuation: the KV cache has the trainer's PL + CL slots
        generator.generate(prompts["ids"], prompts["mask"], max_new_tokens=cl)
    runtime.sync()
    return {"outside": outside}


if __name__ == "__main__":
    if sys.argv[1] in ("dpo", "reward", "ppo", "grpo"):
        print(json.dumps(run_trainer_proxy(sys.argv[1], sys.argv[2], sys.argv[3:])))
    else:
        print(json.dumps(run(ProbeSpec(**json.loads(sys.argv[1])))))
