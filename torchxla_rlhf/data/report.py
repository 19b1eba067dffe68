"""What a dataset build kept and dropped, printed at start-up and logged to wandb.

Nothing is dropped silently: every record read is either kept (possibly truncated) or counted
under one reason. The untruncated token lengths give percentiles and the ``seq_length`` that
would keep a given fraction of the data, which is what a user needs when a run drops most of
its examples.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from torchxla_rlhf.data.chat import DataError

logger = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)


@dataclass
class DataReport:
    """Counts of one dataset build.

    Attributes:
      name: what the data is (``train_dataset data/x.jsonl``).
      seq_length: the configured length examples were cut to.
      kept: examples kept (``truncated_kept`` of them truncated to ``seq_length``).
      dropped: ``{reason: count}``; reasons ``no_loss_token`` (the prompt fills
        ``seq_length``), ``truncated`` (``remove_truncated_samples``), ``malformed``
        (``skip_malformed``).
      lengths: untruncated token length of every tokenized example (a pair: its longer side).
    """

    name: str
    seq_length: int
    kept: int = 0
    truncated_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def from_build(cls, kind: str, cfg, name: str | None, stats: dict[str, int],
                   lengths: list[int]) -> "DataReport":
        """The report of a dataset build from its ``stats`` counters (``kept``,
        ``truncated_kept``, ``dropped_*``, ``skipped_malformed``), logged line by line.
        ``kind`` names the data when no ``name`` is given (``preference data <path>``)."""
        dropped = {"truncated": stats.get("dropped_truncated", 0),
                   "malformed": stats.get("skipped_malformed", 0)}
        if "dropped_no_loss_tokens" in stats:
            dropped["no_loss_token"] = stats["dropped_no_loss_tokens"]
        source = cfg.path or f"{cfg.hf_name}[{cfg.hf_split}]"
        report = cls(name or f"{kind} {source}", cfg.seq_length, kept=stats["kept"],
                     truncated_kept=stats["truncated_kept"], dropped=dropped,
                     lengths=np.asarray(lengths, dtype=np.int64))
        for line in report.lines():
            logger.info("%s", line)
        return report

    @property
    def read(self) -> int:
        return self.kept + sum(self.dropped.values())

    @property
    def dropped_fraction(self) -> float:
        return sum(self.dropped.values()) / self.read if self.read else 0.0

    def length_to_keep(self, fraction: float) -> int:
        """The smallest ``seq_length`` under which ``fraction`` of the tokenized examples fit
        untruncated."""
        if not len(self.lengths):
            return 0
        ordered = np.sort(self.lengths)
        return int(ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)])

    def lines(self) -> list[str]:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()) if v) or "none"
        out = [f"{self.name}: read {self.read}, kept {self.kept} "
               f"({self.truncated_kept} truncated to seq_length={self.seq_length}), dropped: {dropped}"]
        if len(self.lengths):
            pct = np.percentile(self.lengths, PERCENTILES).round().astype(int)
            out.append(f"{self.name}: untruncated tokens " +
                       ", ".join(f"p{p} {v}" for p, v in zip(PERCENTILES, pct)) +
                       f", max {int(self.lengths.max())}; seq_length {self.length_to_keep(0.95)} "
                       f"keeps 95 %")
        return out

    COLUMNS = ("dataset", "seq_length", "read", "kept", "truncated_kept", "dropped_no_loss_token",
               "dropped_truncated", "dropped_malformed", "length_p50", "length_p95", "length_max",
               "seq_length_for_95pct")

    def row(self) -> list:
        """One row of the ``data_report`` table (columns :attr:`COLUMNS`) for wandb and
        ``data_report.jsonl``."""
        lengths = self.lengths if len(self.lengths) else np.zeros(1, np.int64)
        return [self.name, self.seq_length, self.read, self.kept, self.truncated_kept,
                self.dropped.get("no_loss_token", 0), self.dropped.get("truncated", 0),
                self.dropped.get("malformed", 0), float(np.percentile(lengths, 50)),
                float(np.percentile(lengths, 95)), int(lengths.max()), self.length_to_keep(0.95)]

    def check(self, max_dropped_fraction: float) -> None:
        """Raise :class:`DataError` with the report when too much was dropped (or nothing kept)."""
        if self.kept and self.dropped_fraction <= max_dropped_fraction:
            return
        why = ("no usable example" if not self.kept else
               f"{self.dropped_fraction:.0%} of the records were dropped "
               f"(max_dropped_fraction={max_dropped_fraction:g})")
        fix = ""
        if self.dropped.get("no_loss_token") or self.dropped.get("truncated"):
            fix = f"; seq_length={self.length_to_keep(0.95)} would keep 95 %"
        raise DataError(f"{self.name}: {why}{fix} [" + " | ".join(self.lines()) + "]")

    def check_fills_batch(self, batch_size: int, key: str) -> None:
        """Raise :class:`DataError` when fewer examples were kept than one global batch,
        saying how many were dropped and why."""
        if self.kept >= batch_size:
            return
        raise DataError(f"{key}: {self.kept} usable examples, fewer than one batch of "
                        f"{key}.batch_size={batch_size} [" + " | ".join(self.lines()) + "]")
