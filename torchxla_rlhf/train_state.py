"""Training state for exact resume, next to the HF weights of a checkpoint.

``<checkpoint>/training_state/``::

    <name>.safetensors      for each trained model: its parameters in their training dtype
                            (``param.<fqn>``), AdamW's moments (``exp_avg.<fqn>``,
                            ``exp_avg_sq.<fqn>``) and update count (``count``)
    trainer_state.json      step, data-loader position, and what must match on resume
    _COMPLETE               written last

Everything random in training is a function of ``(seed, step)`` (the data order of each epoch,
PPO's sampling noise), and the learning rate is a function of the optimizer's update count, so
with these the resumed run computes what the uninterrupted one would have, bit for bit.

Cost: each model's state (3x its parameters in fp32) is gathered to the host tensor by tensor
(on several hosts every process makes the same copies; only process 0 writes), one model at a
time. That is fine up to a few billion parameters; for 13B+ the next step is
``torch.distributed.checkpoint`` with torch_xla's SPMD planners (each host writes its own
shards; see the 2.9 planner bug in ``checkpoint.py``'s notes). Off by default, as the paper's
runs (``--checkpointer.save_optimizer_state=False``).
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import safetensors.torch
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.checkpoint import COMPLETE_MARKER, read_json, write_json
from torchxla_rlhf.optim import AdamW

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"


def _trained(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs an :class:`AdamW` over ``model.parameters()`` holds, in
    its order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_training_state(
    path: str,
    trained: dict[str, tuple[torch.nn.Module, AdamW]],
    trainer_state: dict[str, Any],
    *,
    is_main_process: bool,
) -> None:
    """Write ``trained`` models' parameters and optimizer state plus ``trainer_state`` (JSON)
    under ``<path>/training_state`` (``path`` is a checkpoint directory)."""
    root = f"{path.rstrip('/')}/{STATE_DIR}"
    fs, froot = fsspec.core.url_to_fs(root)
    if is_main_process:
        if fs.exists(froot):
            fs.rm(froot, recursive=True)
        fs.makedirs(froot, exist_ok=True)
    for name, (model, opt) in trained.items():
        named = _trained(model)
        if len(named) != len(opt.params):
            raise ValueError(f"{name}: the optimizer holds {len(opt.params)} tensors, the model "
                             f"{len(named)} trainable parameters")
        tensors: dict[str, torch.Tensor] = {"count": runtime.to_cpu(opt.count)}
        # Tensor by tensor: a collective per tensor on several hosts, in the same order.
        for (fqn, p), m, v in zip(named, opt.exp_avg, opt.exp_avg_sq):
            tensors[f"param.{fqn}"] = runtime.to_cpu(p).contiguous()
            tensors[f"exp_avg.{fqn}"] = runtime.to_cpu(m).contiguous()
            tensors[f"exp_avg_sq.{fqn}"] = runtime.to_cpu(v).contiguous()
        if is_main_process:
            with fs.open(f"{froot}/{name}.safetensors", "wb") as f:
                f.write(safetensors.torch.save(tensors))
        del tensors
    if is_main_process:
        write_json(f"{root}/{TRAINER_STATE}", trainer_state)
        with fs.open(f"{froot}/{COMPLETE_MARKER}", "wb") as f:
            f.write(b"")


def has_training_state(path: str) -> bool:
    """True iff ``path`` holds a complete ``training_state``."""
    fs, p = fsspec.core.url_to_fs(f"{path.rstrip('/')}/{STATE_DIR}/{COMPLETE_MARKER}")
    return fs.exists(p)


@torch.no_grad()
def load_training_state(path: str, trained: dict[str, tuple[torch.nn.Module, AdamW]]) -> dict[str, Any]:
    """Copy parameters and optimizer state from ``<path>/training_state`` into the (sharded)
    device tensors in place, and return the trainer state JSON."""
    if not has_training_state(path):
        raise FileNotFoundError(
            f"{path}: no complete {STATE_DIR}/ (was the run saved with save_training_state=true?)"
        )
    root = f"{path.rstrip('/')}/{STATE_DIR}"
    fs, froot = fsspec.core.url_to_fs(root)
    for name, (model, opt) in trained.items():
        file = f"{froot}/{name}.safetensors"
        with fs.open(file, "rb") as f:
            tensors = safetensors.torch.load(f.read())
        named = _trained(model)
        expected = {"count"} | {f"{k}.{fqn}" for fqn, _ in named for k in ("param", "exp_avg", "exp_avg_sq")}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"{root}/{name}.safetensors does not fit the model: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}")
        # copy_ into the existing device tensors keeps their sharding.
        for (fqn, p), m, v in zip(named, opt.exp_avg, opt.exp_avg_sq):
            p.copy_(tensors[f"param.{fqn}"])
            m.copy_(tensors[f"exp_avg.{fqn}"])
            v.copy_(tensors[f"exp_avg_sq.{fqn}"])
        opt.count.copy_(tensors["count"])
        del tensors
    runtime.sync()
    return read_json(f"{root}/{TRAINER_STATE}")
