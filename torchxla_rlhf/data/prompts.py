"""PPO prompts, tokenized once and served as LEFT-padded static-shape batches.

Records: any Tulu 2.5 prompt schema (``messages`` / ``conversation`` / ``chosen`` /
``instruction``, see :func:`~torchxla_rlhf.data.chat.prompt_messages_from_record`), e.g.
``allenai/tulu-2.5-prompts``. The prompt text is the turns up to the last user turn, then
``"<|assistant|>\\n"``, with a BOS in front when ``add_bos`` (docs/data.md, ``prompt_add_bos``).

Truncation choice: a prompt longer than ``seq_length`` tokens is dropped with
``remove_truncated_samples`` (the paper's PPO runs); otherwise its LAST ``seq_length`` tokens
are kept, so the ``<|assistant|>\\n`` generation header and the latest user turn survive
(keeping the first tokens, as a right-truncating tokenizer does, cuts the header off and the
policy then continues the user's text). A left-truncated prompt loses its BOS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from torchxla_rlhf.configs.loader import ConfigError
from torchxla_rlhf.data.chat import format_prompt, prompt_messages_from_record, special_texts
from torchxla_rlhf.data.report import DataReport
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data.preference import RaggedTokens, _check_index
from torchxla_rlhf.data.sources import iter_parsed

__all__ = ["PromptDataset"]

logger = logging.getLogger(__name__)

_CHUNK = 4096
TRUNCATED_MARK = "[truncated] ..."
"""Starts the logged text of a prompt longer than ``seq_length`` (only its end was kept)."""


@dataclass
class PromptDataset:
    """Tokenized prompts; :meth:`get` returns left-padded ``[B, seq_length]`` batches.

    Attributes:
      prompts: :class:`~torchxla_rlhf.data.preference.RaggedTokens` (each ``<= seq_length``).
      texts: the rendered prompt text of each kept example (for sample tables in logs); a
        prompt cut to its last ``seq_length`` tokens is those tokens decoded, after
        :data:`TRUNCATED_MARK`.
      origins: ``file:line`` of each kept example.
      fields: per kept example, what ``build``'s ``record_fields`` took from its record (None
        without one): the RLVR reader keeps ``ground_truth`` and ``dataset`` here.
      stats: ``kept``, ``dropped_truncated``, ``truncated_kept``, ``skipped_malformed``.
    """

    seq_length: int
    pad_token_id: int
    prompts: RaggedTokens
    texts: list[str]
    origins: list[str]
    add_bos: bool
    stats: dict[str, int] = field(default_factory=dict)
    report: DataReport | None = None
    fields: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def build(cls, cfg: DatasetConfig, tokenizer: Any, add_bos: bool, name: str | None = None,
              record_fields: Callable[[dict, str], dict[str, Any]] | None = None) -> "PromptDataset":
        """Read, render and tokenize every prompt of ``cfg`` (``add_special_tokens=False``);
        ``report`` counts what was kept, truncated and dropped (see
        :class:`~torchxla_rlhf.data.report.DataReport`). ``record_fields(record, origin)``,
        when given, picks what to keep of each record besides its prompt (it may raise
        :class:`~torchxla_rlhf.data.chat.DataError` for a record that lacks something)."""
        cfg.validate()
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError("tokenizer has no pad token: load it with pad_token_id (the paper's runs used 0)")
        bos_text, eos_text = special_texts(tokenizer)
        if add_bos and not bos_text:
            raise ConfigError("prompt_add_bos: true, but the tokenizer has no bos_token; set "
                              "prompt_add_bos=false or use a tokenizer with one", key="prompt_add_bos")
        L = cfg.seq_length
        stats = dict(kept=0, dropped_truncated=0, truncated_kept=0, skipped_malformed=0)
        lengths: list[int] = []
        ids_kept: list[list[int]] = []
        texts_kept: list[str] = []
        origins_kept: list[str] = []
        fields_kept: list[dict[str, Any]] = []
        pending: list[tuple[str, str, Any]] = []

        def flush() -> None:
            if not pending:
                return
            enc = tokenizer(
                [t for t, _, _ in pending],
                add_special_tokens=False,
                truncation=False,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            for ids, (text, origin, extra) in zip(enc["input_ids"], pending):
                lengths.append(len(ids))
                if len(ids) > L:
                    if cfg.remove_truncated_samples:
                        stats["dropped_truncated"] += 1
                        continue
                    stats["truncated_kept"] += 1
                    ids = ids[-L:]  # keep the end: the generation header must survive
                    # The sample tables show what the model saw, marked as cut.
                    text = TRUNCATED_MARK + tokenizer.decode(ids, skip_special_tokens=False)
                ids_kept.append(ids)
                texts_kept.append(text)
                origins_kept.append(origin)
                fields_kept.append(extra)
            pending.clear()

        def parse(record, origin):
            messages = prompt_messages_from_record(record, origin)
            extra = record_fields(record, origin) if record_fields else None
            return format_prompt(messages, bos_text, eos_text, add_bos=add_bos, origin=origin), extra

        for (text, extra), origin in iter_parsed(cfg, parse, stats):
            pending.append((text, origin, extra))
            if len(pending) >= _CHUNK:
                flush()
        flush()
        stats["kept"] = len(ids_kept)
        report = DataReport.from_build("prompt data", cfg, name, stats, lengths)
        if stats["truncated_kept"]:
            logger.warning("%s: %d prompt(s) longer than seq_length=%d kept their last %d tokens "
                           "(remove_truncated_samples=false); they lose their beginning",
                           report.name, stats["truncated_kept"], L, L)
        report.check(cfg.max_dropped_fraction)
        return cls(
            seq_length=L,
            pad_token_id=int(pad),
            prompts=RaggedTokens.from_lists(ids_kept),
            texts=texts_kept,
            origins=origins_kept,
            add_bos=add_bos,
            stats=stats,
            report=report,
            fields=fields_kept if record_fields else None,
        )

    def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``: int64 ``[B, PL]``, left-padded with
        ``pad_token_id``; ``index``: int64 ``[B]``. Positions must come from the mask
        (``clip(cumsum(mask) - 1, 0)``, docs/data.md)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        _check_index(idx, len(self))
        ids, attn = self.prompts.padded(idx, self.seq_length, self.pad_token_id, left=True)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(attn),
            "index": torch.from_numpy(idx.copy()),
        }
