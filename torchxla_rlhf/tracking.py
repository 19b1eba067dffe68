"""Metric tracking: Weights & Biases, a tqdm progress bar, and ``metrics.jsonl`` files.

Only the main process writes anything (wandb run, bar, files); every process may call the
same methods, which keeps trainer code free of ``if is_main`` branches.

The trainers log device tensors with :meth:`Tracker.log_device_metrics`: it registers a step
closure (:func:`runtime.add_step_closure`) that runs on the host right after the step's graph
has executed, when the values are already materialized. Each value read there is one
device-to-host copy, but no graph runs for it and the loop never waits for the host.

``metrics.jsonl`` has one JSON object per logged step: ``{"step": 10, "loss": 0.69, ...}``,
all values floats (non-finite values are written as ``NaN`` / ``Infinity``, which Python's and
pandas' JSON readers accept). Tables go to ``<name>.jsonl``, one object per row with its
``step``.
"""

from __future__ import annotations

import json
import math
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import fsspec
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.configs.sections import LoggingConfig
from torchxla_rlhf.errors import UserError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _to_float(key: str, value: Any) -> float:
    """A metric value as a Python float. A tensor is read with ``.item()`` (a host sync
    unless it is already materialized, as inside a step closure); a list or tuple (one value
    per update or micro-batch) gives its mean."""
    if isinstance(value, (list, tuple)):
        return sum(_to_float(key, v) for v in value) / max(len(value), 1)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {key!r}: expected a scalar, got a tensor of shape {list(value.shape)}"
            )
        return float(value.item())
    if isinstance(value, (bool, int, float)):
        return float(value)
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError):
        raise TypeError(
            f"metric {key!r}: expected a float or a scalar tensor, got {type(value).__name__}"
        ) from None


