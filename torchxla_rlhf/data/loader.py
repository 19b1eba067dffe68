"""Seeded, resumable, host-sharded batch loader over an in-memory dataset.

Order: epoch ``e`` visits ``permutation_e = Generator(PCG64(SeedSequence([seed, e]))).permutation(N)``
(or ``arange(N)`` without shuffle). Global batch ``s`` of epoch ``e`` is
``permutation_e[s*B : (s+1)*B]``; every host computes the same permutation (no communication)
and takes its contiguous share ``rows [p*B/P, (p+1)*B/P)``, which is what a batch sharded over
``(dp, fsdp)`` expects when hosts are laid out in process order.

Static shapes: with ``drop_last`` (default) the incomplete last batch is dropped, as in the
paper's runs. ``drop_last=False`` keeps every example by completing the last batch with the
first indices of the same epoch's order (so shapes stay static; consumers that must see each
example once, like reference log-prob precomputation, key results by ``index``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

__all__ = ["BatchLoader"]


class IndexedDataset(Protocol):
    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> dict[str, Any]: ...


class BatchLoader:
    """Iterate ``dataset.get(indices)`` batches, this host's share of each global batch.

    Args:
      dataset: anything with ``__len__`` and ``get(indices)``.
      global_batch_size: B, examples per step over all hosts; divisible by ``process_count``.
      shuffle: permute each epoch (seeded by ``(seed, epoch)``); else dataset order.
      seed: permutation seed.
      drop_last: drop the incomplete last batch (else complete it by wrapping around).
      process_index, process_count: this host and the number of hosts.
      num_epochs: stop after this many epochs; ``None`` iterates forever.

    The loader is its own state: :meth:`state_dict` after k batches, loaded into a fresh
    loader, makes it yield exactly batch k+1 onwards of the uninterrupted run.
    """

    def __init__(
        self,
        dataset: IndexedDataset,
        global_batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
    ) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch_size {global_batch_size} is not divisible by the number of hosts {process_count}"
            )
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        self.dataset = dataset
        self.num_examples = len(dataset)
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.num_epochs = num_epochs
        self.local_batch_size = global_batch_size // process_count
        if drop_last:
            self.steps_per_epoch = self.num_examples // global_batch_size
        else:
            self.steps_per_epoch = -(-self.num_examples // global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"dataset has {self.num_examples} examples, fewer than one global batch of "
                f"{global_batch_size} (drop_last={drop_last})"
            )
        self._epoch = 0
        self._step = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def total_steps(self) -> int | None:
        """Steps over all epochs, ``None`` when infinite."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``: int64 ``[N]`` (same on every host)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        order = order.astype(np.int64)
        self._order_cache = (epoch, order)
        return order

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Dataset indices of global batch ``step`` of ``epoch``: int64 ``[B]``."""
        order = self.epoch_order(epoch)
        positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        return order[positions % self.num_examples]  # wraps only on the last batch (drop_last=False)

    def local_indices(self, epoch: int, step: int) -> np.ndarray:
        """This host's rows of the global batch: int64 ``[B / process_count]``."""
        lo = self.process_index * self.local_batch_size
        return self.global_indices(epoch, step)[lo : lo + self.local_batch_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.num_epochs is None or self._epoch < self.num_epochs:
            epoch, step = self._epoch, self._step
            indices = self.local_indices(epoch, step)
            # Advance before yielding: state_dict() taken after receiving a batch resumes after it.
            self._step += 1
            if self._step == self.steps_per_epoch:
                self._epoch, self._step = epoch + 1, 0
            yield self.dataset.get(indices)

    def state_dict(self) -> dict[str, Any]:
        """Position (next batch to yield) plus what must match on resume."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; the data order settings must match (else the resumed
        run would silently see different batches)."""
        for key in ("seed", "shuffle", "global_batch_size", "num_examples", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state mismatch on '{key}': checkpoint has {state[key]!r}, "
                    f"this run has {getattr(self, key)!r}"
                )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"loader state out of range: epoch {epoch}, step {step} (steps_per_epoch {self.steps_per_epoch})")
        self._epoch, self._step = epoch, step
