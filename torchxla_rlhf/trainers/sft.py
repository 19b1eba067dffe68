"""Supervised fine-tuning (docs/sft.md): next-token cross-entropy on the assistant turns of
chat conversations, several conversations packed into each fixed-length row.

Data: records in the Tulu / open-instruct SFT schema, ``{"messages": [{"role", "content"},
...]}`` (the field is ``messages_key``), rendered in the Tulu chat format of
:mod:`torchxla_rlhf.data.chat` and tokenized in one call per chunk. The loss mask is 1 on
every assistant turn (its content, its eos and the newline that closes it when another turn
follows), 0 on system and user turns and on the ``<|assistant|>`` headers: what
open-instruct's ``encode_sft_example`` leaves unmasked (TRL's ``assistant_only_loss`` alike).

Packing: conversations are placed into rows of ``seq_length`` tokens by best-fit decreasing
once, when the data is built (TRL's ``packing_strategy="bfd"``); the loader then shuffles the
rows. A row carries ``segment_ids`` (1, 2, ... per conversation, 0 on the padding at its end)
and ``position_ids`` that restart at 0 for every conversation. On the device the attention
mask is built from the segment ids (:func:`packed_attention_mask`: causal and block-diagonal),
so a token never attends to another conversation, every shape is static, and a row is almost
all real tokens: a TPU step does little work on padding. ``packing: false`` puts one
conversation per row (the same graph, with one segment and its padding).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.data.chat import (ASSISTANT_HEADER, DataError, format_messages,
                                     special_texts, validate_messages)
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data.preference import RaggedTokens
from torchxla_rlhf.data.report import DataReport
from torchxla_rlhf.data.sources import iter_parsed
from torchxla_rlhf.algos.losses import token_logps
from torchxla_rlhf.trainers.base import make_loader
from torchxla_rlhf.trainers.pairs import PairData, PairTrainer

logger = logging.getLogger(__name__)

_CHUNK = 2048
"""Conversations tokenized per call of the fast tokenizer."""

_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": ASSISTANT_HEADER}


# ----------------------------------------------------------------------------------------
# Host side: tokenize with the assistant mask, pack into rows
# ----------------------------------------------------------------------------------------


def parse_sft_record(record: Any, origin: str, key: str = "messages") -> list[Mapping[str, Any]]:
    """The conversation of one record: ``record[key]``, a valid message list with at least
    one assistant turn; a :class:`DataError` naming ``origin`` (file:line) and the field."""
    if not isinstance(record, Mapping):
        raise DataError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{origin}: missing field '{key}' (expected a list of messages; "
                        f"record has {sorted(record)}; messages_key names the field)")
    messages = validate_messages(record[key], origin, key)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}: field '{key}' has no assistant turn (nothing to train on)")
    return messages


def assistant_spans(messages: Sequence[Mapping[str, Any]], bos_text: str,
                    eos_text: str) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the conversation in the Tulu format (exactly
    :func:`~torchxla_rlhf.data.chat.format_messages`) and the ``[start, end)`` character
    spans the loss covers: per assistant turn, its content, its eos and the ``"\\n"`` closing
    it (absent after the last turn: the text is stripped)."""
    pos, spans, parts = len(bos_text), [], [bos_text]
    for m in messages:
        header = _HEADERS[m["role"]]
        content = m["content"].strip()
        piece = header + content + (eos_text if m["role"] == "assistant" else "") + "\n"
        if m["role"] == "assistant":
            spans.append((pos + len(header), pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    text = "".join(parts).rstrip()
    if text != format_messages(messages, bos_text, eos_text):  # one renderer, one format
        raise AssertionError("assistant_spans: the rendering differs from data.chat's")
    return text, [(s, min(e, len(text))) for s, e in spans]


def tokenize_conversations(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, Any]]],
                           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per conversation ``(input_ids, loss_mask)``, int32 and int8, untruncated: one call of
    the fast tokenizer (``add_special_tokens=False``: bos and eos are in the text). A token
    is in the loss when its character span overlaps an assistant span (a token straddling the
    header/content boundary counts, as in :mod:`torchxla_rlhf.data.chat`)."""
    bos_text, eos_text = special_texts(tokenizer)
    rendered = [assistant_spans(m, bos_text, eos_text) for m in conversations]
    if not rendered:
        return []
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, truncation=False,
                    padding=False, return_attention_mask=False, return_token_type_ids=False)
    if not getattr(enc, "encodings", None):
        raise TypeError("SFT needs a fast (Rust) tokenizer for character offsets")
    out = []
    for ids, encoding, (_, spans) in zip(enc["input_ids"], enc.encodings, rendered):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            mask |= (offsets[:, 1] > s) & (offsets[:, 0] < e)
        mask[0] = False  # the first token is never predicted
        out.append((np.asarray(ids, dtype=np.int32), mask.astype(np.int8)))
    return out


def pack_best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of conversation indices, each summing to at most ``capacity`` tokens: best-fit
    decreasing (longest first, each into the fullest row it still fits; a new row when none).
    Within a row the indices are in increasing order; rows in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
            continue
        room, row = free.pop(k)
        rows[row].append(i)
        bisect.insort(free, (room - n, row))
    return [sorted(r) for r in rows]


@dataclass
class SFTDataset:
    """Tokenized conversations and the rows they are packed into; :meth:`get` returns
    static ``[B, seq_length]`` batches of rows.

    Attributes:
      conversations: the tokens (``starts`` unused), truncated to ``seq_length``.
      loss_mask: int8, aligned with ``conversations.tokens``.
      rows: per row, the indices of its conversations.
    """

    seq_length: int
    pad_token_id: int
    conversations: RaggedTokens
    loss_mask: np.ndarray
    rows: list[list[int]]
    origins: list[str]
    report: DataReport | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fill(self) -> float:
        """Share of the rows' positions that hold a conversation token."""
        return float(self.conversations.lengths.sum()) / max(len(self.rows) * self.seq_length, 1)

    @classmethod
    def build(cls, cfg: DatasetConfig, tokenizer: Any, *, messages_key: str = "messages",
              packing: bool = True, name: str | None = None) -> "SFTDataset":
        """Read, validate and tokenize every record, then pack (or not) into rows. A
        conversation longer than ``seq_length`` is truncated (or dropped with
        ``remove_truncated_samples``); one with no assistant token left is dropped; more than
        ``max_dropped_fraction`` dropped is a :class:`DataError` with the data report."""
        cfg.validate()
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError("tokenizer has no pad token: load it with pad_token_id")
        L = cfg.seq_length
        stats = dict(kept=0, dropped_truncated=0, dropped_no_loss_tokens=0, skipped_malformed=0,
                     truncated_kept=0)
        lengths: list[int] = []
        seqs: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        origins: list[str] = []
        pending: list[tuple[list, str]] = []

        def flush() -> None:
            for (ids, mask), (_, origin) in zip(tokenize_conversations(
                    tokenizer, [p[0] for p in pending]), pending):
                lengths.append(len(ids))
                truncated = len(ids) > L
                if not mask[:L].any():
                    stats["dropped_no_loss_tokens"] += 1
                    continue
                if truncated:
                    if cfg.remove_truncated_samples:
                        stats["dropped_truncated"] += 1
                        continue
                    stats["truncated_kept"] += 1
                seqs.append(ids[:L])
                masks.append(mask[:L])
                origins.append(origin)
            pending.clear()

        def parse(record, origin):
            return parse_sft_record(record, origin, messages_key)

        for messages, origin in iter_parsed(cfg, parse, stats):
            pending.append((messages, origin))
            if len(pending) >= _CHUNK:
                flush()
        if pending:
            flush()
        stats["kept"] = len(seqs)
        report = DataReport.from_build("conversations", cfg, name, stats, lengths)
        report.check(cfg.max_dropped_fraction)
        conversations = RaggedTokens.from_lists(seqs)
        loss_mask = np.concatenate(masks) if masks else np.zeros(0, np.int8)
        n = len(seqs)
        rows = pack_best_fit(conversations.lengths, L) if packing else [[i] for i in range(n)]
        ds = cls(L, int(pad), conversations, loss_mask, rows, origins, report, stats)
        logger.info("%s: %d conversations in %d rows of %d tokens (%s), %.1f %% of the "
                    "positions real tokens", report.name, n, len(rows), L,
                    "packed" if packing else "one per row", 100 * ds.fill)
        return ds

    def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as int64 ``[B, L]`` host tensors: ``input_ids`` (pad at the
        end), ``segment_ids`` (k = 1, 2, ... for the row's k-th conversation, 0 on padding),
        ``position_ids`` (0, 1, ... from each conversation's first token; the padding counts
        on from 0 too) and ``loss_mask`` (1: token t is scored from the logits at t - 1)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices out of range [0, {len(self)})")
        L = self.seq_length
        ids = np.full((len(idx), L), self.pad_token_id, dtype=np.int64)
        seg = np.zeros((len(idx), L), dtype=np.int64)
        pos = np.zeros((len(idx), L), dtype=np.int64)
        loss = np.zeros((len(idx), L), dtype=np.int64)
        offsets = self.conversations.offsets
        for r, row in enumerate(idx):
            at = 0
            for k, i in enumerate(self.rows[int(row)], start=1):
                lo, hi = offsets[i], offsets[i + 1]
                n = int(hi - lo)
                ids[r, at:at + n] = self.conversations.tokens[lo:hi]
                loss[r, at:at + n] = self.loss_mask[lo:hi]
                seg[r, at:at + n] = k
                pos[r, at:at + n] = np.arange(n)
                at += n
            pos[r, at:] = np.arange(L - at)
        return {"input_ids": torch.from_numpy(ids), "segment_ids": torch.from_numpy(seg),
                "position_ids": torch.from_numpy(pos), "loss_mask": torch.from_numpy(loss)}


class SFTData(PairData):
    """Training (and held-out) conversations packed into rows, with their loaders: the
    interface of :class:`~torchxla_rlhf.trainers.pairs.PairData` over :class:`SFTDataset`."""

    def __init__(self, cfg, tokenizer, mesh: runtime.MeshInfo):
        kw = dict(messages_key=cfg.messages_key, packing=cfg.packing)
        self.train = SFTDataset.build(cfg.train_dataset, tokenizer, name="train_dataset", **kw)
        self.reports = {"train": self.train.report}
        self.eval = None
        if cfg.eval_dataset is not None:
            self.eval = SFTDataset.build(cfg.eval_dataset, tokenizer, name="eval_dataset", **kw)
            self.reports["eval"] = self.eval.report
        self.batch_size = cfg.train_dataset.batch_size
        check_fills_batch(self.train, self.batch_size, "train_dataset")
        self.loader = make_loader(self.train, cfg.train_dataset, mesh)
        self._eval_cfg = cfg.train_dataset
        self._mesh = mesh
        self._iter: Iterator | None = None


def check_fills_batch(ds: SFTDataset, batch_size: int, key: str) -> None:
    """A :class:`DataError` when the rows do not fill one global batch."""
    if len(ds) < batch_size:
        raise DataError(f"{key}: {len(ds)} rows ({ds.stats['kept']} conversations), fewer than "
                        f"one batch of {key}.batch_size={batch_size} [" +
                        " | ".join(ds.report.lines()) + "]")


# ----------------------------------------------------------------------------------------
# Device side: the mask and the loss (pure; traced into the graphs)
# ----------------------------------------------------------------------------------------


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive attention mask ``[B, 1, L, L]`` of packed rows (HF's 4-D eager form):
    ``0`` where query i may attend to key j, i.e. ``segment_ids[i] == segment_ids[j]`` and
    ``j <= i`` (causal inside each conversation; the padding is a block of its own), the
    dtype's minimum elsewhere. Static shapes, no host sync."""
    L = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def effective_loss_mask(loss_mask: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """``m[b, t] = loss_mask[b, t] * [segment_ids[b, t] == segment_ids[b, t - 1]] * [t > 0]``:
    a token counts only when the token before it is of the same conversation, so no loss
    crosses a packing boundary whatever the host mask says (float32 ``[B, L]``)."""
    same = torch.nn.functional.pad(segment_ids[:, 1:] == segment_ids[:, :-1], (1, 0), value=False)
    return loss_mask.float() * same.float() * (segment_ids > 0).float()


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             segment_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over the assistant tokens of a micro-batch.

    ``loss = -sum_{b,t} m[b,t] * log p(x[b,t] | x[b,<t] of its conversation) / max(sum m, 1)``
    with ``m`` from :func:`effective_loss_mask`: a token mean over every assistant token of
    the (global) micro-batch, open-instruct's ``reduce_loss="mean"`` and TRL's default, so a
    packed batch and the same conversations unpacked give the same loss. With gradient
    accumulation the update is the mean of the micro-batches' losses. Shapes: ``logits
    [B, L, V]``, the others ``[B, L]``. Metrics: ``loss_tokens`` (sum m)."""
    m = effective_loss_mask(loss_mask, segment_ids)
    count = m.sum()
    nll = -(token_logps(logits, input_ids) * m).sum()
    return nll / count.clamp(min=1.0), {"loss_tokens": count}


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------


class SFTTrainer(PairTrainer):
    """One causal LM trained on packed conversations: :class:`PairTrainer`'s data loop,
    optimizer and graphs (micro-step, update, eval) with :class:`SFTData` and
    :func:`sft_loss` (its ``pair_loss``)."""

    @classmethod
    def check_data(cls, cfg, tokenizer) -> None:
        kw = dict(messages_key=cfg.messages_key, packing=cfg.packing)
        ds = SFTDataset.build(cfg.train_dataset, tokenizer, name="train_dataset", **kw)
        check_fills_batch(ds, cfg.train_dataset.batch_size, "train_dataset")
        if cfg.eval_dataset is not None:
            SFTDataset.build(cfg.eval_dataset, tokenizer, name="eval_dataset", **kw)

    data_class = SFTData

    def build_model(self) -> torch.nn.Module:
        return llama.load_causal_lm(self.cfg.model, self.ctx.mesh,
                                     pad_token_id=self.cfg.tokenizer_pad_token_id)

    @property
    def policy(self) -> torch.nn.Module:
        return self.model

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, L, V]`` logits of packed rows: the segment mask and restarting positions."""
        with self.autocast():
            return self.model(input_ids=batch["input_ids"],
                              attention_mask=packed_attention_mask(batch["segment_ids"]),
                              position_ids=batch["position_ids"], use_cache=False).logits

    def pair_loss(self, batch):
        loss, metrics = sft_loss(self.logits(batch), batch["input_ids"], batch["loss_mask"],
                                 batch["segment_ids"])
        metrics["real_tokens"] = (batch["segment_ids"] > 0).sum().float()
        return loss, metrics


def tokens_per_row(ds: SFTDataset) -> float:
    """Mean conversation tokens per row (the work a step does that is not padding)."""
    return float(ds.conversations.lengths.sum()) / max(len(ds), 1)


__all__ = ["SFTDataset", "SFTTrainer", "assistant_spans", "effective_loss_mask",
           "pack_best_fit", "packed_attention_mask", "parse_sft_record", "sft_loss",
           "tokenize_conversations"]
