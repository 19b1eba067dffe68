"""The rollout engine shared by the PPO and GRPO/RLOO trainers (docs/ppo.md, docs/grpo.md).

One step = one batch of prompts, each repeated ``rollouts_per_prompt`` times:

1. the step's prompts on the device in equal pieces (:meth:`RolloutTrainer._prompt_pieces`);
2. one rollout per piece with the static-shape generation engine (:meth:`RolloutTrainer._generate`;
   compiled once, no host sync per token);
3. the rollout joined and split into ``n_chunks`` equal chunks of
   ``mini_batch_size / accumulate_gradient_steps`` rows (one compiled graph, so that every
   later graph sees identically shaped inputs);
4. the kind's scoring, advantages and updates (:meth:`RolloutTrainer.train_step`), run through
   the compiled graphs this class makes from its hooks; each mini-batch is
   ``accumulate_gradient_steps`` micro-steps then one update (:meth:`RolloutTrainer._updates`).

This class owns the prompts and their loader (and the data position in checkpoints), the
policy and its generator, the step's shapes, the graphs' compilation, continuation
log-probs, the sample table's rows and the policy's export. A kind (``PPOTrainer``,
``GRPOTrainer``) loads its other models (:meth:`RolloutTrainer.build_models`), makes its
optimizers (:meth:`RolloutTrainer.build_optimizers`), defines the compiled bodies
(``_score_chunk``, ``_batch_advantages``, ``_micro_step``, ``_update_step``) and writes its
:meth:`~torchxla_rlhf.trainers.base.Trainer.train_step` from the pieces here. Neither kind
inherits the other.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchxla_rlhf import checkpoint, runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.generation import Generator
from torchxla_rlhf.algos.losses import label_logps
from torchxla_rlhf.algos.rl import position_ids_from_mask
from torchxla_rlhf.trainers.base import Trainer, make_loader, rollout_sampling

ROLLOUT_KEYS = ("sequences", "attention_mask", "continuation_mask")
"""The per-row tensors of a rollout that its chunks carry (plus ``index`` in the whole)."""


class RolloutTrainer(Trainer):
    """A trainer of a policy on its own rollouts (PPO, GRPO/RLOO).

    Shapes of a step: ``n_rollouts = batch_size * rollouts_per_prompt`` rows, generated in
    pieces of ``rollout_micro`` rows, trained as ``n_mini`` mini-batches of ``accumulate``
    chunks each (``n_chunks`` in all). Graphs made here: ``<kind>_split``, ``<kind>_score``,
    ``<kind>_advantages``, ``<kind>_micro_step``, ``<kind>_update`` (plus the generator's).
    """

    # -- what a rollout trainer supplies -------------------------------------------------------

    def build_prompts(self) -> tuple[Any, Any]:
        """``(train, held_out)`` prompt datasets (``held_out`` None when there are none),
        checked to fill a batch; runs before any weights load."""
        raise NotImplementedError

    def build_models(self) -> None:
        """Load the models besides the policy (``self.policy`` is loaded, not yet in train
        mode; ``self.eos_id`` is set)."""
        raise NotImplementedError

    def build_optimizers(self, total: int) -> None:
        """Make the optimizers for ``total`` steps; the step's shapes are set."""
        raise NotImplementedError

    def _score_chunk(self, chunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Traced: what one chunk needs before any update (log-probs, rewards, values)."""
        raise NotImplementedError

    def _batch_advantages(self, chunks, scored, *rest) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """Traced: the whole batch's targets; the training chunks and the rollout metrics."""
        raise NotImplementedError

    def _micro_step(self, chunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Traced: one chunk's loss, backward (scaled by ``1/accumulate``) and metrics."""
        raise NotImplementedError

    def _update_step(self) -> dict[str, torch.Tensor]:
        """Traced: the optimizer update(s) of one mini-batch and their metrics."""
        raise NotImplementedError

    # -- build ---------------------------------------------------------------------------------

    def build(self) -> int:
        cfg, mesh, tok = self.cfg, self.ctx.mesh, self.ctx.tokenizer
        self.prompts, self.eval_prompts = self.build_prompts()
        self.data_reports = {"train": self.prompts.report}
        if self.eval_prompts is not None:
            self.data_reports["eval"] = self.eval_prompts.report
        self.loader = make_loader(self.prompts, cfg.train_dataset, mesh)
        self.steps_per_epoch = self.loader.steps_per_epoch
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        total = cfg.total_steps or max(1, math.floor(self.steps_per_epoch * cfg.num_epochs))

        self.eos_id = tok.eos_token_id
        self.policy = llama.load_causal_lm(cfg.model, mesh, pad_token_id=cfg.tokenizer_pad_token_id)
        self.build_models()
        self.policy.train()
        self.generator = Generator(
            self.policy, rollout_sampling(cfg, mesh), eos_token_id=self.eos_id,
            pad_token_id=cfg.tokenizer_pad_token_id, mesh=mesh,
        )

        # Shapes of a step: N rollouts = n_mini mini-batches = n_chunks chunks (micro-batches).
        self.n_rollouts = cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
        self.accumulate = cfg.optimizer.accumulate_gradient_steps
        self.n_mini = self.n_rollouts // cfg.mini_batch_size
        self.n_chunks = self.n_mini * self.accumulate
        self.rollout_micro = cfg.rollout_micro_batch_size or self.n_rollouts
        self.prompt_len = cfg.train_dataset.seq_length
        self.build_optimizers(total)

        self._split = runtime.compile(self._split_rollout, name=f"{self.name}_split")
        self._score = runtime.compile(self._score_chunk, name=f"{self.name}_score")
        self._advantages = runtime.compile(self._batch_advantages, name=f"{self.name}_advantages")
        self._micro = runtime.compile(self._micro_step, name=f"{self.name}_micro_step")
        self._update = runtime.compile(self._update_step, name=f"{self.name}_update")
        return total

    # -- resume and export -----------------------------------------------------------------

    def data_state(self):
        # Prompts are a function of the step (seeded order per epoch): record what must match.
        return {"steps_per_epoch": self.steps_per_epoch, "loader": self.loader.state_dict()}

    def load_data_state(self, state):
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ValueError(f"resume: the checkpoint ran {state.get('steps_per_epoch')} steps per "
                             f"epoch, this run {self.steps_per_epoch} (prompt data or batch size changed)")
        self.loader.load_state_dict(state["loader"])  # checks seed, shuffle and sizes match

    def save(self, path: str) -> None:
        """The policy at ``path`` (a causal LM)."""
        checkpoint.save_hf_checkpoint(self.policy, self.ctx.tokenizer, path,
                                      save_dtype=llama.DTYPES[self.cfg.save_dtype],
                                      is_main_process=self.ctx.is_main)

    # -- model quantities (traced) ---------------------------------------------------------

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

    # -- the step's pieces -------------------------------------------------------------------

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

    def _rollout(self) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """This step's rollout (device tensors, ``index`` included) and its chunks."""
        return self._split(self._generate(self._prompt_pieces()))

    def _updates(self, passes: int, chunks: list[dict[str, torch.Tensor]]
                 ) -> list[tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]:
        """``passes`` passes over the mini-batches in order: for each, ``accumulate`` compiled
        micro-steps then one compiled update; their outputs, ``(micro, update)`` per update."""
        out = []
        for _ in range(passes):
            for m in range(self.n_mini):
                micro = [self._micro(chunks[m * self.accumulate + k]) for k in range(self.accumulate)]
                out.append((micro, self._update()))
        return out

    @staticmethod
    def _append_metrics(metrics: dict, out: dict) -> None:
        """Append each of ``out``'s values to ``metrics``' list under its name (the tracker
        logs a list's mean)."""
        for key, value in out.items():
            metrics.setdefault(key, []).append(value)

    # -- on the host -------------------------------------------------------------------------

    def _completions(self, sequences: torch.Tensor, cmask: torch.Tensor) -> list[str]:
        """The continuations' text (host tensors ``[n, L]`` and ``[n, CL]``)."""
        tok, pl = self.ctx.tokenizer, self.prompt_len
        return [tok.decode(sequences[i, pl:][cmask[i].bool()], skip_special_tokens=True)
                for i in range(sequences.shape[0])]

    def _sample_rows(self, index: torch.Tensor, completions: list[str],
                     rewards: torch.Tensor | None) -> list[list]:
        """The sample table's first ``num_logged_samples`` rows: prompt, completion, reward
        (NaN where none was computed); host values."""
        n = min(self.cfg.num_logged_samples, self.n_rollouts)
        return [[self.prompts.texts[int(index[i])], completions[i],
                 float(rewards[i]) if rewards is not None else float("nan")] for i in range(n)]
