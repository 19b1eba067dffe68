"""GRPO and RLOO (critic-free RL with group advantages) on the rollout engine (trainers/rollout.py).

One step = one batch of prompts, each repeated G = ``rollouts_per_prompt`` times:

1. roll out ``batch_size * G`` completions with the static-shape generation engine (one XLA
   While per piece, no host sync per token) and split them into equal chunks (micro-batches);
2. decode the completions on the host and compute the verifiable / user rewards there: ONE
   device-to-host transfer of the rollout's tokens per step (the deliberate host work of this
   trainer), and one upload of the ``[N]`` rewards; a reward model, when configured, scores
   on the device;
3. per chunk (compiled once): old log-probs (only when ``num_iterations > 1``), reference
   log-probs (only when ``beta > 0``), the reward model's score;
4. group advantages over the whole batch (GRPO: ``(r - mean) / (std + eps)``; RLOO:
   leave-one-out), equal-reward groups masked to 0 with their fraction logged;
5. ``num_iterations`` passes over the mini-batches: the clipped ratio loss with TRL's
   aggregation, one AdamW update per mini-batch.

Graphs: generation, split, score, advantages, train micro-step, update (and the eval
generation): a fixed set whatever the number of steps; none compiles after the first step.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.configs.sections import SamplingConfig
from torchxla_rlhf.data.rlvr import build_rlvr_prompts
from torchxla_rlhf.generation import Generator
from torchxla_rlhf.algos.losses import grpo_policy_loss, rloo_policy_loss
from torchxla_rlhf.algos.optim import AdamW, Schedule
from torchxla_rlhf.algos.verifiers import Verifiers, format_reward
from torchxla_rlhf.algos.rl import (
    apply_eos_penalty,
    group_advantages,
    overlong_penalty,
    rloo_advantages,
    sequence_kl_penalty,
)
from torchxla_rlhf.trainers.base import make_loader
from torchxla_rlhf.trainers.rollout import RolloutTrainer

logger = logging.getLogger(__name__)


def _record(dataset, i: int) -> dict:
    """What a reward function gets of example ``i``: its record's fields and origin."""
    return {**(dataset.fields[i] or {}), "origin": dataset.origins[i]}


def _call_reward_functions(cfg, verifiers: Verifiers | None, completions: list[str],
                           records: list[dict]) -> tuple[torch.Tensor, dict]:
    """``[N]`` float32 rewards of the verifier and format terms (``cfg``: the ``rewards``
    section), their means and the verifiers' health."""
    total = torch.zeros(len(completions), dtype=torch.float32)
    metrics: dict = {}
    if verifiers is not None:
        scores, health = verifiers.score(completions, records)
        values = torch.tensor(scores, dtype=torch.float32)
        total += cfg.verifier_weight * values
        metrics["rewards/verifier_mean"] = float(values.mean())
        metrics.update(health)
    if cfg.format_weight:
        values = torch.tensor(format_reward(completions, records), dtype=torch.float32)
        total += cfg.format_weight * values
        metrics["rewards/format_mean"] = float(values.mean())
    return total, metrics


