"""What every trainer shares: run set-up (runtime, mesh, output directory, resolved config,
tokenizer, tracker), the outer loop (update -> log -> evaluate -> checkpoint), and preemption.

A trainer subclass supplies :meth:`Trainer.train_step` (one optimizer update, returning device
metric tensors), :meth:`Trainer.evaluate` and :meth:`Trainer.save`; the order of operations
lives here once.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from torchxla_rlhf import checkpoint, memory_plan, runtime, train_state
from torchxla_rlhf.config import save_config, to_dict
from torchxla_rlhf.tokenizers import load_tokenizer
from torchxla_rlhf.tracking import Tracker

logger = logging.getLogger("torchxla_rlhf")


def setup_logging() -> None:
    """Console logging for the entry points (process 0 at INFO, the others at WARNING)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@dataclass
class RunContext:
    """Objects every trainer needs, built once from the config by :func:`setup_run`."""

    cfg: Any
    mesh: runtime.MeshInfo
    tokenizer: Any
    output_dir: str
    is_main: bool


def setup_run(cfg: Any) -> RunContext:
    """Runtime and mesh first (SPMD must be on before any tensor reaches the device), then
    the output directory with the resolved config (process 0 only), then the tokenizer."""
    runtime.init()
    runtime.manual_seed(cfg.seed)
    mesh = runtime.make_mesh(cfg.mesh_dim)
    # Issue 9: stop before loading any weights when the run cannot fit (logs the plan).
    memory_plan.check_fits(cfg, runtime.device_count(), runtime.device_memory_bytes())
    is_main = runtime.is_main_process()
    output_dir = cfg.output_dir.rstrip("/")
    if is_main:
        fs, path = fsspec.core.url_to_fs(output_dir)
        fs.makedirs(path, exist_ok=True)
        save_config(cfg, f"{output_dir}/config.yaml")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.name_or_path, cfg.tokenizer_pad_token_id)
    return RunContext(cfg=cfg, mesh=mesh, tokenizer=tokenizer, output_dir=output_dir, is_main=is_main)


