"""Trace a trainer's graphs at the config's real widths, without memory and without running.

    CPU_NUM_DEVICES=N PJRT_DEVICE=CPU python -m torchxla_rlhf.aot.trace SPEC.json

The torch side of ``plan --compile`` (one process per depth: the device count is fixed per
process). SPEC: ``{"config": PATH, "overrides": [...], "mesh": "1,4,16", "layers": 2,
"shapes": {key: Shape fields}, "out": DIR}``. Every model the trainer puts on the mesh is
built with the config's shape at ``layers`` decoder layers, its weights, AdamW moments and
inputs placeholders (``runtime.GraphCapture``), and the trainer's phases are traced as the
trainers compile them (:func:`trainer_graphs` with ``split``): a training micro-step
(forward and backward adding into the gradients; PPO: policy and value model; GRPO/RLOO: the
policy with the k3 KL to the reference when ``beta > 0``), the AdamW update, and for PPO and
GRPO the rollout through
the trainers' own :class:`~torchxla_rlhf.generation.Generator` (``generation_prefill`` and
the decode ``While``, ``generation_decode_loop``; in the generation layout first its reshard,
``generation_reshard``). Each graph lands in ``DIR`` as ``NAME.hlo.pb`` + ``NAME.json`` for
:mod:`torchxla_rlhf.aot.compile` (the json names the traced mesh and, for the generation
layout, its ``tp / mp``: ``layout_f``).
"""

from __future__ import annotations

import json
import os
import sys

import torch

TRAIN_GRAPH = "proxy_train"
"""Forward, backward and AdamW in one graph (``bench/memory.py``'s XLA:CPU proxies)."""
MICRO_GRAPH, UPDATE_GRAPH = "train_micro_step", "train_update"
"""The trainers' own split (``PairTrainer``, PPO, GRPO): a micro-step's forward and backward
adding into the gradients of the earlier micro-steps, then the AdamW update; what
``plan --compile`` traces."""
ROLLOUT_GRAPHS = ("generation_prefill", "generation_decode_loop")


def random_rows(vocab: int, rows: int, seq: int, mesh, gen: torch.Generator) -> dict:
    """``rows`` random token rows of ``seq`` with a full mask, on the mesh (batch-sharded)."""
    from torchxla_rlhf import runtime

    ids = torch.randint(3, vocab, (rows, seq), generator=gen)
    return runtime.batch_to_device({"ids": ids, "mask": torch.ones_like(ids)}, mesh)


def logps(model, ids, mask, positions: int | None = None) -> torch.Tensor:
    """Per-token log-probs of ``ids`` (the last ``positions`` of them), as the trainers take
    them: LM head on the predicting positions, fp32 log-softmax, gather."""
    from torchxla_rlhf.models import llama

    hidden = model.model(input_ids=ids, attention_mask=mask,
                         position_ids=llama.position_ids_from_mask(mask), use_cache=False).last_hidden_state
    start = ids.shape[1] - (positions or ids.shape[1] - 1) - 1
    logits = model.lm_head(hidden[:, start:-1]).float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, start + 1:, None]).squeeze(-1)


class ModelSource:
    """Where :func:`trainer_graphs` gets its models: loaded from the config (the default,
    what ``bench/memory.py`` runs), or placeholders (:class:`PlaceholderSource`)."""

    def __init__(self, cfg, mesh):
        self.cfg, self.mesh = cfg, mesh

    def causal_lm(self, key: str):
        from torchxla_rlhf.models import llama

        return llama.load_causal_lm(getattr(self.cfg, key), self.mesh,
                                     pad_token_id=self.cfg.tokenizer_pad_token_id)

    def classifier(self, key: str):
        from torchxla_rlhf.models import llama

        return llama.load_sequence_classifier(getattr(self.cfg, key), self.mesh,
                                               pad_token_id=self.cfg.tokenizer_pad_token_id)

    def optimizer(self, model):
        from torchxla_rlhf.algos.optim import AdamW, Schedule

        model.train()
        return AdamW(model.parameters(), self.cfg.optimizer, Schedule.linear(1e-5, 0.0, 0.0, 10))

    def built(self) -> None:
        """Everything is built: put it on the device before the first graph."""
        from torchxla_rlhf import runtime

        runtime.sync()


