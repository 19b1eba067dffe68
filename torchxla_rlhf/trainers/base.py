"""What every trainer shares, and the one place the order of a run is written.

:func:`run` (and the trainers' constructor, which it calls) does, in this order:

1. set up the run (:func:`setup_run`: runtime and mesh, output directory with the resolved
   config, tokenizer);
2. build the task: the subclass's :meth:`Trainer.build` (its data, models, optimizers and
   compiled graphs), which returns the number of steps;
3. resume from ``resume_from`` when asked;
4. train: a baseline evaluation, then update -> log -> evaluate -> checkpoint until
   ``total_steps`` or SIGTERM;
5. close the tracker.

A subclass supplies only what differs: :meth:`Trainer.build`, :meth:`Trainer.train_step`,
:meth:`Trainer.save` and :meth:`Trainer.trained_models` (plus :meth:`Trainer.evaluate` and the
data-state pair when it has them). It never defines ``__init__`` and has no call order to
remember.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from torchxla_rlhf import checkpoint, memory_plan, runtime, startup, train_state
from torchxla_rlhf.config import save_config, to_dict
from torchxla_rlhf.data.loader import BatchLoader
from torchxla_rlhf.data.report import DataReport
from torchxla_rlhf.errors import Preempted, ResumeError
from torchxla_rlhf.remote import check_remote_paths
from torchxla_rlhf.run_dir import CONFIG_FILE, check_output_dir
from torchxla_rlhf.tokenizers import load_tokenizer
from torchxla_rlhf.tracking import Tracker, wandb_settings

logger = logging.getLogger("torchxla_rlhf")


@dataclass
class RunContext:
    """Objects every trainer needs, built once from the config by :func:`setup_run`."""

    cfg: Any
    mesh: runtime.MeshInfo
    tokenizer: Any
    output_dir: str
    is_main: bool


def setup_run(cfg: Any) -> RunContext:
    """Checks that need no device first (remote paths answer, ``output_dir`` is this run's
    to write), then runtime and mesh (SPMD must be on before any tensor reaches the device),
    the start-up checks on the model's shapes, then the tokenizer. Nothing is written."""
    output_dir = cfg.output_dir.rstrip("/")
    # Before anything is written or loaded: remote paths answer, output_dir is ours.
    check_remote_paths(cfg, cfg.remote_timeout_s)
    check_output_dir(output_dir, type(cfg).__name__, to_dict(cfg),
                     resume=bool(cfg.resume_from), overwrite=cfg.overwrite_output_dir)
    wandb_settings(cfg.logger)  # a bad $WANDB_MODE fails now, not after the models load
    runtime.init()
    runtime.manual_seed(cfg.seed)
    # Start-up checks (mesh, weight splits, batch rows, state memory) before any weights load.
    startup.check_before_loading(cfg)
    mesh = runtime.make_mesh(cfg.mesh_dim)
    # Stop before loading any weights when the run cannot fit (logs the plan).
    memory_plan.check_fits(cfg, runtime.device_count(), runtime.device_memory_bytes())
    is_main = runtime.is_main_process()
    checkpoint.require_shared_output_dir(output_dir, runtime.process_count())
    tokenizer = load_tokenizer(
        cfg.tokenizer or cfg.model.name_or_path, cfg.tokenizer_pad_token_id, sentencepiece_legacy=cfg.tokenizer_legacy
    )
    return RunContext(cfg=cfg, mesh=mesh, tokenizer=tokenizer, output_dir=output_dir, is_main=is_main)


def make_loader(dataset, data_cfg, mesh: runtime.MeshInfo, *, train: bool = True) -> BatchLoader:
    """This host's loader over ``dataset``: seeded shuffled epochs for training, or one
    ordered pass for evaluation (the loader refuses a dataset smaller than one batch)."""
    share, count = runtime.data_share(mesh)
    if not train:
        return BatchLoader(dataset, data_cfg.batch_size, shuffle=False, seed=0,
                           process_index=share, process_count=count, num_epochs=1)
    return BatchLoader(dataset, data_cfg.batch_size, shuffle=data_cfg.shuffle,
                       seed=data_cfg.seed, process_index=share, process_count=count)


