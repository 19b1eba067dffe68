"""PPO (docs/ppo.md): policy, reference, reward and value models on one mesh, on the rollout
engine (trainers/rollout.py: prompts, generation, split, data position, policy export).

One step = one batch of prompts:

1. roll out ``batch_size * rollouts_per_prompt`` continuations with the static-shape
   generation engine (compiled once, no host sync per token);
2. split the rollout batch into chunks of ``mini_batch_size / accumulate_gradient_steps``
   rows (one compiled graph, so that every later graph sees identically shaped inputs);
3. standard mode: score each chunk (policy and reference log-probs, values, reward with the
   EOS rule), then rewards, GAE and whitening over the whole batch; interleaved mode (the
   paper's JAX code): the same quantities inside each chunk's training step;
4. ``ppo_epochs`` passes over the mini-batches: clipped policy and value losses, one AdamW
   update of each model per mini-batch.

Graphs (standard, no accumulation): generation prefill and decode step, split, score,
advantages, train micro-step, update — a fixed number whatever ``max_continuation_len`` and
the number of steps. Host syncs: none per token or per mini-batch; on logging steps, one wait
after the rollout and one after training, for the rollout/train times (deliberate).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from torchxla_rlhf import checkpoint, runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.configs.ppo import ORACLES
from torchxla_rlhf.data.prompts import PromptDataset
from torchxla_rlhf.algos.losses import ppo_policy_loss, ppo_value_loss
from torchxla_rlhf.algos.optim import AdamW, Schedule
from torchxla_rlhf.algos.rl import (
    apply_eos_penalty,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    ppo_rollout_stats,
    scale_scores,
)
from torchxla_rlhf.trainers.rollout import RolloutTrainer

logger = logging.getLogger(__name__)


class PPOTrainer(RolloutTrainer):
    """The rollout engine (trainers/rollout.py) with a value model: KL-shaped rewards, GAE and
    whitened advantages, clipped policy and value losses, in standard or interleaved mode."""

    @classmethod
    def _prompts(cls, cfg, tokenizer) -> PromptDataset:
        """The training prompts, read and checked to fill a batch (``--check`` and build)."""
        prompts = PromptDataset.build(cfg.train_dataset, tokenizer, add_bos=cfg.prompt_add_bos,
                                      name="train_dataset")
        prompts.report.check_fills_batch(cfg.train_dataset.batch_size, "train_dataset")
        return prompts

    @classmethod
    def check_data(cls, cfg, tokenizer) -> None:
        cls._prompts(cfg, tokenizer)

    def build_prompts(self):
        return self._prompts(self.cfg, self.ctx.tokenizer), None

    def build_models(self) -> None:
        cfg, mesh = self.cfg, self.ctx.mesh
        pad = cfg.tokenizer_pad_token_id
        self.reference = llama.freeze(
            llama.load_causal_lm(cfg.model, mesh, pad_token_id=pad), cfg.model, mesh
        )
        self.reward_model = llama.freeze(
            llama.load_sequence_classifier(cfg.reward_model, mesh, pad_token_id=pad,
                                            role="reward model", require_trained_head=True),
            cfg.reward_model, mesh,
        )
        self.value = llama.load_sequence_classifier(
            cfg.value_model or cfg.reward_model, mesh, pad_token_id=pad, head_seed=cfg.seed
        )
        self.value.train()
        self.oracle = ORACLES[cfg.oracle] if cfg.oracle else None

    def build_optimizers(self, total: int) -> None:
        cfg = self.cfg
        updates_per_step = cfg.ppo_epochs * self.n_mini
        updates_per_epoch = self.steps_per_epoch * updates_per_step
        total_updates = total * updates_per_step
        warmup = math.ceil(cfg.warmup_epochs * updates_per_epoch)
        freeze = math.ceil(cfg.policy_freeze_epochs * updates_per_epoch)
        value_lr = cfg.lr if cfg.value_lr is None else cfg.value_lr
        self.policy_opt = AdamW(
            self.policy.parameters(), cfg.optimizer,
            Schedule(cfg.lr, cfg.lr, warmup, total_updates, decay=False, freeze_steps=freeze),
        )
        self.value_opt = AdamW(
            self.value.parameters(), cfg.optimizer,
            Schedule(value_lr, value_lr, warmup, total_updates, decay=False),
        )

    def trained_models(self):
        return {"policy": (self.policy, self.policy_opt), "value": (self.value, self.value_opt)}

    # -- model quantities (traced) ----------------------------------------------------------

    def _values(self, chunk) -> torch.Tensor:
        """``phi_values [n, CL]``: the value head at the positions predicting each token."""
        with self.autocast():
            v = llama.sequence_classifier_scores(
                self.value, chunk["sequences"], chunk["attention_mask"], every_position=True
            )
        return v[:, self.prompt_len - 1:-1]

    @torch.no_grad()
    def _scores(self, chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """RM reward after the EOS rule ``[n]``, and the score after gain/bias ``[n]``."""
        with self.autocast():
            reward = llama.sequence_classifier_scores(
                self.reward_model, chunk["sequences"], chunk["attention_mask"]
            )
        reward = apply_eos_penalty(
            reward, chunk["sequences"], chunk["attention_mask"],
            eos_token_id=self.eos_id, penalty=self.cfg.missing_eos_penalty,
        )
        return reward, scale_scores(reward, self.cfg.reward_gain, self.cfg.reward_bias)

    def _targets(self, logps, ref_logps, values, reward, score, mask):
        """KL-shaped rewards, GAE, whitened advantages and the rollout metrics (docs/ppo.md),
        over whatever rows they are given (the batch, or one chunk in interleaved mode)."""
        cfg = self.cfg
        rewards, kl = kl_penalized_rewards(logps, ref_logps, mask, score, kl_coef=cfg.kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = masked_whiten(advantages, mask) * mask
        stats = ppo_rollout_stats(
            scores=score, kl=kl, rewards=rewards, values=values, returns=returns,
            advantages=advantages, mask=mask, kl_coef=cfg.kl_coef, reward=reward,
        )
        return advantages, returns, stats

    # -- compiled bodies ---------------------------------------------------------------------

    @torch.no_grad()
    def _score_chunk(self, chunk) -> dict[str, torch.Tensor]:
        """Standard mode, before any update: old log-probs, reference log-probs, old values,
        reward and score of one chunk."""
        reward, score = self._scores(chunk)
        return {
            "old_logps": self._logps(self.policy, chunk),
            "ref_logps": self._logps(self.reference, chunk),
            "old_values": self._values(chunk).float(),
            "reward": reward,
            "score": score,
        }

    def _batch_advantages(self, chunks, scored):
        """Standard mode: rewards, GAE and advantages whitened over the WHOLE rollout batch;
        returns the training chunks (rollout + targets) and the rollout metrics."""
        cat = lambda key, src: torch.cat([s[key] for s in src], dim=0)  # noqa: E731
        mask = cat("continuation_mask", chunks).float()
        advantages, returns, stats = self._targets(
            cat("old_logps", scored), cat("ref_logps", scored), cat("old_values", scored) * mask,
            cat("reward", scored), cat("score", scored), mask,
        )
        adv = torch.chunk(advantages, self.n_chunks, dim=0)
        ret = torch.chunk(returns, self.n_chunks, dim=0)
        out = []
        for i, (chunk, s) in enumerate(zip(chunks, scored)):
            out.append({
                **chunk, "old_logps": s["old_logps"], "old_values": s["old_values"],
                "advantages": adv[i].clone(), "returns": ret[i].clone(),
            })
        return out, runtime.pack_scalars(stats)

    def _losses(self, chunk, pi_logps, phi_values, old_logps, old_values, advantages, returns):
        cfg = self.cfg
        mask = chunk["continuation_mask"].float()
        pg_loss, pm = ppo_policy_loss(pi_logps, old_logps, advantages, mask, cliprange=cfg.cliprange)
        vf_loss, vm = ppo_value_loss(phi_values, old_values, returns, mask,
                                     cliprange_value=cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * vf_loss
        (loss / self.accumulate).backward()
        return {"ppo/loss/total": loss.detach(), **pm, **vm}

    def _micro_step(self, chunk) -> dict[str, torch.Tensor]:
        """The training micro-step of ``mode`` (one compiled graph either way)."""
        if self.cfg.mode == "interleaved":
            return self._interleaved_micro(chunk)
        return self._standard_micro(chunk)

    def _standard_micro(self, chunk) -> dict[str, torch.Tensor]:
        pi_logps = self._logps(self.policy, chunk)
        phi_values = self._values(chunk).float()
        return runtime.pack_scalars(self._losses(
            chunk, pi_logps, phi_values, chunk["old_logps"], chunk["old_values"],
            chunk["advantages"], chunk["returns"]))

    def _interleaved_micro(self, chunk) -> dict[str, torch.Tensor]:
        """The paper's JAX step: reward, "old" log-probs (= current, so the ratio is 1),
        reference log-probs, values and advantages of this chunk, then the update's loss."""
        mask = chunk["continuation_mask"].float()
        pi_logps = self._logps(self.policy, chunk)
        phi_values = self._values(chunk).float()
        with torch.no_grad():
            ref_logps = self._logps(self.reference, chunk)
        reward, score = self._scores(chunk)
        old_logps, old_values = pi_logps.detach(), phi_values.detach() * mask
        advantages, returns, stats = self._targets(old_logps, ref_logps, old_values, reward, score, mask)
        metrics = self._losses(chunk, pi_logps, phi_values, old_logps, old_values, advantages, returns)
        return runtime.pack_scalars({**metrics, **stats, "rows/reward": reward})

    def _update_step(self) -> dict[str, torch.Tensor]:
        pm = self.policy_opt.step()
        vm = self.value_opt.step()
        return runtime.pack_scalars({
            "lr/policy": pm["learning_rate"], "lr/value": vm["learning_rate"],
            "ppo/policy/gradient_norm": pm["gradient_norm"],
            "ppo/val/gradient_norm": vm["gradient_norm"],
        })

    # -- the step ----------------------------------------------------------------------------

    def train_step(self) -> dict:
        cfg = self.cfg
        timed = self.tracker.should_log(self.step + 1)
        t0 = time.perf_counter()
        rollout, chunks = self._rollout()
        metrics: dict = {}
        if timed:
            runtime.wait()  # deliberate host sync on logging steps: the rollout time
            metrics["time/rollout_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()

        row_rewards: list[torch.Tensor] = []
        if cfg.mode == "standard" or cfg.generate_only:
            scored = [self._score(c) for c in chunks]
            row_rewards = [s["reward"] for s in scored]
            chunks, stats = self._advantages(chunks, scored)
            metrics.update(stats)
        updates = [] if cfg.generate_only else self._updates(cfg.ppo_epochs, chunks)
        for i, (micro, update) in enumerate(updates):
            for out in micro + [update]:
                out = dict(out)
                if "rows/reward" in out:
                    reward = out.pop("rows/reward")
                    if i < self.n_mini:  # the first PPO epoch covers every rollout once
                        row_rewards.append(reward)
                self._append_metrics(metrics, out)
        metrics["objective/kl_coef"] = cfg.kl_coef
        if timed:
            runtime.wait()  # deliberate: the training time, logging steps only
            metrics["time/train_s"] = time.perf_counter() - t1
            self._log_samples(self.step + 1, rollout, row_rewards)
        return metrics

    def _log_samples(self, step: int, rollout, row_rewards) -> None:
        """The (prompt, response, reward) table, and the oracle's mean score over all
        responses, read on the host in a step closure once the graphs have run."""

        def record(seqs, cmask, idx, rewards):
            # A step closure: the graphs have run, so these are copies (logging steps only).
            seqs, cmask, idx = seqs.cpu(), cmask.cpu(), idx.cpu()
            reward = torch.cat([r.cpu() for r in rewards]) if rewards else None
            responses = self._completions(seqs, cmask)
            columns = ["prompt", "response", "reward"]
            rows = self._sample_rows(idx, responses, reward)
            if self.oracle is not None:
                oracle = [self.oracle(r) for r in responses]
                columns.append("oracle")
                rows = [row + [oracle[i]] for i, row in enumerate(rows)]
                extra = {"oracle/score_mean": sum(oracle) / len(oracle)}
                self.tracker.log(step, extra)
            self.tracker.log_table(step, "samples", columns, rows)

        runtime.add_step_closure(
            record, args=(rollout["sequences"], rollout["continuation_mask"], rollout["index"], row_rewards)
        )

    def save(self, path: str) -> None:
        """The policy at ``path`` and the value model at ``<path>-value``."""
        super().save(path)
        checkpoint.save_hf_checkpoint(self.value, self.ctx.tokenizer, f"{path}-value",
                                      save_dtype=llama.DTYPES[self.cfg.save_dtype],
                                      is_main_process=self.ctx.is_main)
