"""Data: the Tulu chat format, preference and prompt datasets, sources, loaders, synthetic task.

Pure Python / numpy / torch (CPU); nothing here imports torch_xla. Batches come out as host
tensors with static shapes; the trainer moves and shards them.
"""

from torchxla_rlhf.data.chat import (
    DataError,
    TokenizedSide,
    format_messages,
    format_prompt,
    prompt_messages_from_record,
    tokenize_preference_side,
)
from torchxla_rlhf.data.config import DataSource, DatasetConfig
from torchxla_rlhf.data.loader import BatchLoader
from torchxla_rlhf.data.preference import PreferenceDataset
from torchxla_rlhf.data.prompts import PromptDataset
from torchxla_rlhf.data.sources import iter_records

__all__ = [
    "BatchLoader",
    "DataError",
    "DataSource",
    "DatasetConfig",
    "PreferenceDataset",
    "PromptDataset",
    "TokenizedSide",
    "format_messages",
    "format_prompt",
    "iter_records",
    "prompt_messages_from_record",
    "tokenize_preference_side",
]
