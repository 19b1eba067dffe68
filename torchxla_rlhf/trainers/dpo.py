"""DPO / IPO / cDPO / length-normalized DPO / SimPO (docs/dpo.md): the loss of a pair batch,
and the reference model.

Chosen and rejected run as one concatenated forward of the policy; the reference's
log-probs come from a frozen sharded model in the same graph, or from a table computed once
(``precalculate_reference_logps``) and cached in ``output_dir``. A reference-free objective
(``simpo``) loads no reference model and computes no reference log-probs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging

import fsspec
import numpy as np
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.algos.losses import dpo_loss, sequence_logps
from torchxla_rlhf.data.tokenizers import tokenizer_fingerprint
from torchxla_rlhf.trainers.pairs import PairTrainer, pair_rows

logger = logging.getLogger(__name__)


class DPOTrainer(PairTrainer):
    def build_model(self) -> torch.nn.Module:
        """The policy, and the frozen reference (or its log-probs, computed once)."""
        cfg, mesh = self.cfg, self.ctx.mesh
        pad_id = cfg.tokenizer_pad_token_id
        policy = llama.load_causal_lm(cfg.model, mesh, pad_token_id=pad_id)
        self.reference = None
        self.ref_logps: dict[str, np.ndarray] = {}
        if not cfg.needs_reference:
            return policy
        ref_cfg = cfg.model
        if cfg.load_reference_checkpoint:
            ref_cfg = dataclasses.replace(cfg.model, name_or_path=cfg.load_reference_checkpoint)
        self.reference = llama.freeze(
            llama.load_causal_lm(ref_cfg, mesh, pad_token_id=pad_id), ref_cfg, mesh
        )
        if cfg.precalculate_reference_logps:
            self.ref_logps["train"] = self._reference_logps(self.data.train, "train")
            if self.data.eval is not None:
                self.ref_logps["eval"] = self._reference_logps(self.data.eval, "eval")
            # The reference model is no longer needed: free its device memory.
            self.reference = None
        return policy

    @property
    def policy(self) -> torch.nn.Module:
        return self.model

    def _pair_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs ``([B], [B])`` of chosen and rejected, one forward."""
        ids, mask, loss_mask = pair_rows(batch)
        with self.autocast():
            logits = llama.causal_lm_logits(model, ids, mask)
        logps = sequence_logps(logits, ids, loss_mask)
        half = ids.shape[0] // 2
        return logps[:half], logps[half:]

    def _reference(self, batch) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if not self.cfg.needs_reference:
            return None, None
        if self.reference is None:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            return self._pair_logps(self.reference, batch)

    def pair_loss(self, batch):
        pi_chosen, pi_rejected = self._pair_logps(self.policy, batch)
        ref_chosen, ref_rejected = self._reference(batch)
        cfg = self.cfg
        # Response token counts (the length-normalized objectives divide by them).
        lengths = batch["loss_mask"].sum(dim=1)
        half = lengths.shape[0] // 2
        return dpo_loss(
            pi_chosen, pi_rejected, ref_chosen, ref_rejected,
            beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type=cfg.objective,
            chosen_lengths=lengths[:half], rejected_lengths=lengths[half:], gamma=cfg.gamma,
        )

    # -- precomputed reference log-probs --------------------------------------------------

    def host_fields(self, batch: dict, split: str) -> dict:
        """The cached reference log-probs of the batch's pairs, when precalculated."""
        if not self.ref_logps:
            return batch
        table = self.ref_logps[split]
        idx = batch["index"].numpy()  # a host (CPU) tensor: the batch is not on the device yet
        batch["ref_chosen_logps"] = torch.from_numpy(table[idx, 0])
        batch["ref_rejected_logps"] = torch.from_numpy(table[idx, 1])
        return batch

    def _reference_logps(self, dataset, split: str) -> np.ndarray:
        """``[N, 2]`` reference log-probs (chosen, rejected) per example index, computed in
        one ordered pass and cached in ``output_dir`` so that a restart does not redo it."""
        ref_cfg = self.cfg.model
        if self.cfg.load_reference_checkpoint:
            ref_cfg = dataclasses.replace(ref_cfg, name_or_path=self.cfg.load_reference_checkpoint)
        key = _fingerprint(dataset, ref_cfg, self.ctx.tokenizer)
        path = f"{self.ctx.output_dir}/reference_logps_{split}.npz"
        fs, fpath = fsspec.core.url_to_fs(path)
        if fs.exists(fpath):
            with fs.open(fpath, "rb") as f:
                cached = np.load(io.BytesIO(f.read()))
                if str(cached["fingerprint"]) == key:
                    logger.info("reference log-probs for %s: loaded from %s", split, path)
                    return cached["logps"]
            logger.info("reference log-probs cache %s is for other weights, tokenizer or data: "
                        "recomputing", path)
        n = len(dataset)
        bs = self.data.batch_size
        share, count = runtime.data_share(self.ctx.mesh)
        per_host = bs // count
        fn = runtime.compile(lambda b: torch.stack(self._reference(b), dim=1), name="dpo_reference_logps")
        outputs, index_rows = [], []
        for start in range(0, n, bs):
            # The last batch wraps around to keep the shape static; duplicates are overwritten.
            rows = np.arange(start, start + bs) % n
            host_rows = rows[share * per_host:(share + 1) * per_host]
            outputs.append(fn(runtime.batch_to_device(dataset.get(host_rows), self.ctx.mesh)))
            index_rows.append(rows)
        table = np.zeros((n, 2), dtype=np.float32)
        # One deliberate host transfer per batch, after all batches were queued.
        for rows, out in zip(index_rows, outputs):
            table[rows] = runtime.to_cpu(out).float().numpy()
        if self.ctx.is_main:
            buf = io.BytesIO()
            np.savez(buf, logps=table, fingerprint=np.array(key))
            # The run's directory may not exist yet: the config is written after the build.
            fs.makedirs(fpath.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(fpath, "wb") as f:
                f.write(buf.getvalue())
        logger.info("reference log-probs for %s: computed for %d pairs", split, n)
        return table


def _fingerprint(dataset, reference: llama.ModelConfig, tokenizer) -> str:
    """Cache key of the reference log-probs: the reference weights (not just their name: a
    retrained model at the same path must not reuse the cache), the tokenizer and the data."""
    h = hashlib.sha256(reference.name_or_path.encode())
    h.update(llama.weights_fingerprint(reference).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(str(dataset.seq_length).encode())
    for side in (dataset.chosen, dataset.rejected):
        for array in (side.tokens, side.offsets, side.starts):
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()
