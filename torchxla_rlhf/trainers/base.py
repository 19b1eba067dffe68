"""What every trainer shares, and the one place the order of a run is written.

:func:`run` (and the trainers' constructor, which it calls) does, in this order:

0. take ``output_dir``'s lock (process 0; :func:`take_output_dir_lock`);
1. set up the run (:func:`setup_run`: runtime and mesh, output directory checks, tokenizer);
2. build the task: the subclass's :meth:`Trainer.build` (its data, models, optimizers and
   compiled graphs), which returns the number of steps;
3. resume from ``resume_from`` when asked, then record the run's config
   (:func:`run_dir.record_config`);
4. train: a baseline evaluation, then update -> log -> evaluate -> checkpoint until
   ``total_steps``, SIGTERM/Ctrl-C, or a non-finite loss or gradient norm (read back with
   each step's metrics; every save first checks the steps before it);
5. close the tracker and release the lock.

Checkpoints go through one :class:`~torchxla_rlhf.checkpoint.CheckpointManager`: the loop
calls its ``save(step, last=...)`` after every step and the constructor its ``load``.

A subclass supplies only what differs: :meth:`Trainer.build`, :meth:`Trainer.train_step`,
:meth:`Trainer.save` and :meth:`Trainer.trained_models` (plus :meth:`Trainer.evaluate` and the
data-state pair when it has them). It never defines ``__init__`` and has no call order to
remember.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError

from torchxla_rlhf import checkpoint, run_dir, runtime
from torchxla_rlhf.preflight import startup
from torchxla_rlhf.models import llama
from torchxla_rlhf.configs.loader import to_dict
from torchxla_rlhf.data.loader import BatchLoader
from torchxla_rlhf.data.report import DataReport
from torchxla_rlhf.errors import (EXIT_PREEMPTED, RESUME_HINT, NonFiniteError, Preempted,
                                  ResumeError, RunFailure, call_with_timeout, failure_during,
                                  one_line)
from torchxla_rlhf.data.tokenizers import load_tokenizer
from torchxla_rlhf.tracking import Tracker

logger = logging.getLogger("torchxla_rlhf")


@dataclass
class RunContext:
    """Objects every trainer needs, built once from the config by :func:`setup_run`."""

    cfg: Any
    mesh: runtime.MeshInfo
    tokenizer: Any
    output_dir: str
    is_main: bool
    dir_plan: str = "new"
    """What the run does to ``output_dir`` once started (:func:`run_dir.check_output_dir`)."""
    resume_path: str | None = None
    """The checkpoint ``resume_from`` resolved to (None: a fresh start)."""
    resume_changes: dict[str, list[Any]] | None = None
    """How the run differs from the checkpoint's, when that came from another directory."""


