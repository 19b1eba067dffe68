"""Data: the Tulu chat format, tokenizers, preference, prompt and chat datasets, sources,
loaders, packing, the synthetic task. (The data sections of a config tree, ``DatasetConfig``
and ``DataSource``, are in :mod:`torchxla_rlhf.configs.data`.)

Pure Python / numpy / torch (CPU); nothing here imports torch_xla. Batches come out as host
tensors with static shapes; the trainer moves and shards them. The names below are imported
on first use, so that importing the package loads no torch.
"""

import importlib

_EXPORTS = {
    "DataError": "chat",
    "TokenizedSide": "chat",
    "format_messages": "chat",
    "format_prompt": "chat",
    "prompt_messages_from_record": "chat",
    "tokenize_preference_side": "chat",
    "BatchLoader": "loader",
    "PreferenceDataset": "preference",
    "PromptDataset": "prompts",
    "iter_records": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
