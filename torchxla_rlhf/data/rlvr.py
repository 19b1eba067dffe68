"""Prompts with verifiable answers, in open-instruct's RLVR schema.

A record is ``{"messages": [...], "ground_truth": ..., "dataset": ...}`` (as
``allenai/RLVR-GSM-MATH-IF-Mixed-Constraints``): the prompt is the conversation up to its last
user turn (the same rendering and truncation as :mod:`~torchxla_rlhf.data.prompts`),
``ground_truth`` the answer a verifiable reward checks (a string, a number, or a list of
accepted answers), ``dataset`` which verifier family it belongs to. Every other top-level
field (except message lists) is kept too and handed to user reward functions.

A record without a ground truth, when a verifiable reward is configured, is a data error that
names its file and line (never a silent zero reward), and so is one the reward's
``check_record`` rejects (a dataset with no verifier, a ground truth its verifier cannot read:
``{"answer": "8"}`` for the math verifier); ``skip_malformed`` counts and skips it instead, in
the data report.
"""

from __future__ import annotations

from typing import Any, Callable

from torchxla_rlhf.data.chat import DataError
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data.prompts import PromptDataset

__all__ = ["build_rlvr_prompts", "record_fields"]

_MESSAGE_KEYS = ("messages", "conversation", "chosen", "rejected")


def record_fields(require_ground_truth: bool,
                  check_record: Callable[[dict], None] | None = None):
    """The ``record_fields`` hook of :meth:`PromptDataset.build` for RLVR records;
    ``check_record(fields)`` raises ValueError (what was expected) for a record the reward
    cannot score, which becomes a :class:`DataError` naming the record's file and line."""

    def fields(record: dict, origin: str) -> dict[str, Any]:
        truth = record.get("ground_truth")
        if require_ground_truth and (truth is None or truth == "" or truth == []):
            raise DataError(
                f"{origin}: no 'ground_truth' (the RLVR schema is messages, ground_truth, "
                "dataset); a verifiable reward needs one for every record")
        kept = {k: v for k, v in record.items() if k not in _MESSAGE_KEYS}
        if check_record is not None:
            try:
                check_record(kept)
            except ValueError as e:
                raise DataError(f"{origin}: {e}") from None
        return kept

    return fields


def build_rlvr_prompts(cfg: DatasetConfig, tokenizer: Any, *, add_bos: bool,
                       require_ground_truth: bool, name: str | None = None,
                       check_record: Callable[[dict], None] | None = None) -> PromptDataset:
    """Tokenized prompts whose ``fields`` hold each record's ground truth and other fields;
    each record passes ``check_record`` (see :func:`record_fields`) or is a data error."""
    return PromptDataset.build(cfg, tokenizer, add_bos=add_bos, name=name,
                               record_fields=record_fields(require_ground_truth, check_record))