def setup_run(cfg: Any) -> RunContext:
    """Checks that need no device first (the start-up list's part that ``--check`` runs too:
    remote paths answer, ``output_dir`` is this run's to write, ``resume_from`` is a
    checkpoint of this trainer and these models, the logging settings), then runtime and mesh
    (SPMD must be on before any tensor reaches the device), the start-up checks on the
    model's shapes, then the tokenizer. Nothing is written."""
    output_dir = cfg.output_dir.rstrip("/")
    found = startup.before_device(cfg)
    runtime.init()
    runtime.manual_seed(cfg.seed)
    # The pre-flight (mesh, weight splits, batch rows, the memory plan) before any weights load.
    devices, processes, per_host = runtime.topology()
    report = startup.on_devices(cfg, startup.Topology(
        devices, "the runtime", processes, per_host, runtime.device_memory_bytes()), found)
    mesh = runtime.make_mesh(report.mesh)
    is_main = runtime.is_main_process()
    checkpoint.require_shared_output_dir(output_dir, runtime.process_count())
    tokenizer = load_tokenizer(
        cfg.tokenizer or cfg.model.name_or_path, cfg.tokenizer_pad_token_id, sentencepiece_legacy=cfg.tokenizer_legacy
    )
    return RunContext(cfg=cfg, mesh=mesh, tokenizer=tokenizer, output_dir=output_dir,
                      is_main=is_main, dir_plan=found["dir_plan"],
                      resume_path=found["resume_path"], resume_changes=found["resume_changes"])


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

    @property
    def name(self) -> str:
        """The trainer's kind, as its config declares it (``dpo``, ``reward``, ``ppo``)."""
        return self.cfg.trainer

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
        self.non_finite: tuple[int, str, float] | None = None
        """``(step, metric, value)`` of the first non-finite watched metric read back."""
        self.last_good_checkpoint: tuple[str, int] | None = None
        """``(path, step)`` of the newest checkpoint known to hold finite weights."""
        self.total_steps = self.build()
        # Remote models: every host trains against the version process 0 loaded.
        llama.check_hosts_loaded_the_same_models(self.ctx.output_dir)
        self.checkpoints = checkpoint.CheckpointManager(
            self.ctx.output_dir,
            schedule=checkpoint.CheckpointSchedule(cfg.save_model_freq, cfg.save_milestone_freq),
            save_every_minutes=cfg.save_every_minutes,
            save_training_state=cfg.save_training_state, is_main=self.ctx.is_main,
            export=self.save, trained=self.trained_models,
            trainer_state=lambda: {"step": self.step, "total_steps": self.total_steps,
                                   "data": self.data_state()},
            before_write=self._settle_metrics, written_by=run_dir.written_by(cfg))
        self._resume()
        # Written only now that config, data and models have been checked: a run that fails
        # at start-up leaves an existing run's config.yaml (and, with overwrite, its files)
        # untouched. A resumed run records what it changed instead of rewriting config.yaml.
        if self.ctx.is_main:
            run_dir.record_config(self.ctx.output_dir, cfg, self.ctx.dir_plan, self.step,
                                  self.ctx.resume_changes)
        # Last, so that a failure above leaves no wandb run or progress bar open.
        self.tracker = Tracker(cfg.logger, self.ctx.output_dir, to_dict(cfg), self.ctx.is_main,
                               self.total_steps, resume_step=self.step if cfg.resume_from else None,
                               name=label or self.name)
        self.log_data_reports()

    # -- what a subclass supplies ----------------------------------------------------------

    @classmethod
    def check_data(cls, cfg: Any, tokenizer: Any) -> None:
        """Build the run's datasets once (tokenized, counted, checked) without touching a
        device, so that bad data fails before an earlier pipeline stage trains."""
        raise NotImplementedError

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
        """Load ``resume_from``'s training state into what :meth:`build` made (the manager
        resolves ``auto``: the newest complete checkpoint with a state, of any kind). The set-up
        checked that this trainer and these models wrote it (:func:`run_dir.check_resume_source`)."""
        if self.ctx.resume_path is None:
            return
        state = self.checkpoints.load(self.ctx.resume_path)
        if state.get("total_steps") != self.total_steps:
            logger.warning("resuming a run planned for %s steps as one of %s steps",
                           state.get("total_steps"), self.total_steps)
        self.step = int(state["step"])
        try:
            self.load_data_state(state.get("data", {}))
        except ValueError as e:  # the data pipeline differs from the checkpoint's
            raise ResumeError(f"resume_from={self.cfg.resume_from}: {e}; resume with the data "
                              "settings the run was started with") from e
        self.last_good_checkpoint = (self.ctx.resume_path, self.step)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """A baseline evaluation (which also compiles the eval graph before training), then
        run to ``total_steps`` (or until every host agrees to stop for a preemption); returns
        the last logged metrics."""
        runtime.start_preemption_sync()  # every host stops at the same step (its own handler)
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
                self.tracker.log_device_metrics(self.step, metrics, watch=is_watched_metric,
                                                on_watched=self._check_finite)
                if runtime.process_count() == 1:
                    # A value read back since the last step boundary. With several hosts the
                    # reads land at different moments, so they stop together at the next save
                    # (or the end) instead: a host stopping alone would hang the others.
                    self._stop_if_non_finite()
                is_last = self.step == self.total_steps
                if eval_freq and (self.step % eval_freq == 0 or is_last):
                    self._log_eval()
                stop = runtime.should_stop(self.step)  # the same answer on every host
                if stop:
                    logger.warning("preemption: saving the training state at step %d and "
                                   "stopping", self.step)
                self._save_uncounted(is_last, stop)
                if stop:
                    self.preempted_at = self.step
                    break
            runtime.sync()
            runtime.wait()
            self._stop_if_non_finite()
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

    # -- non-finite values ------------------------------------------------------------------

    def _check_finite(self, step: int, values: dict[str, float]) -> None:
        """Called with each step's watched metrics once they are read back (no extra sync)."""
        if self.non_finite is None:
            for name, value in values.items():
                if not math.isfinite(value):
                    self.non_finite = (step, name, value)
                    return

    def _stop_if_non_finite(self) -> None:
        """Raise :class:`NonFiniteError` once a watched metric was non-finite."""
        if self.non_finite is None:
            return
        step, name, value = self.non_finite
        if self.last_good_checkpoint is None:
            good = "no checkpoint was saved before it"
        else:
            path, at = self.last_good_checkpoint
            good = f"the last good checkpoint is {path} (step {at})"
        raise NonFiniteError(
            f"{name} = {value} at step {step} (stopped at step {self.step}); nothing after step "
            f"{step - 1} was saved; {good}. Lower the learning rate or check the data")

    def _settle_metrics(self) -> None:
        """Before a checkpoint is written: every step's watched metrics read back and checked,
        so a save never publishes the state of a step whose loss or gradient was non-finite.
        The save reads the weights back anyway; this waits for the same step to finish."""
        runtime.sync()  # runs the step closures that queue the last step's read
        runtime.drain_scalar_reads()
        self._stop_if_non_finite()

    def _save_uncounted(self, is_last: bool, preempted: bool) -> None:
        # Gathering sharded weights to the host runs torch_xla's replicate graphs, which count
        # as compilations; they are not training-step graphs, so keep them out of the count.
        before = runtime.compile_count()
        with failure_during("saving a checkpoint in", self.ctx.output_dir, SafetensorError):
            written = self.checkpoints.save(self.step, last=is_last, preempted=preempted)
        if written:
            self.last_good_checkpoint = (written[0], self.step)
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