class PlaceholderSource(ModelSource):
    """Models of the given shapes at ``layers`` decoder layers whose weights and optimizer
    state are placeholders of ``capture`` (nothing allocated, nothing read)."""

    def __init__(self, cfg, mesh, capture, shapes: dict, layers: int):
        super().__init__(cfg, mesh)
        self.capture, self.shapes, self.layers = capture, shapes, layers

    def _build(self, key: str, head: str):
        from torchxla_rlhf.models import llama

        config = llama.llama_config(self.shapes[key], self.layers, self.cfg.tokenizer_pad_token_id)
        return llama.placeholder_model(head, config, self.mesh, getattr(self.cfg, key), self.capture)

    def causal_lm(self, key: str):
        return self._build(key, "causal")

    def classifier(self, key: str):
        return self._build(key, "classifier")

    def optimizer(self, model):
        opt = super().optimizer(model)
        # The moments stand for the parameters' shardings (AdamW allocates them so), and so
        # do the gradients a later micro-step adds into.
        like = self.capture.placeholder_like
        opt.exp_avg = [like(m, like=p) for m, p in zip(opt.exp_avg, opt.params)]
        opt.exp_avg_sq = [like(m, like=p) for m, p in zip(opt.exp_avg_sq, opt.params)]
        for p in opt.params:
            p.grad = like(p)
        return opt

    def built(self) -> None:
        from torchxla_rlhf.runtime.capture import live_xla_tensors

        # The set-up's own work (frozen weights cast, counters) becomes placeholders.
        self.capture.record(live_xla_tensors(), name="setup")
        self.capture.graphs.pop()


def trainer_graphs(kind: str, cfg, mesh, source: ModelSource, split: bool = False) -> dict[str, int]:
    """Run the ``kind`` trainer's phases once on ``mesh`` with models from ``source``: the
    training step (one graph, :data:`TRAIN_GRAPH`; with ``split``, the trainers' micro-step
    and update graphs, :data:`MICRO_GRAPH` and :data:`UPDATE_GRAPH`) and, for PPO and GRPO,
    a rollout (:data:`ROLLOUT_GRAPHS`). Returns the bytes each device holds outside the
    rollout's graphs while it runs (gradients, optimizer state, value and frozen models),
    keyed ``"generation"`` (PPO and GRPO only)."""
    from torchxla_rlhf import runtime
    from torchxla_rlhf.algos import losses
    from torchxla_rlhf.models import llama
    from torchxla_rlhf.generation import Generator

    gen = torch.Generator().manual_seed(0)
    vocab = getattr(cfg, "model").tiny.vocab_size if cfg.model.name_or_path == "tiny" else None
    ac = runtime.autocast(cfg.model.compute_dtype, cfg.model.param_dtype)
    outside: dict[str, int] = {}
    if kind in ("dpo", "reward"):
        rows, seq = 2 * cfg.train_dataset.batch_size, cfg.train_dataset.seq_length
        if kind == "dpo":
            policy = source.causal_lm("model")
            ref = llama.freeze(source.causal_lm("model"), cfg.model, mesh)
        else:
            policy = source.classifier("model")
        opt = source.optimizer(policy)
        source.built()
        batch = random_rows(vocab or policy.config.vocab_size, rows, seq, mesh, gen)

        def step(ids, mask):
            with ac:
                if kind == "dpo":
                    with torch.no_grad():
                        ref_lp = logps(ref, ids, mask).sum(-1)
                    z = logps(policy, ids, mask).sum(-1) - ref_lp
                else:
                    z = llama.sequence_classifier_scores(policy, ids, mask)
            loss = -torch.nn.functional.logsigmoid(z.view(2, -1)[0] - z.view(2, -1)[1]).mean()
            loss.backward()
            return loss.detach() if split else opt.step()

        _train(step, [opt], split, batch)
        return outside

    pad = cfg.tokenizer_pad_token_id
    policy = source.causal_lm("model")
    popt = source.optimizer(policy)
    value = vopt = rm = None  # GRPO: no value or reward model
    if kind == "ppo":
        value = source.classifier("value_model" if cfg.value_model is not None else "reward_model")
        vopt = source.optimizer(value)
        rm = llama.freeze(source.classifier("reward_model"), cfg.reward_model, mesh)
    ref = (llama.freeze(source.causal_lm("model"), cfg.model, mesh)
           if kind == "ppo" or cfg.needs_reference else None)
    source.built()
    vocab = vocab or policy.config.vocab_size
    pl, cl = cfg.train_dataset.seq_length, cfg.max_continuation_len
    chunk = cfg.mini_batch_size // cfg.optimizer.accumulate_gradient_steps
    batch = random_rows(vocab, chunk, pl + cl, mesh, gen)

    def ppo_step(ids, mask):
        with ac:
            with torch.no_grad():
                ref_lp = logps(ref, ids, mask, cl)
                score = llama.sequence_classifier_scores(rm, ids, mask)
            lp = logps(policy, ids, mask, cl)
            v = llama.sequence_classifier_scores(value, ids, mask, every_position=True)[:, pl - 1:-1]
        adv = (score[:, None] - ref_lp).detach()
        loss = -(torch.exp(lp - lp.detach()) * adv).mean() + ((v.float() - adv) ** 2).mean()
        loss.backward()
        return loss.detach() if split else (popt.step(), vopt.step())

    def grpo_step(ids, mask):
        # A group-relative advantage per row and, with beta > 0, the k3 KL to the reference.
        with ac:
            lp = logps(policy, ids, mask, cl)
            if ref is not None:
                with torch.no_grad():
                    ref_lp = logps(ref, ids, mask, cl)
        adv = (lp.detach().sum(-1, keepdim=True) - lp.detach().sum(-1).mean())
        loss = -(torch.exp(lp - lp.detach()) * adv).mean()
        if ref is not None:
            loss = loss + cfg.beta * losses.k3_kl(lp, ref_lp).mean()
        loss.backward()
        return loss.detach() if split else popt.step()

    _train(ppo_step if kind == "ppo" else grpo_step, [o for o in (popt, vopt) if o is not None],
           split, batch)
    # The rollout graphs hold the policy only; everything else stays resident meanwhile.
    resident = [p.grad for m in (policy, value) if m is not None for p in m.parameters()
                if p.grad is not None]
    resident += [p for m in (value, ref, rm) if m is not None for p in m.parameters()]
    resident += [s for o in (popt, vopt) if o is not None for s in o.exp_avg + o.exp_avg_sq]
    outside["generation"] = sum(runtime.shard_nbytes(t) for t in resident)
    n_roll = cfg.rollout_micro_batch_size or cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
    prompts = random_rows(vocab, n_roll, pl, mesh, gen)
    generator = Generator(policy, cfg.sampling, eos_token_id=2, pad_token_id=pad, mesh=mesh)
    with ac:  # the whole continuation: the KV cache has the trainer's PL + CL slots
        generator.generate(prompts["ids"], prompts["mask"], max_new_tokens=cl)
    runtime.sync()
    return outside