class GRPOTrainer(RolloutTrainer):
    """The rollout engine (prompt pieces, generation, chunk split, log-probs, data position,
    export) with host rewards, group advantages and the clipped-ratio loss; no value model."""

    name = "grpo"

    @classmethod
    def _datasets(cls, cfg, tokenizer, verifiers: Verifiers | None):
        """Training and held-out prompts with their records' fields (RLVR schema); a record
        that its verifier cannot score (no verifier for its dataset, no or an unreadable
        ground_truth) fails here, naming its file and line."""
        check = verifiers.check_record if verifiers is not None else None
        train = build_rlvr_prompts(cfg.train_dataset, tokenizer, add_bos=cfg.prompt_add_bos,
                                   require_ground_truth=False, check_record=check,
                                   name="train_dataset")
        train.report.check_fills_batch(cfg.train_dataset.batch_size, "train_dataset")
        held_out = None
        if cfg.eval_dataset is not None:
            held_out = build_rlvr_prompts(cfg.eval_dataset, tokenizer, add_bos=cfg.prompt_add_bos,
                                          require_ground_truth=False, check_record=check,
                                          name="eval_dataset")
        return train, held_out

    @classmethod
    def _task(cls, cfg, tokenizer):
        """The datasets and the verifier, checked before any weights load (``--check`` runs
        this, :meth:`build` uses what it returns): the data read and validated, the verifier
        imported and every reward function called on the first record of each dataset."""
        verifiers = Verifiers.from_config(cfg.rewards)
        train, held_out = cls._datasets(cfg, tokenizer, verifiers)
        for dataset in (train, held_out):
            if dataset is not None and len(dataset):
                # An empty completion: what a rollout that stops at once hands the functions.
                _call_reward_functions(cfg.rewards, verifiers, [""], [_record(dataset, 0)])
        return train, held_out, verifiers

    @classmethod
    def check_data(cls, cfg, tokenizer) -> None:
        cls._task(cfg, tokenizer)

    def build_prompts(self):
        # Resolved before any weights load: an unknown verifier or function fails in seconds.
        prompts, eval_prompts, self.verifiers = self._task(self.cfg, self.ctx.tokenizer)
        return prompts, eval_prompts

    def build_models(self) -> None:
        cfg, mesh = self.cfg, self.ctx.mesh
        if (cfg.advantage == "grpo" and cfg.importance_sampling_level == "sequence"
                and cfg.loss_type != "grpo"):
            logger.warning("importance_sampling_level=sequence with loss_type=%s sums per-token "
                           "terms, weighting each sequence by its length; GSPO's objective is "
                           "loss_type=grpo", cfg.loss_type)
        pad = cfg.tokenizer_pad_token_id
        # No KL term, no reference: its weights are never loaded (nor planned for).
        self.reference = (llama.freeze(llama.load_causal_lm(cfg.model, mesh, pad_token_id=pad),
                                        cfg.model, mesh) if cfg.needs_reference else None)
        rm_cfg = cfg.reward_model
        self.reward_model = (llama.freeze(llama.load_sequence_classifier(
            rm_cfg, mesh, pad_token_id=pad, role="reward model", require_trained_head=True),
                                           rm_cfg, mesh) if rm_cfg is not None else None)
        self.eval_generator = Generator(self.policy, SamplingConfig(greedy=True),
                                        eos_token_id=self.eos_id, pad_token_id=pad, mesh=mesh)
        # Old log-probs from before the updates: for several passes, or for RLOO's KL reward.
        self.keep_old = cfg.num_iterations > 1 or (
            cfg.advantage == "rloo" and cfg.kl_in == "reward" and cfg.needs_reference)
        self.group = cfg.rollouts_per_prompt

    def build_optimizers(self, total: int) -> None:
        cfg = self.cfg
        updates_per_step = cfg.num_iterations * self.n_mini
        warmup = math.ceil(cfg.warmup_epochs * self.steps_per_epoch * updates_per_step)
        total_updates = total * updates_per_step
        self.policy_opt = AdamW(self.policy.parameters(), cfg.optimizer,
                                Schedule(cfg.lr, cfg.lr, warmup, total_updates, decay=False))
        # The optimizer's parameters rewritten in place once, in the first step (train_step).
        self._materialize = runtime.compile(self._materialize_params, name="grpo_materialize_params")
        self._materialized = False

    @torch.no_grad()
    def _materialize_params(self) -> None:
        for p in self.policy_opt.params:
            p.copy_(p * 1.0)

    def trained_models(self):
        return {"policy": (self.policy, self.policy_opt)}

    # -- host rewards --------------------------------------------------------------------------

    def _host_rewards(self, dataset, completions: list[str], index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``[N]`` float32 rewards of the verifier and format terms, and their metrics."""
        # ``index`` is the host copy of the step's prompt indices (read once per step with the
        # completions' text, which the verifiers need on the host anyway).
        records = [_record(dataset, int(i)) for i in index.tolist()]
        t0 = time.perf_counter()
        total, metrics = _call_reward_functions(self.cfg.rewards, self.verifiers, completions, records)
        metrics["time/reward_fn_s"] = time.perf_counter() - t0
        return total, metrics

    # -- compiled bodies -----------------------------------------------------------------------

    @torch.no_grad()
    def _score_chunk(self, chunk) -> dict[str, torch.Tensor]:
        out = {}
        if self.keep_old:
            out["old_logps"] = self._logps(self.policy, chunk)
        if self.reference is not None:
            out["ref_logps"] = self._logps(self.reference, chunk)
        if self.reward_model is not None:
            with self.autocast():
                out["rm_score"] = llama.sequence_classifier_scores(
                    self.reward_model, chunk["sequences"], chunk["attention_mask"]).float()
        if not out:  # every graph needs an output: the response lengths (cheap)
            out["lengths"] = chunk["continuation_mask"].sum(dim=1)
        return out

    def _batch_advantages(self, chunks, scored, host_rewards):
        """Rewards (host terms + reward model, EOS and overlong rules, RLOO's KL), group
        advantages over the whole batch, and per-chunk training inputs."""
        cfg = self.cfg
        cat = lambda key, src: torch.cat([s[key] for s in src], dim=0)  # noqa: E731
        mask = cat("continuation_mask", chunks).float()
        rewards = host_rewards.float()
        stats = {}
        if self.reward_model is not None:
            rm = cat("rm_score", scored)
            stats["rewards/reward_model_mean"] = rm.mean()
            rewards = rewards + cfg.rewards.reward_model_weight * rm
        rewards = apply_eos_penalty(rewards, cat("sequences", chunks), cat("attention_mask", chunks),
                                    eos_token_id=self.eos_id, penalty=cfg.missing_eos_penalty)
        lengths = mask.sum(dim=1)
        if cfg.overlong_cache_len:
            rewards = rewards + overlong_penalty(lengths, max_len=cfg.max_continuation_len,
                                                 cache_len=cfg.overlong_cache_len)
        stats["reward/mean"] = rewards.mean()
        stats["reward/std"] = rewards.std(correction=1)
        rloo = cfg.advantage == "rloo"
        if self.reference is not None and rloo and cfg.kl_in == "reward":
            # First-order log-ratio of the sampling policy, summed per completion (TRL's RLOO).
            kl = sequence_kl_penalty(cat("old_logps", scored), cat("ref_logps", scored), mask,
                                     beta=cfg.beta)
            rewards = rewards - kl
            stats["objective/kl_penalty_mean"] = kl.mean()
        if rloo:
            adv, equal = rloo_advantages(rewards, self.group, normalize=cfg.normalize_advantages,
                                         eps=cfg.eps)
        else:
            adv, equal = group_advantages(rewards, self.group, scale_rewards=cfg.scale_rewards,
                                          eps=cfg.eps)
        stats["frac_reward_zero_std"] = equal.mean()
        stats["advantages/abs_mean"] = adv.abs().mean()
        stats["tokens/completion_len_mean"] = lengths.mean()
        # dapo: the generation batch's token count per micro-batch (see grpo_policy_loss).
        num_items = mask.sum().clamp(min=1.0) / self.n_chunks
        adv_chunks = torch.chunk(adv, self.n_chunks, dim=0)
        out = []
        for i, (chunk, s) in enumerate(zip(chunks, scored)):
            item = {**chunk, "advantages": adv_chunks[i].clone(), "num_items": num_items.clone()}
            for key in ("old_logps", "ref_logps"):
                if key in s:
                    item[key] = s[key]
            out.append(item)
        return out, runtime.pack_scalars(stats)

    def _micro_step(self, chunk) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        mask = chunk["continuation_mask"].float()
        pi = self._logps(self.policy, chunk)
        old = chunk["old_logps"] if cfg.num_iterations > 1 else pi.detach()
        ref = chunk.get("ref_logps")
        if cfg.advantage == "rloo":
            beta = cfg.beta if cfg.kl_in == "loss" else 0.0
            loss, metrics = rloo_policy_loss(pi, old, chunk["advantages"], mask, epsilon=cfg.epsilon,
                                             epsilon_high=cfg.epsilon_high, beta=beta, ref_logps=ref)
        else:
            loss, metrics = grpo_policy_loss(
                pi, old, chunk["advantages"], mask, epsilon=cfg.epsilon,
                epsilon_high=cfg.epsilon_high, importance_sampling_level=cfg.importance_sampling_level,
                loss_type=cfg.loss_type, beta=cfg.beta, ref_logps=ref,
                max_completion_length=cfg.max_continuation_len, num_items=chunk["num_items"])
        (loss / self.accumulate).backward()
        return runtime.pack_scalars(metrics)

    def _update_step(self) -> dict[str, torch.Tensor]:
        pm = self.policy_opt.step()
        return runtime.pack_scalars({"lr/policy": pm["learning_rate"],
                                     "grpo/gradient_norm": pm["gradient_norm"]})

    # -- the step ------------------------------------------------------------------------------

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        rollout, chunks = self._rollout()
        scored = [self._score(c) for c in chunks]
        if not self._materialized:
            # Once, in the first step: the weights are still the loaded buffers, which the
            # first update graph would not donate (while later updates donate their previous
            # outputs), so with one update per step the update compiled again at step 2. An
            # in-place rewrite here gives them fresh buffers: one update graph for the run.
            self._materialize()
            self._materialized = True
        # The one deliberate host sync of a step: the rollout's tokens come to the host to be
        # decoded and scored by the reward functions (a Python callable cannot run on device).
        seqs = runtime.to_cpu(rollout["sequences"])
        cmask = runtime.to_cpu(rollout["continuation_mask"])
        index = runtime.to_cpu(rollout["index"])
        metrics: dict = {"time/rollout_s": time.perf_counter() - t0}
        completions = self._completions(seqs, cmask)
        host_rewards, reward_metrics = self._host_rewards(self.prompts, completions, index)
        metrics.update(reward_metrics)
        device_rewards = runtime.batch_to_device({"r": host_rewards}, self.ctx.mesh)["r"]
        chunks, stats = self._advantages(chunks, scored, device_rewards)
        metrics.update(stats)
        for micro, update in self._updates(cfg.num_iterations, chunks):
            for out in micro + [update]:
                self._append_metrics(metrics, out)
        if self.tracker.should_log(self.step + 1):
            rows = self._sample_rows(index, completions, host_rewards)
            self.tracker.log_table(self.step + 1, "samples", ["prompt", "completion", "reward"], rows)
        return metrics

    def evaluate(self) -> dict:
        """Mean reward (host terms) of greedy completions of the held-out prompts."""
        if self.eval_prompts is None:
            return {}
        bs = self.cfg.train_dataset.batch_size
        loader = make_loader(self.eval_prompts, self.cfg.train_dataset, self.ctx.mesh, train=False)
        total, count = 0.0, 0
        with self.autocast():
            for batch in loader:
                dev = runtime.batch_to_device(batch, self.ctx.mesh)
                gen = self.eval_generator.generate(dev["input_ids"], dev["attention_mask"],
                                                   self.cfg.max_continuation_len, seed=0)
                completions = self._completions(runtime.to_cpu(gen.sequences),
                                                runtime.to_cpu(gen.continuation_mask))
                rewards, _ = self._host_rewards(self.eval_prompts, completions, batch["index"])
                total += float(rewards.sum())
                count += len(completions)
        if not count:
            logger.warning("eval_dataset has fewer prompts than one batch (%d): nothing evaluated", bs)
            return {}
        return {"reward_mean": total / count}