WATCHED_METRICS = ("loss", "gradient_norm", "param_norm", "*/loss/total", "*/gradient_norm")
"""Metrics whose non-finite value stops a run (read back every step with the step's metrics)."""


def is_watched_metric(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in WATCHED_METRICS)


def take_output_dir_lock(cfg: Any) -> run_dir.RunLock | None:
    """Process 0 takes ``output_dir``'s lock before anything is written (None elsewhere); a
    remote directory that does not answer fails within ``remote_timeout_s``."""
    runtime.init()
    if not runtime.is_main_process():
        return None
    output_dir = cfg.output_dir.rstrip("/")

    def take() -> run_dir.RunLock:
        return run_dir.acquire_lock(output_dir, takeover_stale=bool(cfg.resume_from))

    if "://" not in output_dir:
        return take()
    return call_with_timeout(take, cfg.remote_timeout_s, f"output_dir={output_dir}")


def run(trainer_cls: type[Trainer], cfg: Any, *, setup_logging: bool = False,
        label: str | None = None) -> dict[str, float]:
    """The whole run: take ``output_dir``'s lock, set up, build, resume (the constructor),
    train, close, release the lock; returns the last logged metrics (the entry points'
    ``main``). ``setup_logging``: configure console logging at ``cfg.log_level`` first
    (command lines; a library caller keeps its own logging). An ``OSError`` once training
    has started is a :class:`~torchxla_rlhf.errors.RunFailure` (exit 1), not a user error.
    ``label``: the progress bar's name (the pipeline's stage).

    Raises :class:`~torchxla_rlhf.errors.Preempted` after a preempted run has saved, so no
    caller (the pipeline, a shell script) mistakes it for a finished one."""
    if setup_logging:
        configure_logging(cfg.log_level)
    lock = take_output_dir_lock(cfg)
    # Until training starts (minutes of weight loading on a pod) nothing is worth saving: a
    # preemption notice then ends the process at once with the code the launcher relaunches
    # on, instead of the default SIGTERM death it reads as a failure. Training installs its
    # own handler (runtime.start_preemption_sync) while it runs.
    previous = _exit_preempted_on_sigterm(lock)
    try:
        trainer = trainer_cls(cfg, label)
        try:
            metrics = trainer.train()
        except OSError as e:  # a disk or bucket failing mid-run is not the user's mistake
            raise RunFailure(f"training failed at step {trainer.step + 1}: {one_line(e)}; "
                             f"{RESUME_HINT}") from e
        finally:
            trainer.close()
        leave_together(trainer.ctx.output_dir)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()
    if trainer.preempted_at is not None:
        # The checkpoint the stop saved: a save step's own export when it carried the state.
        raise Preempted(trainer.preempted_at,
                        trainer.checkpoints.last_state_path or trainer.checkpoints.state_latest)
    return metrics


