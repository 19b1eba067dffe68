"""Supervised fine-tuning (``trainer: sft``, docs/sft.md): its config tree and its memory terms.

Torch-free, like every config module: ``--help``, ``--check`` and ``plan`` read it without
loading model code. The trainer is :mod:`torchxla_rlhf.trainers.sft`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torchxla_rlhf.preflight import memory_plan
from torchxla_rlhf.configs.sections import OptimizerConfig, RunConfig
from torchxla_rlhf.configs.data import DataSource, DatasetConfig
from torchxla_rlhf.roles import Batch, ModelRole


@dataclass
class SFTOptimizerConfig(OptimizerConfig):
    """AdamW and the schedule; the defaults are Tulu 2's SFT (open-instruct's
    ``finetune.py``): lr 2e-5, 3 % linear warmup, linear decay to 0."""

    lr: float = 2e-5
    """Peak learning rate."""
    warmup_ratio: float = 0.03
    """Fraction of optimizer updates spent warming up linearly from 0 to ``lr``."""


@dataclass
class SFTConfig(RunConfig):
    """``python -m torchxla_rlhf train --config sft.yaml``: supervised fine-tuning of a causal
    LM on chat conversations (Tulu / open-instruct ``messages`` schema), the loss on the
    assistant turns only, conversations packed into fixed-length rows (docs/sft.md)."""

    trainer: str = "sft"
    """The trainer this config is for; a trainer refuses a file that names another."""
    output_dir: str = "outputs/sft"
    """Where checkpoints, the resolved config and metrics.jsonl go (local or gs://)."""
    optimizer: SFTOptimizerConfig = field(default_factory=SFTOptimizerConfig)
    """AdamW, clipping, accumulation and schedule (Tulu 2's SFT defaults)."""
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Conversations: records with a list of ``{"role", "content"}`` messages under
    ``messages_key``. ``seq_length`` is the length of a row (packed: several conversations per
    row); ``batch_size`` the rows per micro-batch over all hosts."""
    eval_dataset: DataSource | None = None
    """Held-out conversations (optional): their loss, at start, every eval_freq updates and at
    the end (packed and batched as the training data, in order)."""
    eval_freq: int = 0
    """Evaluate every N updates (0: only at start and end, if eval_dataset)."""
    messages_key: str = "messages"
    """The record field holding the conversation (``messages`` in the Tulu SFT mixture;
    ``chosen`` trains on the preferred side of preference data)."""
    packing: bool = True
    """Pack several conversations into each ``seq_length`` row (best-fit decreasing, as TRL's
    ``packing_strategy="bfd"``); attention stays inside each conversation and positions
    restart at 0 for each. False: one conversation per row, right-padded (the padding is
    computed and thrown away)."""

    def validate(self) -> None:
        super().validate()
        if self.eval_freq < 0:
            raise ValueError("eval_freq: must be >= 0")
        if not self.messages_key:
            raise ValueError("messages_key: must name the record field holding the messages")

    def model_roles(self) -> list:
        """The policy, trained; nothing else."""
        return [ModelRole("policy", "model", True, "causal")]

    def batches(self) -> list:
        """Rows uploaded per micro-batch (held-out rows come in batches of the same size)."""
        return [Batch("train_dataset.batch_size rows", "train_dataset.batch_size",
                      self.train_dataset.batch_size)]

    def sequence_length(self) -> tuple[str, int]:
        """The longest row a model sees, and the keys that set it."""
        lengths = [self.train_dataset.seq_length]
        if self.eval_dataset is not None:
            lengths.append(self.eval_dataset.seq_length)
        return "train_dataset.seq_length", max(lengths)

    def memory_terms(self, shapes, mesh, hbm_bytes, notes, *, gradients, compiler):
        return plan_sft(self, shapes, mesh, hbm_bytes, notes, gradients=gradients,
                        compiler=compiler)


def plan_sft(cfg: Any, shapes: Mapping[str, memory_plan.Shape], mesh: memory_plan.Mesh,
             hbm_bytes: float | None, notes: list[str], gradients: str = "reduce_scatter",
             compiler: str = "tpu") -> memory_plan.Plan:
    """Memory terms of SFT: one trained causal LM (parameters, gradients, AdamW moments) and a
    micro-step over ``batch_size`` rows of ``seq_length`` (the pair trainers' terms with one
    row per example instead of two), plus the packed rows' attention mask: an additive
    ``[rows, 1, L, L]`` float32 tensor per device (built on the device from the segment ids,
    broadcast over the heads), held through the forward and the backward."""
    n = mesh.devices
    shape, model_cfg = shapes["model"], cfg.model
    seq = cfg.train_dataset.seq_length
    rows = memory_plan.rows_per_device(cfg.train_dataset.batch_size, mesh, "train_dataset.batch_size")
    tiled = mesh if compiler == "tpu" else None
    persistent = memory_plan.trained_terms("model", shape, True, model_cfg.param_dtype, n, tiled)
    passes = [memory_plan.TrainedPass("model", shape, model_cfg, rows, seq, True)]
    mask = memory_plan.Term("packed attention mask", rows * seq * seq * 4,
                            f"{rows:g} rows x {seq} x {seq}, float32 (segment-diagonal, causal)")
    if compiler == "tpu":
        phases = {"train micro-step": memory_plan.train_terms_tpu(passes, mesh) + [mask],
                  "train update": memory_plan.update_terms_tpu(persistent)}
    else:
        phases = {"train micro-step": memory_plan.train_terms(
            passes, mesh, gradients, memory_plan.forward_gathered(cfg, shapes, mesh)) + [mask]}
    return memory_plan.Plan(cfg.trainer, mesh, hbm_bytes, persistent, phases, notes)
