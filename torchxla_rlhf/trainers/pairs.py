"""Preference-pair plumbing shared by the DPO and reward-model trainers: datasets and
loaders from the config, micro-batch iteration, and the chosen/rejected rows of a batch."""

from __future__ import annotations

import logging
import math
from typing import Iterator

import torch

from torchxla_rlhf import checkpoint, runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.configs.loader import ConfigError
from torchxla_rlhf.data.preference import PreferenceDataset
from torchxla_rlhf.algos.optim import AdamW, Schedule
from torchxla_rlhf.trainers.base import Trainer, make_loader

logger = logging.getLogger(__name__)


def pair_rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask, loss_mask`` of a pair batch, each ``[2B, L]``: the B chosen
    rows then the B rejected rows, so both sides run in one forward. ``PreferenceDataset.get``
    already stacked them on the host (so the rows, not the pairs, split over dp*fsdp)."""
    return batch["input_ids"], batch["attention_mask"], batch["loss_mask"]


class PairData:
    """Training pairs (and optional held-out pairs) with their loaders; host batches."""

    def __init__(self, cfg, tokenizer, mesh: runtime.MeshInfo):
        self.train = PreferenceDataset.build(cfg.train_dataset, tokenizer, name="train_dataset")
        self.reports = {"train": self.train.report}
        self.eval = None
        if cfg.eval_dataset is not None:
            self.eval = PreferenceDataset.build(cfg.eval_dataset, tokenizer, name="eval_dataset")
            self.reports["eval"] = self.eval.report
        self.batch_size = cfg.train_dataset.batch_size
        self.train.report.check_fills_batch(self.batch_size, "train_dataset")
        self.loader = make_loader(self.train, cfg.train_dataset, mesh)
        self._eval_cfg = cfg.train_dataset  # held-out batches take the training batch size
        self._mesh = mesh
        self._iter: Iterator | None = None

    def total_updates(self, cfg) -> int:
        """``total_steps`` if set, else ``num_epochs`` passes counted in optimizer updates."""
        if cfg.total_steps is not None:
            return cfg.total_steps
        accumulate = cfg.optimizer.accumulate_gradient_steps
        updates = math.floor(self.loader.steps_per_epoch * cfg.num_epochs / accumulate)
        if updates < 1:
            raise ConfigError(
                f"num_epochs={cfg.num_epochs} over {self.loader.steps_per_epoch} batch(es) per "
                f"epoch gives no optimizer update with optimizer.accumulate_gradient_steps="
                f"{accumulate}; raise num_epochs or set total_steps", key="num_epochs")
        return updates

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next training micro-batch, on the host."""
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Held-out micro-batches in order, on the host; the last partial batch is dropped
        (static shapes)."""
        return iter(make_loader(self.eval, self._eval_cfg, self._mesh, train=False))


class PairTrainer(Trainer):
    """A trainer of one model on preference pairs (DPO, reward model).

    Subclasses build the model (:meth:`build_model`) and define :meth:`pair_loss`; this class
    owns the data, the optimizer and the compiled graphs. One optimizer update =
    ``accumulate_gradient_steps`` compiled micro-steps (loss / K backward into ``.grad``) + one
    compiled AdamW update. Graphs: first micro-step (grads created), later micro-steps (grads
    accumulated), the update, and the eval step; the eval graph compiles at step 0 (a baseline
    evaluation), the others during the first update, none after.
    """

    @classmethod
    def check_data(cls, cfg, tokenizer) -> None:
        ds = PreferenceDataset.build(cfg.train_dataset, tokenizer, name="train_dataset")
        ds.report.check_fills_batch(cfg.train_dataset.batch_size, "train_dataset")
        if cfg.eval_dataset is not None:
            PreferenceDataset.build(cfg.eval_dataset, tokenizer, name="eval_dataset")

    data_class = PairData
    """The data and loaders of a run (SFT: packed conversations, the same interface)."""

    def build(self) -> int:
        cfg = self.cfg
        self.data = self.data_class(cfg, self.ctx.tokenizer, self.ctx.mesh)
        total = self.data.total_updates(cfg)
        self.data_reports = self.data.reports
        self.model = self.build_model()
        self.model.train()
        self.accumulate = cfg.optimizer.accumulate_gradient_steps
        opt = cfg.optimizer
        self.optimizer = AdamW(
            self.model.parameters(), opt,
            Schedule.linear(opt.lr, opt.end_lr, opt.warmup_ratio, total),
        )
        self._micro = runtime.compile(self._micro_step, name=f"{self.name}_micro_step")
        self._update = runtime.compile(self._update_step, name=f"{self.name}_update")
        self._eval = runtime.compile(self._eval_step, name=f"{self.name}_eval_step")
        return total

    # -- what a pair trainer supplies -----------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        """The model to train (and anything else the loss needs); ``self.data`` exists."""
        raise NotImplementedError

    def pair_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and metric tensors of one micro-batch (traced into the graphs)."""
        raise NotImplementedError

    def host_fields(self, batch: dict, split: str) -> dict:
        """Add host-side fields to a ``"train"`` or ``"eval"`` batch before it goes to the
        device (DPO: cached reference log-probs). Default: the batch as it is."""
        return batch

    # -- resume -----------------------------------------------------------------------------

    def trained_models(self):
        return {"model": (self.model, self.optimizer)}

    def data_state(self):
        return self.data.loader.state_dict()

    def load_data_state(self, state):
        self.data.loader.load_state_dict(state)

    # -- compiled bodies ------------------------------------------------------------------

    def _micro_step(self, batch) -> dict[str, torch.Tensor]:
        loss, metrics = self.pair_loss(batch)
        (loss / self.accumulate).backward()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}

    def _update_step(self, micro_metrics: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = self.optimizer.step()
        for key in micro_metrics[0]:
            out[key] = torch.stack([m[key] for m in micro_metrics]).mean()
        return runtime.pack_scalars(out)  # the step's metrics: one buffer, read once

    @torch.no_grad()
    def _eval_step(self, batch) -> dict[str, torch.Tensor]:
        loss, metrics = self.pair_loss(batch)
        return {"loss": loss, **metrics}

    # -- loop hooks -----------------------------------------------------------------------

    def _device_batch(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        """A host batch with its extra fields, on the device (dim 0 sharded over dp, fsdp)."""
        return runtime.batch_to_device(self.host_fields(batch, split), self.ctx.mesh)

    def train_step(self) -> dict[str, torch.Tensor]:
        micro = [self._micro(self._device_batch(self.data.next_batch(), "train"))
                 for _ in range(self.accumulate)]
        return self._update(micro)

    def evaluate(self) -> dict[str, torch.Tensor]:
        if self.data.eval is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        results = [self._eval(self._device_batch(b, "eval")) for b in self.data.eval_batches()]
        self.model.train(was_training)
        if not results:
            logger.warning("eval_dataset has fewer pairs than one batch: nothing evaluated")
            return {}
        return {k: torch.stack([r[k] for r in results]).mean() for k in results[0]}

    def save(self, path: str) -> None:
        checkpoint.save_hf_checkpoint(
            self.model, self.ctx.tokenizer, path,
            save_dtype=llama.DTYPES[self.cfg.save_dtype], is_main_process=self.ctx.is_main,
        )
