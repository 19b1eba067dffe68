"""Preference pairs (chosen / rejected) tokenized once into static-shape batches.

Record schema (``allenai/tulu-2.5-preference-data`` or a JSON-lines file with the same fields):
``{"chosen": [messages... , assistant], "rejected": [messages..., assistant], "margin": float?}``.
Other fields (``source``, ``prompt``...) are ignored.

Storage is ragged: one flat int32 token buffer per side plus offsets, the response start and
the margin per example. 60k pairs at ``seq_length`` 4096 take ~0.3 GB this way instead of ~3 GB
as padded ``[N, L]`` arrays; :meth:`PreferenceDataset.get` materialises the static, right-padded
``[B, L]`` batch (a few hundred microseconds per row of 4096).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchxla_rlhf.data.chat import DataError, tokenize_preference_sides, validate_messages
from torchxla_rlhf.data.report import DataReport
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data.sources import iter_parsed

__all__ = ["PreferenceDataset", "RaggedTokens", "parse_preference_record"]

logger = logging.getLogger(__name__)

# Records tokenized per call of the fast tokenizer: large enough to amortise the Python
# overhead, small enough to keep the token lists of one chunk in memory.
_CHUNK = 2048


@dataclass
class RaggedTokens:
    """N variable-length token sequences in one flat buffer.

    ``tokens`` int32 ``[sum n_i]``, ``offsets`` int64 ``[N + 1]`` (sequence i is
    ``tokens[offsets[i]:offsets[i+1]]``), ``starts`` int32 ``[N]``: a per-sequence position
    (the response start for preference sides; unused, 0, for prompts).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]], starts: Sequence[int] | None = None) -> "RaggedTokens":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
        st = np.asarray(starts if starts is not None else np.zeros(len(seqs)), dtype=np.int32)
        return cls(tokens=tokens, offsets=offsets, starts=st)

    @classmethod
    def concat(cls, parts: Sequence["RaggedTokens"]) -> "RaggedTokens":
        """Join chunks built one at a time (keeps Python int lists out of memory)."""
        if not parts:
            return cls.from_lists([])
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(
            tokens=np.concatenate([p.tokens for p in parts]),
            offsets=offsets,
            starts=np.concatenate([p.starts for p in parts]).astype(np.int32),
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.starts)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def padded(self, idx: np.ndarray, length: int, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, attention_mask)``, int64 ``[B, length]``, right- (or left-) padded with
        ``pad_id``. Rows must already be ``<= length`` long."""
        ids = np.full((len(idx), length), pad_id, dtype=np.int64)
        lens = self.lengths[idx]
        for row, i in enumerate(idx):
            seq = self.sequence(int(i))
            if left:
                ids[row, length - len(seq) :] = seq
            else:
                ids[row, : len(seq)] = seq
        ar = np.arange(length)[None, :]
        attn = (ar >= (length - lens)[:, None]) if left else (ar < lens[:, None])
        return ids, attn.astype(np.int64)


def _check_index(idx: np.ndarray, n: int) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"dataset indices out of range [0, {n}): min {idx.min()}, max {idx.max()}")


def parse_preference_record(record: Mapping[str, Any], origin: str) -> tuple[list, list, float]:
    """Validate one preference record; returns ``(chosen, rejected, margin)``.

    Raises :class:`DataError` naming ``origin`` and the field: missing ``chosen``/``rejected``,
    malformed messages, a side not ending with an assistant turn, a non-numeric ``margin``.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    sides = []
    for name in ("chosen", "rejected"):
        if name not in record:
            raise DataError(
                f"{origin}: missing field '{name}' (expected a list of messages ending with an assistant turn)"
            )
        msgs = validate_messages(record[name], origin, name)
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{origin}: field '{name}' must end with an assistant turn, "
                f"but its last message has role {msgs[-1]['role']!r}"
            )
        sides.append(msgs)
    margin = record.get("margin")
    if margin is None:
        margin = 0.0
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{origin}: field 'margin' must be a finite number, got {margin!r}")
    return sides[0], sides[1], float(margin)


