"""Data: the Tulu chat format, preference and prompt datasets, sources, loaders, synthetic task.

Pure Python / numpy / torch (CPU); nothing here imports torch_xla. Batches come out as host
tensors with static shapes; the trainer moves and shards them.

The names below are imported on first use: ``torchxla_rlhf.configs`` needs only
``data.config``, and loading a config (``--help``, a typo) must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchLoader": "loader",
    "DataError": "chat",
    "DataSource": "config",
    "DatasetConfig": "config",
    "PreferenceDataset": "preference",
    "PromptDataset": "prompts",
    "TokenizedSide": "chat",
    "format_messages": "chat",
    "format_prompt": "chat",
    "iter_records": "sources",
    "prompt_messages_from_record": "chat",
    "tokenize_preference_side": "chat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
