"""What a trainer puts on the mesh, as plain data: the models (:class:`ModelRole`) and the rows
it uploads per step (:class:`Batch`). Every layer may import this module; it imports nothing of
the package. Each trainer's config class returns them (``model_roles()``, ``batches()``); the
pre-flight, the memory plan and the pipeline read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Head = Literal["causal", "classifier"]
"""A model's head: ``causal`` (LM head) or ``classifier`` (one-label score head)."""


@dataclass(frozen=True)
class ModelRole:
    """One model a trainer puts on the mesh."""

    role: str
    """What it is in this run (``policy``, ``reference``, ``reward model``, ``value model``)."""
    key: str
    """The config key whose ``ModelConfig`` gives its weights and dtypes."""
    trained: bool
    """Trained (parameters, gradients, AdamW moments) or frozen."""
    head: Head
    """``causal`` (LM head) or ``classifier`` (one-label score head)."""
    resident: bool = True
    """Held on the devices while training (False: used once at start-up, then freed)."""


@dataclass(frozen=True)
class Batch:
    """Rows a trainer uploads (or splits on the device) per step, dim 0 over ``dp*fsdp``."""

    what: str
    key: str
    """The config key that sets them."""
    rows: int
    must_divide: bool = True
    """False: an uneven split runs (GSPMD pads the shards) and is only warned about."""
