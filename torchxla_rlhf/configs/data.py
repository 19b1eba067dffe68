"""Dataset configuration: where examples come from and how they are cut to static shapes
(:class:`DataSource`, enough for held-out pairs), plus how a training set is batched and
shuffled (:class:`DatasetConfig`; preference and prompt datasets alike).

Field names follow EasyLM's ``--train_dataset.json_torch_dataset.*`` /
``--train_dataset.tulu_prompt_dataset.*`` flags, so ``hf_name``, ``hf_split``, ``path``,
``seq_length``, ``batch_size`` and ``remove_truncated_samples`` mean what they meant there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchxla_rlhf.configs.loader import RELATIVE_PATH

__all__ = ["DataSource", "DatasetConfig"]


@dataclass
class DataSource:
    """Where a dataset comes from and how its examples are cut to static shapes. Held-out
    pairs (``eval_dataset``) are only this: they are evaluated in order, in
    ``train_dataset.batch_size`` batches."""

    hf_name: str | None = None
    """HF hub dataset id, e.g. ``allenai/tulu-2.5-preference-data``. Exactly one of
    ``hf_name`` / ``path`` must be set. ``$HF_TOKEN`` is used for gated datasets."""

    hf_split: str = "train"
    """Split of ``hf_name``; Tulu 2.5 has one split per source, e.g.
    ``ultrafeedback_mean_aspects`` or ``ultrafeedback_prompts``."""

    path: str | None = field(default=None, metadata={RELATIVE_PATH: True})
    """A JSON-lines file: local path, ``gs://bucket/file.jsonl`` (needs gcsfs), or any fsspec URL
    (``memory://``, ``https://``...). One JSON object per line, same fields as the hub data.
    A relative path is read from the working directory; set in a config file and not found
    there, from that file's folder."""

    seq_length: int = 4096
    """Every sequence is padded (or truncated) to this many tokens. For prompts: the prompt
    length PL."""

    remove_truncated_samples: bool = False
    """Drop examples whose untruncated tokenization is longer than ``seq_length``."""

    skip_malformed: bool = False
    """Count and skip bad records (malformed JSON, missing fields, bad roles...) instead of
    raising :class:`~torchxla_rlhf.data.chat.DataError`."""

    max_samples: int | None = None
    """Read at most this many records (before any filtering); ``None`` reads everything."""

    max_dropped_fraction: float = 0.5
    """Fail (showing the data report) when more than this fraction of the records read is
    dropped (no loss token left, truncated with ``remove_truncated_samples``, malformed):
    a short ``seq_length`` should not silently train on a sliver of the data."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""
        if (self.hf_name is None) == (self.path is None):
            raise ValueError(
                "DatasetConfig: set exactly one of 'hf_name' and 'path' "
                f"(got hf_name={self.hf_name!r}, path={self.path!r})"
            )
        if self.hf_name is not None and not self.hf_name.strip():
            raise ValueError("DatasetConfig.hf_name: must be a non-empty dataset id")
        if self.path is not None and not self.path.strip():
            raise ValueError("DatasetConfig.path: must be a non-empty path or URL")
        if self.hf_name is not None and not self.hf_split:
            raise ValueError("DatasetConfig.hf_split: must be a non-empty split name")
        _positive_int(self, "seq_length")
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples <= 0
        ):
            raise ValueError(
                f"DatasetConfig.max_samples: expected a positive integer or None, got {self.max_samples!r}"
            )
        if not 0.0 <= self.max_dropped_fraction <= 1.0:
            raise ValueError(
                f"DatasetConfig.max_dropped_fraction: expected a fraction in [0, 1], got {self.max_dropped_fraction!r}"
            )


@dataclass
class DatasetConfig(DataSource):
    """A training dataset: its source, and how it is batched and shuffled."""

    batch_size: int = 8
    """Global batch: sequences (preference pairs, or prompts) per optimizer micro-step over all
    hosts together."""

    shuffle: bool = True
    """Shuffle every epoch with a permutation seeded by (``seed``, epoch), the same on every
    host."""

    seed: int = 42
    """Seed of the shuffling permutation."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""
        super().validate()
        _positive_int(self, "batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"DatasetConfig.seed: expected a non-negative integer, got {self.seed!r}")


def _positive_int(cfg: DataSource, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"DatasetConfig.{name}: expected a positive integer, got {value!r}")
