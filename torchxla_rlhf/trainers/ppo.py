"""PPO (docs/ppo.md): policy, reference, reward and value models on one mesh.

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
from torchxla_rlhf.generation import Generator
from torchxla_rlhf.algos.losses import label_logps, ppo_policy_loss, ppo_value_loss
from torchxla_rlhf.algos.optim import AdamW, Schedule
from torchxla_rlhf.algos.rl import (
    apply_eos_penalty,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    position_ids_from_mask,
    ppo_rollout_stats,
    scale_scores,
)
from torchxla_rlhf.trainers.base import Trainer, make_loader, rollout_sampling

logger = logging.getLogger(__name__)

ROLLOUT_KEYS = ("sequences", "attention_mask", "continuation_mask")


class PPOTrainer(Trainer):
    @classmethod
    def check_data(cls, cfg, tokenizer) -> None:
        prompts = PromptDataset.build(cfg.train_dataset, tokenizer, add_bos=cfg.prompt_add_bos,
                                      name="train_dataset")
        prompts.report.check_fills_batch(cfg.train_dataset.batch_size, "train_dataset")

    def build(self) -> int:
        cfg, mesh, tok = self.cfg, self.ctx.mesh, self.ctx.tokenizer
        self.prompts = PromptDataset.build(cfg.train_dataset, tok, add_bos=cfg.prompt_add_bos,
                                           name="train_dataset")
        self.prompts.report.check_fills_batch(cfg.train_dataset.batch_size, "train_dataset")
        self.data_reports = {"train": self.prompts.report}
        self.loader = make_loader(self.prompts, cfg.train_dataset, mesh)
        self.steps_per_epoch = self.loader.steps_per_epoch
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        total = cfg.total_steps or max(1, math.floor(self.steps_per_epoch * cfg.num_epochs))

        pad = cfg.tokenizer_pad_token_id
        self.eos_id = tok.eos_token_id
        self.policy = llama.load_causal_lm(cfg.model, mesh, pad_token_id=pad)
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
        self.policy.train()
        self.value.train()
        self.generator = Generator(
            self.policy, rollout_sampling(cfg, mesh), eos_token_id=self.eos_id,
            pad_token_id=pad, mesh=mesh,
        )

        # Shapes of a step: N rollouts = n_mini mini-batches = n_chunks chunks (micro-batches).
        self.n_rollouts = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
        self.accumulate = cfg.optimizer.accumulate_gradient_steps
        self.n_mini = self.n_rollouts // cfg.mini_batch_size
        self.n_chunks = self.n_mini * self.accumulate
        self.rollout_micro = cfg.rollout_micro_batch_size or self.n_rollouts
        self.prompt_len = cfg.train_dataset.seq_length
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
        self.oracle = ORACLES[cfg.oracle] if cfg.oracle else None

        self._split = runtime.compile(self._split_rollout, name="ppo_split")
        self._score = runtime.compile(self._score_chunk, name="ppo_score")
        self._advantages = runtime.compile(self._batch_advantages, name="ppo_advantages")
        self._micro = runtime.compile(
            self._interleaved_micro if cfg.mode == "interleaved" else self._standard_micro,
            name="ppo_micro_step",
        )
        self._update = runtime.compile(self._update_step, name="ppo_update")
        return total

    def trained_models(self):
        return {"policy": (self.policy, self.policy_opt), "value": (self.value, self.value_opt)}

    def data_state(self):
        # Prompts are a function of the step (seeded order per epoch): record what must match.
        return {"steps_per_epoch": self.steps_per_epoch, "loader": self.loader.state_dict()}

    def load_data_state(self, state):
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ValueError(f"resume: the checkpoint ran {state.get('steps_per_epoch')} steps per "
                             f"epoch, this run {self.steps_per_epoch} (prompt data or batch size changed)")
        self.loader.load_state_dict(state["loader"])  # checks seed, shuffle and sizes match

    # -- model quantities (traced) ----------------------------------------------------------

    def _logps(self, model, chunk) -> torch.Tensor:
        """``[n, CL]`` log-probs of the continuation tokens. The LM head runs only on the CL
        positions that predict them (``PL-1 .. L-2``), not on the prompt."""
        pl = self.prompt_len
        seq, mask = chunk["sequences"], chunk["attention_mask"]
        with self.autocast():
            hidden = model.model(
                input_ids=seq, attention_mask=mask,
                position_ids=position_ids_from_mask(mask), use_cache=False,
            ).last_hidden_state
            logits = model.lm_head(hidden[:, pl - 1:-1])
        if self.cfg.logprobs_at_temperature:
            logits = logits.float() / self.cfg.sampling.temperature
        return label_logps(logits, seq[:, pl:])

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

    def _split_rollout(
        self, pieces: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """The rollout (its generated pieces joined, in one graph) and its ``n_chunks`` row
        blocks as separate buffers (clones), so the graphs that consume them are the same graph
        for every chunk (a slice offset would be baked in)."""
        keys = ROLLOUT_KEYS + ("index",)
        rollout = {k: pieces[0][k] if len(pieces) == 1 else torch.cat([p[k] for p in pieces])
                   for k in keys}
        parts = {k: torch.chunk(rollout[k], self.n_chunks, dim=0) for k in ROLLOUT_KEYS}
        return rollout, [{k: parts[k][i].clone() for k in ROLLOUT_KEYS} for i in range(self.n_chunks)]

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

    def _prompt_pieces(self) -> list[dict[str, torch.Tensor]]:
        """This step's prompts on the device, in ``rollout_micro_batch_size``-row pieces
        (one piece when unset): every piece has the same shape, so the rollout graphs compile
        once whatever the number of pieces."""
        epoch, s = divmod(self.step, self.steps_per_epoch)
        host = self.prompts.get(self.loader.local_indices(epoch, s))
        r = self.cfg.rollouts_per_prompt
        batch = {k: host[k].repeat_interleave(r, dim=0) for k in ("input_ids", "attention_mask", "index")}
        n = self.n_rollouts // self.rollout_micro
        return [runtime.batch_to_device({k: v.chunk(n)[i] for k, v in batch.items()}, self.ctx.mesh)
                for i in range(n)]

    def _generate(self, pieces: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Roll out every piece under the compute dtype's autocast (bf16 matmuls, bf16 KV
        cache). Piece ``i`` draws its noise from seed + i * golden-ratio constant, so
        pieces never repeat each other's samples; piece 0 keeps the unchunked run's seed."""
        cfg = self.cfg
        out = []
        with self.autocast():
            for i, p in enumerate(pieces):
                gen = self.generator.generate(
                    p["input_ids"], p["attention_mask"], cfg.max_continuation_len,
                    seed=(cfg.seed * 1_000_003 + self.step + i * 0x9E3779B1) & 0xFFFFFFFF,
                )
                out.append({"sequences": gen.sequences, "attention_mask": gen.attention_mask,
                            "continuation_mask": gen.continuation_mask, "index": p["index"]})
        return out

    def train_step(self) -> dict:
        cfg = self.cfg
        timed = self.tracker.should_log(self.step + 1)
        t0 = time.perf_counter()
        rollout, chunks = self._split(self._generate(self._prompt_pieces()))
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
        updates = []
        if not cfg.generate_only:
            for _ in range(cfg.ppo_epochs):
                for m in range(self.n_mini):
                    micro = [self._micro(chunks[m * self.accumulate + k]) for k in range(self.accumulate)]
                    updates.append((micro, self._update()))
        for i, (micro, update) in enumerate(updates):
            for out in micro + [update]:
                out = dict(out)
                if "rows/reward" in out:
                    reward = out.pop("rows/reward")
                    if i < self.n_mini:  # the first PPO epoch covers every rollout once
                        row_rewards.append(reward)
                for key, value in out.items():
                    metrics.setdefault(key, []).append(value)
        metrics["objective/kl_coef"] = cfg.kl_coef
        if timed:
            runtime.wait()  # deliberate: the training time, logging steps only
            metrics["time/train_s"] = time.perf_counter() - t1
            self._log_samples(self.step + 1, rollout, row_rewards)
        return metrics

    def _log_samples(self, step: int, rollout, row_rewards) -> None:
        """The (prompt, response, reward) table, and the oracle's mean score over all
        responses, read on the host in a step closure once the graphs have run."""
        n = min(self.cfg.num_logged_samples, self.n_rollouts)
        tok, pl = self.ctx.tokenizer, self.prompt_len

        def record(seqs, cmask, idx, rewards):
            # A step closure: the graphs have run, so these are copies (logging steps only).
            seqs, cmask, idx = seqs.cpu(), cmask.cpu(), idx.cpu()
            reward = torch.cat([r.cpu() for r in rewards]) if rewards else None
            responses = [tok.decode(seqs[i, pl:][cmask[i].bool()], skip_special_tokens=True)
                         for i in range(seqs.shape[0])]
            columns = ["prompt", "response", "reward"]
            rows = [[self.prompts.texts[int(idx[i])], responses[i],
                     float(reward[i]) if reward is not None else float("nan")] for i in range(n)]
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
        dtype = llama.DTYPES[self.cfg.save_dtype]
        is_main = self.ctx.is_main
        checkpoint.save_hf_checkpoint(self.policy, self.ctx.tokenizer, path, save_dtype=dtype,
                                      is_main_process=is_main)
        checkpoint.save_hf_checkpoint(self.value, self.ctx.tokenizer, f"{path}-value",
                                      save_dtype=dtype, is_main_process=is_main)