def _train(step, optimizers: list, split: bool, batch: dict) -> None:
    """The training step's graphs: ``step`` with its AdamW update in one graph, or (``split``)
    the micro-step then the update, as the trainers compile them."""
    from torchxla_rlhf import runtime

    if not split:
        runtime.compile(step, name=TRAIN_GRAPH)(batch["ids"], batch["mask"])
    else:
        runtime.compile(step, name=MICRO_GRAPH)(batch["ids"], batch["mask"])
        runtime.compile(lambda: [o.step() for o in optimizers], name=UPDATE_GRAPH)()
    runtime.sync()


def trace(spec: dict) -> list[str]:
    """Trace the graphs ``spec`` describes (module docstring) into ``spec["out"]``; returns
    the graph names written."""
    from torchxla_rlhf import runtime
    from torchxla_rlhf.preflight.shapes import Shape
    from torchxla_rlhf.runtime.capture import GraphCapture
    from torchxla_rlhf.trainers import registry

    cfg = registry.load(spec["config"], [*spec.get("overrides", []), f"mesh_dim={spec['mesh']}"])
    mesh = runtime.make_mesh(cfg.mesh_dim)
    shapes = {k: Shape(**v) for k, v in spec["shapes"].items()}
    os.makedirs(spec["out"], exist_ok=True)
    capture = GraphCapture(mesh)
    with capture:
        trainer_graphs(cfg.trainer, cfg, mesh, PlaceholderSource(cfg, mesh, capture, shapes, spec["layers"]),
                       split=spec.get("split", True))
    # The generation layout's (data, tp) mesh splits fsdp by f = tp / mp (aot.compile.split_fsdp).
    sampling = getattr(cfg, "sampling", None)
    layout_f = 1
    if sampling is not None and sampling.gather_weights == "generation_layout":
        layout_f = (sampling.generation_tp or mesh.mp * mesh.fsdp) // mesh.mp
    names = []
    for g in capture.graphs:
        if g.name in names:  # a graph launched twice is written once
            continue
        names.append(g.name)
        with open(os.path.join(spec["out"], f"{g.name}.hlo.pb"), "wb") as f:
            f.write(g.hlo)
        with open(os.path.join(spec["out"], f"{g.name}.json"), "w") as f:
            json.dump({"name": g.name, "mesh": [mesh.dp, mesh.fsdp, mesh.mp], "layers": spec["layers"],
                       "arg_shardings": g.arg_shardings, "donors": g.donors, "layout_f": layout_f}, f)
    return names


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    print(json.dumps({"graphs": trace(spec)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
