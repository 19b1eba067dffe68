"""Numerics on the device: autocast, the device RNG seed, activation checkpointing."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def activation_checkpoint_fn() -> Callable:
    """torch_xla's reentrant activation checkpoint (``torch.utils.checkpoint`` crashes on XLA
    tensors), for HF's gradient-checkpointing hook."""
    from functools import partial

    import torch_xla.utils.checkpoint as xla_checkpoint

    return partial(xla_checkpoint.checkpoint, use_reentrant=True)


def autocast(compute_dtype: str, param_dtype: str):
    """Autocast to ``compute_dtype`` (bf16 matmuls over fp32 parameters) on the XLA device;
    a no-op when the dtypes agree or compute is float32."""
    if compute_dtype == param_dtype or compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("xla", dtype=getattr(torch, compute_dtype))


def manual_seed(seed: int) -> None:
    """Seed the XLA device RNG (and torch's CPU RNG)."""
    import torch_xla.core.xla_model as xm

    torch.manual_seed(seed)
    xm.set_rng_state(seed)