class Trainer:
    """The run's lifecycle and outer loop; subclasses supply the task.

    Steps are optimizer updates (TRL's ``global_step``), numbered from 1. ``log_freq``,
    ``eval_freq``, ``save_model_freq`` and ``save_milestone_freq`` count them.
    """

    name = "trainer"

    def __init__(self, cfg: Any, label: str | None = None):
        """Set up the run, build the task (:meth:`build`), resume if asked. Subclasses do not
        override this: everything they own is built in :meth:`build`. ``label`` names the
        progress bar (default: the trainer's name)."""
        self.cfg = cfg
        self.ctx = setup_run(cfg)
        self.step = 0
        self.compiles_first_step: int | None = None
        """XLA compilations during the first training step: the loop's graphs."""
        self.compiles_after_first_step: int | None = None
        """XLA compilations during training steps 2.. (should stay 0; checkpoints excluded)."""
        self._compiles_at_first_step = 0
        self.preempted_at: int | None = None
        """The step at which every host agreed to stop for a preemption (after saving)."""
        self.data_reports: dict[str, Any] = {}
        """``{name: DataReport}`` of the datasets :meth:`build` read (logged at step 0)."""
        self.total_steps = self.build()
        self.ckpt_schedule = checkpoint.CheckpointSchedule(cfg.save_model_freq,
                                                           cfg.save_milestone_freq)
        self._resume()
        # Written only now that config, data and models have been checked: a run that fails
        # at start-up leaves an existing run's config.yaml untouched.
        if self.ctx.is_main:
            save_config(cfg, f"{self.ctx.output_dir}/{CONFIG_FILE}")
        # Last, so that a failure above leaves no wandb run or progress bar open.
        self.tracker = Tracker(cfg.logger, self.ctx.output_dir, to_dict(cfg), self.ctx.is_main,
                               self.total_steps, name=label or self.name)
        self.log_data_reports()

    # -- what a subclass supplies ----------------------------------------------------------

    def build(self) -> int:
        """Build the data, models, optimizers and compiled graphs; return the number of
        optimizer steps to run. ``self.ctx`` (mesh, tokenizer, output_dir) is ready."""
        raise NotImplementedError

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

    # -- shared helpers --------------------------------------------------------------------

    def autocast(self):
        """The configured compute dtype over the parameters' (bf16 matmuls over fp32)."""
        model = self.cfg.model
        return runtime.autocast(model.compute_dtype, model.param_dtype)

    # -- resume ----------------------------------------------------------------------------

    def _resume(self) -> None:
        """Load ``resume_from``'s training state into what :meth:`build` made."""
        source = self.cfg.resume_from
        if not source:
            return
        if source == "auto":
            # The latest complete checkpoint (or the one a killed publish left aside);
            # weights without a training state are an error, not a fresh start.
            latest = f"{self.ctx.output_dir}/{self.ckpt_schedule.latest_name}"
            source = checkpoint.resolve_checkpoint(latest)
            if source is None:
                logger.info("resume_from=auto: no checkpoint at %s, starting fresh", latest)
                return
            if not train_state.has_training_state(source):
                raise ResumeError(
                    f"resume_from=auto: {source} holds weights but no training state (saved "
                    "with save_training_state=false?), so the run cannot continue exactly; "
                    "set save_training_state=true for new runs, or move the checkpoint away "
                    "to start fresh")
        state = train_state.load_training_state(source, self.trained_models())
        if state.get("total_steps") != self.total_steps:
            logger.warning("resuming a run planned for %s steps as one of %s steps",
                           state.get("total_steps"), self.total_steps)
        self.step = int(state["step"])
        self.load_data_state(state.get("data", {}))
        logger.info("resumed from %s at step %d", source, self.step)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """A baseline evaluation (which also compiles the eval graph before training), then
        run to ``total_steps`` (or until every host agrees to stop for a preemption); returns
        the last logged metrics."""
        runtime.start_preemption_sync()  # every host stops at the same step
        eval_freq = getattr(self.cfg, "eval_freq", 0)
        try:
            self._log_eval()
            # Run what set-up left pending (optimizer state, buffers) as its own graph, so
            # that the first step's graphs are the same as every later step's.
            runtime.sync()
            compiles_at_start = runtime.compile_count()
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
                self.tracker.log_device_metrics(self.step, metrics)
                is_last = self.step == self.total_steps
                if eval_freq and (self.step % eval_freq == 0 or is_last):
                    self._log_eval()
                for name in self.ckpt_schedule.actions(self.step, is_last):
                    self._save_uncounted(f"{self.ctx.output_dir}/{name}")
                if runtime.should_stop(self.step):  # the same answer on every host
                    logger.warning("preemption: saving at step %d and stopping", self.step)
                    self._save_uncounted(f"{self.ctx.output_dir}/{self.ckpt_schedule.latest_name}")
                    self.preempted_at = self.step
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
            runtime.stop_preemption_sync()
        return self.last_metrics

    @property
    def last_metrics(self) -> dict[str, float]:
        """The most recently logged values (training and eval), as host floats."""
        return self.tracker.latest

    def _save_uncounted(self, path: str) -> None:
        # Gathering sharded weights to the host runs torch_xla's replicate graphs, which count
        # as compilations; they are not training-step graphs, so keep them out of the count.
        before = runtime.compile_count()
        if self.cfg.save_training_state:
            # Each host writes its state shards into the staging dir, then the HF
            # save adds the weights and _COMPLETE and publishes both together.
            with checkpoint.staged(path, is_main_process=self.ctx.is_main) as staging:
                train_state.save_training_state(
                    staging, self.trained_models(),
                    {"step": self.step, "total_steps": self.total_steps, "data": self.data_state()},
                    is_main_process=self.ctx.is_main, process_index=runtime.process_index(),
                    process_count=runtime.process_count(),
                )
                runtime.barrier()
                self.save(path)
        else:
            self.save(path)
        runtime.barrier()  # no host goes on (or exits) while the save is written
        self._compiles_at_first_step += runtime.compile_count() - before

    def log_data_reports(self) -> None:
        """The data reports as a ``data_report`` table (wandb, ``data_report.jsonl``) at
        step 0; their text was logged when the datasets were built."""
        if self.data_reports:
            rows = [report.row() for report in self.data_reports.values()]
            self.tracker.log_table(0, "data_report", DataReport.COLUMNS, rows)

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.tracker.log_device_metrics(
                self.step, {f"eval/{k}": v for k, v in metrics.items()}, force=True)
            runtime.sync()

    def close(self) -> None:
        self.tracker.close()