@dataclass
class PreferenceDataset:
    """Tokenized preference pairs; :meth:`get` returns static ``[B, seq_length]`` batches.

    Attributes:
      chosen, rejected: :class:`RaggedTokens` (``starts`` = first loss token of each side).
      margin: float32 ``[N]`` (0 where the record had none).
      origins: where each kept example came from (``file:line``), for debugging.
      stats: ``kept``, ``dropped_truncated``, ``dropped_no_loss_tokens``, ``skipped_malformed``,
        ``truncated_kept`` (truncated pairs kept because ``remove_truncated_samples`` is off).
    """

    seq_length: int
    pad_token_id: int
    chosen: RaggedTokens
    rejected: RaggedTokens
    margin: np.ndarray
    origins: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    report: DataReport | None = None

    def __len__(self) -> int:
        return len(self.margin)

    @classmethod
    def build(cls, cfg: DatasetConfig, tokenizer: Any, name: str | None = None) -> "PreferenceDataset":
        """Read, validate and tokenize every record of ``cfg`` (batched fast tokenizer).

        Per side: ``input_ids = tok(bos + tulu(messages), add_special_tokens=False)[:L]``, loss
        mask on the last assistant message (see :mod:`torchxla_rlhf.data.chat`). A pair is
        dropped when either side has no loss token left after truncation, or (with
        ``remove_truncated_samples``) when either side was truncated; ``report`` counts each
        reason, and more than ``cfg.max_dropped_fraction`` dropped is a :class:`DataError`.
        ``name`` labels the report (default: the source).
        """
        cfg.validate()
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError("tokenizer has no pad token: load it with pad_token_id (the paper's runs used 0)")
        L = cfg.seq_length
        stats = dict(kept=0, dropped_truncated=0, dropped_no_loss_tokens=0, skipped_malformed=0, truncated_kept=0)
        lengths: list[int] = []
        chosen_parts: list[RaggedTokens] = []
        rejected_parts: list[RaggedTokens] = []
        margins: list[float] = []
        origins: list[str] = []
        pending: list[tuple[list, list, float, str]] = []

        def flush() -> None:
            if not pending:
                return
            convs = [p[0] for p in pending] + [p[1] for p in pending]
            origins_2 = [p[3] for p in pending] * 2
            fields = ["chosen"] * len(pending) + ["rejected"] * len(pending)
            # Records were validated by parse_preference_record: skip the second validation.
            toks = tokenize_preference_sides(tokenizer, convs, L, origins_2, fields, validate=False)
            n = len(pending)
            kept_c, kept_r = [], []
            for k, (_, _, margin, origin) in enumerate(pending):
                c, r = toks[k], toks[n + k]  # (ids, response_start, truncated, full length)
                lengths.append(max(c[3], r[3]))
                if c[1] >= len(c[0]) or r[1] >= len(r[0]):
                    stats["dropped_no_loss_tokens"] += 1
                    continue
                if c[2] or r[2]:
                    if cfg.remove_truncated_samples:
                        stats["dropped_truncated"] += 1
                        continue
                    stats["truncated_kept"] += 1
                kept_c.append(c)
                kept_r.append(r)
                margins.append(margin)
                origins.append(origin)
            chosen_parts.append(RaggedTokens.from_lists([c[0] for c in kept_c], [c[1] for c in kept_c]))
            rejected_parts.append(RaggedTokens.from_lists([r[0] for r in kept_r], [r[1] for r in kept_r]))
            pending.clear()

        for (chosen, rejected, margin), origin in iter_parsed(cfg, parse_preference_record, stats):
            pending.append((chosen, rejected, margin, origin))
            if len(pending) >= _CHUNK:
                flush()
        flush()
        stats["kept"] = len(margins)
        report = DataReport.from_build("preference data", cfg, name, stats, lengths)
        report.check(cfg.max_dropped_fraction)
        return cls(
            seq_length=L,
            pad_token_id=int(pad),
            chosen=RaggedTokens.concat(chosen_parts),
            rejected=RaggedTokens.concat(rejected_parts),
            margin=np.asarray(margins, dtype=np.float32),
            origins=origins,
            stats=stats,
            report=report,
        )

    def _side(self, side: RaggedTokens, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, attn = side.padded(idx, self.seq_length, self.pad_token_id)
        ar = np.arange(self.seq_length)[None, :]
        loss = ((ar >= side.starts[idx][:, None]) & (attn == 1)).astype(np.int64)
        return ids, attn, loss

    def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """A batch of pairs ``indices`` (host CPU tensors), as rows: chosen then rejected.

        Returns int64 ``[2B, L]`` ``input_ids``, ``attention_mask``, ``loss_mask`` whose rows
        ``0..B-1`` are the chosen responses and ``B..2B-1`` the rejected ones (right-padded
        with ``pad_token_id``; ``loss_mask[t] = 1`` means token t is scored from the logits at
        t - 1), float32 ``[B]`` ``margin`` and int64 ``[B]`` ``index``. Concatenating here,
        on the host, makes the row count what is split over ``dp*fsdp``: the paper's 8 pairs are
        16 rows, one per device of its ``-1,16,16`` mesh's batch axes.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        _check_index(idx, len(self))
        sides = [self._side(side, idx) for side in (self.chosen, self.rejected)]
        out: dict[str, torch.Tensor] = {
            key: torch.from_numpy(np.concatenate([sides[0][i], sides[1][i]], axis=0))
            for i, key in enumerate(("input_ids", "attention_mask", "loss_mask"))
        }
        out["margin"] = torch.from_numpy(self.margin[idx].astype(np.float32))
        out["index"] = torch.from_numpy(idx.copy())
        return out