def _json_value(value: Any) -> Any:
    """A table cell as JSON: tensors become floats / lists, other non-JSON values strings."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return str(value)


class _JsonlFile:
    """An append-only JSON-lines file, local or fsspec.

    Local and ``memory://`` files are appended to and closed after each line (nothing is lost
    in a crash). Object stores cannot append: lines are kept in memory and the whole object is
    rewritten at most every ``rewrite_every_s`` seconds and on :meth:`close`.
    """

    def __init__(self, path: str, rewrite_every_s: float = 60.0, appendable: bool | None = None):
        self.path = path
        self.fs, self._p = fsspec.core.url_to_fs(path)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        if appendable is None:
            appendable = bool({"file", "local", "memory"} & set(protocols))
        self.appendable = appendable
        self.rewrite_every_s = rewrite_every_s
        self._lines: list[str] = []
        self._last_write = -math.inf  # the first line is written at once
        parent = self._p.rpartition("/")[0]
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        if not self.appendable and self.fs.exists(self._p):
            # Continue an existing file (e.g. a resumed run) instead of overwriting it.
            self._lines = self.fs.cat_file(self._p).decode().splitlines(keepends=True)

    def keep_until(self, step: int) -> int:
        """Drop the rows a resumed run logs again: every row after ``step``, and the
        evaluation-only rows at ``step`` (the resumed run's baseline evaluation). Returns the
        number of rows dropped."""
        if self.appendable:
            if not self.fs.exists(self._p):
                return 0
            lines = self.fs.cat_file(self._p).decode().splitlines(keepends=True)
        else:
            lines = self._lines

        def kept(line: str) -> bool:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return False  # a line cut short by a crash
            s = row.get("step")
            if not isinstance(s, int):
                return True
            metrics = [k for k in row if k != "step"]
            return s < step or (s == step and not all(k.startswith("eval/") for k in metrics))

        keep = [line for line in lines if kept(line)]
        if len(keep) != len(lines):
            with self.fs.open(self._p, "w") as f:
                f.write("".join(keep))
            self._lines = keep if not self.appendable else []
        return len(lines) - len(keep)

    def append(self, obj: Mapping[str, Any]) -> None:
        line = json.dumps(obj) + "\n"
        if self.appendable:
            with self.fs.open(self._p, "a") as f:
                f.write(line)
            return
        self._lines.append(line)
        if time.monotonic() - self._last_write >= self.rewrite_every_s:
            self.flush()

    def flush(self) -> None:
        if not self.appendable and self._lines:
            with self.fs.open(self._p, "w") as f:
                f.write("".join(self._lines))
            self._last_write = time.monotonic()


WANDB_MODES = {"online": "online", "offline": "offline", "disabled": "disabled",
               "dryrun": "offline", "run": "online"}
"""``$WANDB_MODE`` values and the mode each means (wandb's legacy spellings included)."""


class WandbEnvError(UserError, ValueError):
    """``$WANDB_MODE`` holds a value wandb does not know."""


@dataclass(frozen=True)
class WandbSettings:
    """The W&B run a config asks for, after the environment has filled its unset keys."""

    mode: str
    project: str
    entity: str | None
    group: str | None
    mode_from: str
    """Where ``mode`` came from: ``logger.wandb_mode``, ``$WANDB_MODE`` or ``default``."""
    ignored_env_mode: str | None = None
    """``$WANDB_MODE`` when the config's ``wandb_mode`` overrode a different value."""


def wandb_settings(cfg: LoggingConfig, environ: Mapping[str, str] | None = None) -> WandbSettings:
    """Config keys win; an unset key takes ``WANDB_MODE`` / ``WANDB_PROJECT`` /
    ``WANDB_ENTITY`` / ``WANDB_RUN_GROUP``; the mode falls back to ``disabled`` and the
    project to ``torchxla_rlhf``."""
    environ = os.environ if environ is None else environ
    env_mode = environ.get("WANDB_MODE", "").strip().lower() or None
    if env_mode is not None and env_mode not in WANDB_MODES:
        raise WandbEnvError(f"WANDB_MODE={environ['WANDB_MODE']!r}: expected online, offline or "
                            "disabled (or unset it and set logger.wandb_mode)")
    env_mode = WANDB_MODES.get(env_mode or "")
    if cfg.wandb_mode is not None:
        mode, source = cfg.wandb_mode, "logger.wandb_mode"
    elif env_mode is not None:
        mode, source = env_mode, "$WANDB_MODE"
    else:
        mode, source = "disabled", "default"
    return WandbSettings(
        mode=mode,
        project=cfg.project or environ.get("WANDB_PROJECT") or "torchxla_rlhf",
        entity=cfg.entity or environ.get("WANDB_ENTITY") or None,
        group=cfg.group or environ.get("WANDB_RUN_GROUP") or None,
        mode_from=source,
        ignored_env_mode=env_mode if cfg.wandb_mode is not None and env_mode not in (None, mode)
        else None,
    )


def destination_line(settings: WandbSettings, run: Any, metrics_path: str) -> str:
    """The one line a run logs at its start: where its metrics go (``run``: the wandb run,
    or None before there is one)."""
    where = {"$WANDB_MODE": " (from $WANDB_MODE)", "logger.wandb_mode": " (logger.wandb_mode)",
             "default": ""}[settings.mode_from]
    if settings.ignored_env_mode:
        where = f" (logger.wandb_mode; WANDB_MODE={settings.ignored_env_mode} ignored)"
    if settings.mode == "online":
        wandb = f"W&B online{where}: {getattr(run, 'url', None) or 'project ' + settings.project}"
    elif settings.mode == "offline":
        run_dir = getattr(getattr(run, "settings", None), "sync_dir", None) or os.path.dirname(
            getattr(run, "dir", "") or "")
        wandb = (f"W&B offline{where}: {run_dir} (upload with: wandb sync {run_dir})" if run_dir
                 else f"W&B offline{where}: a run directory to upload with wandb sync")
    else:
        wandb = (f"W&B disabled{where}" if where else
                 "W&B disabled (WANDB_MODE=offline|online or logger.wandb_mode turns it on)")
    return f"metrics: {metrics_path}; {wandb}"


class Tracker:
    """Logs scalars and tables to wandb, ``<output_dir>/metrics.jsonl`` and a tqdm bar.

    Args:
        cfg: a :class:`LoggingConfig` (or an object with the same fields).
        output_dir: run directory, local or fsspec URL; the files go there, and the wandb
            run directory too when it is local and ``$WANDB_DIR`` is unset (else
            ``$WANDB_DIR`` / wandb's default).
        config_dict: the resolved training config, stored with the wandb run.
        is_main_process: only the main process creates the run, the bar and the files.
        total_steps: number of optimizer steps (the bar's length; the last step is always
            a logging step, see :meth:`should_log`).
        resume_step: the step a resumed run continues from: ``metrics.jsonl``'s rows that the
            run logs again are dropped, so that each step appears once.
        name: the progress bar's label (the trainer, or the pipeline stage).
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        output_dir: str,
        config_dict: Mapping[str, Any] | None,
        is_main_process: bool,
        total_steps: int,
        resume_step: int | None = None,
        name: str = "train",
    ):
        self.cfg = cfg
        self.name = name
        self.output_dir = output_dir.rstrip("/")
        self.is_main_process = is_main_process
        self.total_steps = total_steps
        self.log_freq = int(cfg.log_freq)
        if self.log_freq < 1:
            raise ValueError(f"logging.log_freq={cfg.log_freq!r}: expected an integer >= 1")
        self._run: Any = None
        self._bar: Any = None
        self._bar_started = False
        self._files: dict[str, _JsonlFile] = {}
        self._closed = False
        self.latest: dict[str, float] = {}
        """The most recently logged value of each metric (on every process)."""
        if not is_main_process:
            return

        import wandb

        settings = wandb_settings(cfg)
        fs, local_dir = fsspec.core.url_to_fs(self.output_dir)
        wandb_dir: str | None = os.environ.get("WANDB_DIR") or None
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if ("file" in protocols or "local" in protocols) and wandb_dir is None:
            os.makedirs(local_dir, exist_ok=True)
            wandb_dir = local_dir
        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            name=cfg.run_name,
            config=dict(config_dict or {}),
            mode=settings.mode,
            dir=wandb_dir,
        )
        self._files[METRICS_FILE] = _JsonlFile(f"{self.output_dir}/{METRICS_FILE}")
        if resume_step is not None:
            self._files[METRICS_FILE].keep_until(resume_step)
        logger.info("%s", destination_line(settings, self._run, f"{self.output_dir}/{METRICS_FILE}"))
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=f"{name} compiling", unit="step",
                             dynamic_ncols=True)

    # -- scalars ------------------------------------------------------------------------

    def should_log(self, step: int) -> bool:
        """Whether ``step`` is a logging step: every ``log_freq`` steps, and the last one."""
        return step % self.log_freq == 0 or step == self.total_steps

    def log(self, step: int, metrics: Mapping[str, float | torch.Tensor]) -> None:
        """Log scalar ``metrics`` at optimizer step ``step`` (always; see :meth:`should_log`).

        Tensors are read with ``.item()``: a host sync for an XLA tensor that has not been
        computed yet. Call this from a step closure (:meth:`log_device_metrics` does that),
        or with host values. Every process converts the values (reading a sharded tensor is
        a collective); only the main process writes.
        """
        if "step" in metrics:
            raise ValueError("metrics: the key 'step' is reserved (it is the step argument)")
        values = {key: _to_float(key, value) for key, value in metrics.items()}
        self.latest.update(values)
        if not self.is_main_process or self._closed:
            return
        self._files[METRICS_FILE].append({"step": int(step), **values})
        self._run.log(values, step=int(step))
        if self._bar is not None:
            self._advance(step)
            shown = dict(list(values.items())[:4])
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def log_device_metrics(self, step: int, metrics: Mapping[str, Any], force: bool = False,
                           watch: Callable[[str], bool] | None = None,
                           on_watched: Callable[[int, dict[str, float]], None] | None = None,
                           ) -> None:
        """Log device tensors once the current graph has run, on logging steps only (or
        always with ``force``, as for evaluations).

        The values are read by :func:`runtime.read_scalars_after_step`: after the current
        graph is launched, every tensor of the step is copied in ONE batched transfer on a
        background thread (lists are averaged), and :meth:`log` runs on this thread at a later
        ``runtime.sync()``/``runtime.wait()``, so the loop never waits for them. Do not modify
        the tensors in place before the next cut. On other steps only the bar moves.

        ``watch``/``on_watched``: the metrics whose name ``watch`` accepts are read on EVERY
        step (in the same background transfer on logging steps; alone, one small transfer, on
        the others) and handed to ``on_watched(step, values)`` (the trainer's non-finite check).
        """
        logging_step = force or self.should_log(step)
        watched = {k: v for k, v in metrics.items() if watch is not None and watch(k)}
        if not logging_step:
            if self._bar is not None:
                self._advance(step)
            if not watched or on_watched is None:
                return

        def deliver(values: dict[str, float]) -> None:
            if logging_step:
                self.log(step, values)
            if on_watched is not None and watched:
                on_watched(step, {k: values[k] for k in watched})

        runtime.read_scalars_after_step(dict(metrics) if logging_step else watched, deliver)

    def _advance(self, step: int) -> None:
        bar = self._bar
        if step <= bar.n:  # step 0's evaluation, or a late metric read
            return
        if not self._bar_started:
            # The first step compiles the loop's graphs (minutes on a pod): restart the clock
            # here so that the rate, hence the ETA, counts only the steps after it.
            self._bar_started = True
            logger.info("%s: step %d dispatched %.1f s after start (compiling the step's "
                        "graphs); the progress bar's ETA counts from the next step",
                        self.name, step, bar.format_dict["elapsed"])
            bar.reset()
            bar.n = bar.last_print_n = bar.initial = step
            bar.set_description_str(self.name)
            return
        bar.update(step - bar.n)

    # -- tables -------------------------------------------------------------------------

    def log_table(
        self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Log a table (e.g. sampled prompts and responses) as a ``wandb.Table`` under
        ``name`` and append its rows to ``<output_dir>/<name>.jsonl`` as
        ``{"step": step, column: value, ...}``."""
        columns = list(columns)
        rows = [list(row) for row in rows]
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"log_table({name!r}): row {i} has {len(row)} value(s), expected "
                    f"{len(columns)} for columns {columns}"
                )
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"log_table: name {name!r} must be a plain file name stem")
        if not self.is_main_process or self._closed:
            return
        file_name = f"{name}.jsonl"
        if file_name not in self._files:
            self._files[file_name] = _JsonlFile(f"{self.output_dir}/{file_name}")
        for row in rows:
            self._files[file_name].append(
                {"step": int(step), **{c: _json_value(v) for c, v in zip(columns, row)}}
            )
        import wandb

        table = wandb.Table(columns=columns, data=[[_json_value(v) for v in row] for row in rows])
        self._run.log({name: table}, step=int(step))

    # -- end ----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush the files, close the bar and finish the wandb run (idempotent)."""
        if self._closed:
            return
        # Metric reads still in flight (read_scalars_after_step) are delivered first.
        runtime.drain_scalar_reads()
        self._closed = True
        for f in self._files.values():
            f.flush()
        if self._bar is not None:
            self._bar.close()
        if self._run is not None:
            self._run.finish()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