class Trainer:
    """The outer loop shared by all trainers.

    Steps are optimizer updates (TRL's ``global_step``), numbered from 1. ``log_freq``,
    ``eval_freq``, ``save_model_freq`` and ``save_milestone_freq`` count them.
    """

    name = "trainer"

    def __init__(self, ctx: RunContext, total_steps: int):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.total_steps = total_steps
        self.step = 0
        self.tracker = Tracker(
            self.cfg.logger, ctx.output_dir, to_dict(self.cfg), ctx.is_main, total_steps
        )
        self.ckpt_schedule = checkpoint.CheckpointSchedule(
            self.cfg.save_model_freq, self.cfg.save_milestone_freq
        )
        self._preempted = False
        self._previous_sigterm = None
        self.compiles_first_step: int | None = None
        """XLA compilations during the first training step: the loop's graphs."""
        self.compiles_after_first_step: int | None = None
        """XLA compilations during training steps 2.. (should stay 0; checkpoints excluded)."""
        self._compiles_at_first_step = 0
        self.last_metrics: dict[str, float] = {}
        """The most recently logged values (training and eval), as host floats."""

    # -- subclasses --------------------------------------------------------------------

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer update; returns metric tensors still on the device."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, torch.Tensor]:
        """Held-out metrics (device tensors); empty when nothing is configured."""
        return {}

    def save(self, path: str) -> None:
        """Write the model(s) being trained to ``path`` in HF format."""
        raise NotImplementedError

    def trained_models(self) -> dict[str, tuple[torch.nn.Module, Any]]:
        """``{name: (model, optimizer)}`` of what this trainer updates (for resume)."""
        raise NotImplementedError

    def data_state(self) -> dict[str, Any]:
        """Position of the data pipeline (for resume)."""
        return {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`data_state`."""

    # -- resume ------------------------------------------------------------------------

    def maybe_resume(self) -> None:
        """Load ``resume_from``'s training state (call at the end of the constructor)."""
        source = self.cfg.resume_from
        if not source:
            return
        if source == "auto":
            source = f"{self.ctx.output_dir}/{self.ckpt_schedule.latest_name}"
            if not train_state.has_training_state(source):
                logger.info("resume_from=auto: no training state at %s, starting fresh", source)
                return
        state = train_state.load_training_state(source, self.trained_models())
        if state.get("total_steps") != self.total_steps:
            logger.warning("resuming a run planned for %s steps as one of %s steps",
                           state.get("total_steps"), self.total_steps)
        self.step = int(state["step"])
        self.load_data_state(state.get("data", {}))
        logger.info("resumed from %s at step %d", source, self.step)

    # -- the loop ----------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Run to ``total_steps`` (or until SIGTERM); returns the last logged metrics."""
        self._install_sigterm_handler()
        eval_freq = getattr(self.cfg, "eval_freq", 0)
        # Run what set-up left pending (optimizer state, buffers) as its own graph, so that the
        # first step's graphs are the same as every later step's.
        runtime.sync()
        compiles_at_start = runtime.compile_count()
        try:
            t_prev = time.perf_counter()
            while self.step < self.total_steps:
                metrics = dict(self.train_step())
                self.step += 1
                if self.compiles_after_first_step is None:
                    # Every graph of the loop exists now; count what compiles after this.
                    self._compiles_at_first_step = runtime.compile_count()
                    self.compiles_first_step = self._compiles_at_first_step - compiles_at_start
                    self.compiles_after_first_step = 0
                else:
                    self.compiles_after_first_step = (
                        runtime.compile_count() - self._compiles_at_first_step
                    )
                now = time.perf_counter()
                # Dispatch is asynchronous: in steady state this interval is the step time.
                metrics["time/step_s"] = now - t_prev
                t_prev = now
                if self.tracker.should_log(self.step):
                    self.log_metrics(self.step, metrics)
                is_last = self.step == self.total_steps
                if eval_freq and (self.step % eval_freq == 0 or is_last):
                    self._log_eval()
                for name in self.ckpt_schedule.actions(self.step, is_last):
                    self._save_uncounted(f"{self.ctx.output_dir}/{name}")
                if self._preempted:
                    logger.warning("SIGTERM: saving at step %d and stopping", self.step)
                    self._save_uncounted(f"{self.ctx.output_dir}/{self.ckpt_schedule.latest_name}")
                    break
            runtime.sync()
            runtime.wait()
            if self.compiles_after_first_step:
                logger.warning(
                    "%d XLA compilation(s) after the first step: a shape or a Python scalar "
                    "changes between steps (PT_XLA_DEBUG_LEVEL=1 says why)",
                    self.compiles_after_first_step,
                )
        finally:
            self._restore_sigterm_handler()
        return self.last_metrics

    def _save_uncounted(self, path: str) -> None:
        # Gathering sharded weights to the host runs torch_xla's replicate graphs, which count
        # as compilations; they are not training-step graphs, so keep them out of the count.
        before = runtime.compile_count()
        self.save(path)
        if self.cfg.save_training_state:
            train_state.save_training_state(
                path, self.trained_models(),
                {"step": self.step, "total_steps": self.total_steps, "data": self.data_state()},
                is_main_process=self.ctx.is_main,
            )
        self._compiles_at_first_step += runtime.compile_count() - before

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Log device tensors (and host floats) after the current graph has run: a step
        closure, so reading them adds no host sync to the loop."""

        def scalar(v) -> float:
            if isinstance(v, (list, tuple)):  # one value per update/micro-batch: the mean
                return sum(scalar(x) for x in v) / max(len(v), 1)
            # Inside a step closure the value is already computed: a copy, not a graph run.
            return float(v.item()) if isinstance(v, torch.Tensor) else float(v)

        def record(step: int, metrics: dict) -> None:
            values = {k: scalar(v) for k, v in metrics.items()}
            self.last_metrics.update(values)
            self.tracker.log(step, values)

        runtime.add_step_closure(record, args=(step, metrics))

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.log_metrics(self.step, {f"eval/{k}": v for k, v in metrics.items()})
            runtime.sync()

    def close(self) -> None:
        self.tracker.close()

    # -- preemption --------------------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        # TPU VMs get SIGTERM before a preemption: finish the current update, save, stop.
        def handler(signum, frame):
            self._preempted = True

        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. called from a worker thread)
            self._previous_sigterm = None

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)


def run(trainer_cls: type[Trainer], cfg: Any) -> dict[str, float]:
    """Build -> train -> close; returns the last logged metrics (the entry points' ``main``)."""
    trainer = trainer_cls(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