EXIT_MARKERS = "exit-markers"
LEAVE_TIMEOUT_S = 600.0


def leave_together(output_dir: str, *, clock=time.monotonic, sleep=time.sleep) -> None:
    """On several hosts, make process 0 leave last. It runs the coordinator of the preemption
    sync; a host still running when it is gone aborts (a finished run then reads as failed).
    Every other process writes ``<output_dir>/exit-markers/process-<i>`` as it finishes;
    process 0 waits for all of them (at most :data:`LEAVE_TIMEOUT_S`: a crashed host never
    writes one), removes them and returns; at exit it still lingers a few seconds while the
    others' runtimes shut down (:func:`runtime.stop_preemption_sync`)."""
    count = runtime.process_count()
    if count == 1:
        return
    fs, root = checkpoint.fsio.url_to_fs(f"{output_dir.rstrip('/')}/{EXIT_MARKERS}")
    if not runtime.is_main_process():
        fs.makedirs(root, exist_ok=True)
        checkpoint.fsio.write_bytes(fs, f"{root}/process-{runtime.process_index()}", b"done\n")
        return
    deadline = clock() + LEAVE_TIMEOUT_S
    waiting = set(range(1, count))
    while waiting and clock() < deadline:
        waiting = {i for i in waiting if not fs.exists(f"{root}/process-{i}")}
        if waiting:
            sleep(1.0)
    if waiting:
        logger.warning("process(es) %s did not finish within %.0f s; leaving anyway",
                       sorted(waiting), LEAVE_TIMEOUT_S)
    checkpoint.fsio.rm_quiet(fs, root)


def _exit_preempted_on_sigterm(lock: run_dir.RunLock | None = None) -> Any:
    """Make SIGTERM end the process with :data:`EXIT_PREEMPTED` at once (releasing ``lock``,
    so that the relaunch finds the directory free); returns the previous handler (None when
    not on the main thread, where handlers cannot be set)."""
    def handler(signum, frame):
        logging.getLogger("torchxla_rlhf").warning(
            "SIGTERM before the first training step: nothing to save, exiting %d", EXIT_PREEMPTED)
        if lock is not None:
            lock.release()
        os._exit(EXIT_PREEMPTED)  # mid weight-load: no other cleanup worth running

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def rollout_sampling(cfg: Any, mesh: runtime.MeshInfo) -> Any:
    """The rollout's ``sampling`` with ``gather_weights: auto`` resolved by the memory planner
    (``memory_plan.resolve_sampling``: the generation layout where it fits this device's
    memory, else ``per_layer``); logged once."""
    from torchxla_rlhf.preflight import memory_plan
    sampling = memory_plan.resolve_sampling(
        cfg, runtime.device_count(), runtime.device_memory_bytes(), mesh=mesh.axes)
    if cfg.sampling.gather_weights == "auto":
        logger.info("sampling.gather_weights=auto: %s%s", sampling.gather_weights,
                    f" (generation_tp={sampling.generation_tp})"
                    if sampling.gather_weights == "generation_layout" else "")
    return sampling