def configure_logging(level: str) -> None:
    """Console logging for the command-line entry points: ``level`` on process 0, WARNING on
    the others. Starts the runtime first: importing torch_xla logs through the root logger,
    which configures it at WARNING; ``force=True`` replaces that configuration."""
    runtime.init()
    logging.basicConfig(
        level=level if runtime.is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run(trainer_cls: type[Trainer], cfg: Any, *, setup_logging: bool = False,
        label: str | None = None) -> dict[str, float]:
    """The whole run: set up, build, resume (the constructor), train, close; returns the last
    logged metrics (the entry points' ``main``). ``setup_logging``: configure console logging
    at ``cfg.log_level`` first (command lines; a library caller keeps its own logging).
    ``label``: the progress bar's name (the pipeline's stage).

    Raises :class:`~torchxla_rlhf.errors.Preempted` after a preempted run has saved, so no
    caller (the pipeline, a shell script) mistakes it for a finished one."""
    if setup_logging:
        configure_logging(cfg.log_level)
    trainer = trainer_cls(cfg, label)
    try:
        metrics = trainer.train()
    finally:
        trainer.close()
    if trainer.preempted_at is not None:
        raise Preempted(trainer.preempted_at,
                        f"{trainer.ctx.output_dir}/{trainer.ckpt_schedule.latest_name}")
    return metrics
