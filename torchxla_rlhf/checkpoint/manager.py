"""The checkpoint manager: the one object a trainer saves and resumes through.

The trainer calls :meth:`CheckpointManager.save` after every optimizer step and
:meth:`CheckpointManager.load` once before the first; the manager owns everything else: which
directories a step writes (the schedule, in steps and in minutes), staging, publishing,
barriers between hosts, purging superseded state, and where a resume starts from.

What ``<output_dir>`` holds::

    checkpoint-latest/       HF export every ``save_model_freq`` steps (+ training_state/
                             with ``save_training_state``), replaced each time
    checkpoint-<step>/       HF export every ``save_milestone_freq`` steps, kept
    final/                   HF export at the last step
    training-state-latest/   training state only (each host its own shards, no gather):
                             every ``save_every_minutes`` minutes and on a preemption

``resume_from=auto`` loads the complete checkpoint with a training state whose step is the
highest, of any kind (including the previous one an interrupted publish left aside as
``.old-*``). An ``output_dir`` that holds checkpoints none of which can be resumed from is an
error naming each and why, never a silent fresh start.

The minutes schedule must give the same answer on every host (a save has barriers): it is
turned into a number of steps once, from process 0's measured step time, which process 0
writes to ``<output_dir>/checkpoint-schedule.json`` and every host reads after a barrier.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torchxla_rlhf import runtime
from torchxla_rlhf.checkpoint import hf_export, state
from torchxla_rlhf.checkpoint.fsio import (
    COMPLETE_MARKER,
    OLD_INFIX,
    TMP_INFIX,
    display,
    join,
    publish,
    read_json,
    resolve_checkpoint,
    rm_quiet,
    url_to_fs,
    write_bytes,
    write_json,
)
from torchxla_rlhf.errors import ResumeError, one_line
from torchxla_rlhf.run_dir import WRITTEN_BY_FILE

logger = logging.getLogger(__name__)

STATE_LATEST_NAME = "training-state-latest"
SCHEDULE_FILE = "checkpoint-schedule.json"
CALIBRATION_STEPS = 2
"""Steps timed (after the first, which compiles) to turn ``save_every_minutes`` into steps."""



@dataclass(frozen=True)
class CheckpointSchedule:
    """Which checkpoint directories to write after optimizer step ``step`` (1-based: the
    number of updates done so far).

    * every ``save_model_freq`` steps: ``latest_name``, overwritten each time;
    * every ``save_milestone_freq`` steps: ``milestone_pattern.format(step=step)``, kept;
    * at the last step: ``final_name`` (which supersedes ``latest`` there).

    A frequency of 0 disables that kind. Directory names are relative to the run's output
    directory; change them here.
    """

    save_model_freq: int
    save_milestone_freq: int
    latest_name: str = "checkpoint-latest"
    milestone_pattern: str = "checkpoint-{step}"
    final_name: str = "final"

    def __post_init__(self) -> None:
        for field in ("save_model_freq", "save_milestone_freq"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field}={value!r}: expected an integer >= 0 (0 disables)")

    def actions(self, step: int, is_last: bool) -> list[str]:
        """Directory names to write at ``step``, milestone first.

        >>> CheckpointSchedule(2, 4).actions(4, is_last=False)
        ['checkpoint-4', 'checkpoint-latest']
        >>> CheckpointSchedule(2, 4).actions(5, is_last=True)
        ['final']
        """
        if step < 1:
            return []
        names: list[str] = []
        if self.save_milestone_freq and step % self.save_milestone_freq == 0:
            names.append(self.milestone_pattern.format(step=step))
        if is_last:
            names.append(self.final_name)
        elif self.save_model_freq and step % self.save_model_freq == 0:
            names.append(self.latest_name)
        return names


@contextlib.contextmanager
def staged(output_path: str, *, is_main_process: bool) -> Iterator[str]:
    """A staging directory shared by every process for the checkpoint at ``output_path``:
    the processes write their training-state shards into it, then the HF export (or, for a
    state-only checkpoint, process 0) writes ``_COMPLETE`` there and publishes it, so the
    checkpoint appears whole or not at all.

    Its name is fixed (``<output_path>.tmp-staged``) because the hosts cannot agree on a
    random one; process 0 empties it first and a :func:`runtime.barrier` makes the others
    wait for that. Yields the URL to write into.
    """
    fs, out = url_to_fs(output_path)
    staging = f"{out}{TMP_INFIX}staged"
    if is_main_process:
        rm_quiet(fs, staging)
        fs.makedirs(staging, exist_ok=True)
    runtime.barrier()
    hf_export.STAGED[out] = staging
    try:
        yield display(fs, staging)
    finally:
        hf_export.STAGED.pop(out, None)
        if is_main_process and fs.exists(staging):  # the save failed before publishing
            rm_quiet(fs, staging)




@dataclass(frozen=True)
class Candidate:
    """A directory of ``output_dir`` that looks like a checkpoint, and whether it resumes."""

    path: str
    step: int | None
    """The saved step when it holds a training state (None otherwise)."""
    problem: str = ""
    """Why it cannot be resumed from ("" when it can)."""


class CheckpointManager:
    """Saves and resumes one run's checkpoints in ``output_dir``.

    Args:
        output_dir: the run's directory (local or fsspec URL; shared by every host).
        schedule: the step schedule of the HF exports.
        save_every_minutes: training-state saves at most this many minutes apart (0: off).
        save_training_state: HF exports carry the training state too.
        is_main: this process writes the shared files.
        export: ``export(path)`` writes the trained model(s) as HF checkpoint(s) at ``path``
            (every process calls it: the gathers are collectives).
        trained: ``{name: (model, optimizer)}`` whose state is saved and loaded.
        trainer_state: the JSON-able state beside it (step, data position, ...).
        before_write: called before each checkpoint directory is written (every process, in
            the same order); the trainer's check that no step before it was non-finite.
        written_by: what wrote the state (:func:`torchxla_rlhf.run_dir.written_by`), saved as
            ``training_state/written_by.json`` beside it for a resume to compare.
    """

    def __init__(self, output_dir: str, *, schedule: CheckpointSchedule, save_every_minutes: float,
                 save_training_state: bool, is_main: bool, export: Callable[[str], None],
                 trained: Callable[[], dict[str, tuple[Any, Any]]],
                 trainer_state: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.monotonic,
                 before_write: Callable[[], None] | None = None,
                 written_by: dict[str, Any] | None = None):
        if save_every_minutes < 0:
            raise ValueError(f"save_every_minutes={save_every_minutes}: expected >= 0 (0 disables)")
        self.output_dir = output_dir.rstrip("/")
        self.schedule = schedule
        self.save_every_minutes = float(save_every_minutes)
        self.save_training_state = save_training_state
        self.is_main = is_main
        self.export, self.trained, self.trainer_state = export, trained, trainer_state
        self.clock = clock
        self.before_write = before_write
        self.written_by = written_by
        self.start_step = 0
        self.state_every_steps: int | None = None
        """The minutes schedule in steps, once calibrated (the same on every host)."""
        self._marks: dict[int, float] = {}
        self._state_saved_at: int | None = None
        self.last_state_path: str | None = None
        """The checkpoint the last training state went to (what a resume starts from)."""

    # -- paths -----------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return f"{self.output_dir}/{name}"

    @property
    def state_latest(self) -> str:
        return self.path(STATE_LATEST_NAME)

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, *, last: bool = False, preempted: bool = False) -> list[str]:
        """After optimizer step ``step`` (every process, every step): write what the schedule
        asks for; with ``preempted``, at least the training state (only that, unless the
        schedule wrote it anyway). Returns the paths written."""
        written: list[str] = []
        with_state = False
        for name in self.schedule.actions(step, last):
            path = self.path(name)
            self._save_dir(path, step, hf=True, with_state=self.save_training_state)
            if self.save_training_state:
                with_state, self.last_state_path = True, path
            written.append(path)
        if not with_state and (preempted or self._state_due(step)):
            self._save_dir(self.state_latest, step, hf=False, with_state=True)
            written.append(self.state_latest)
            with_state, self.last_state_path = True, self.state_latest
        if with_state:
            self._state_saved_at = step
            self._purge(step, written)
        return written

    def _save_dir(self, path: str, step: int, *, hf: bool, with_state: bool) -> None:
        if self.before_write is not None:
            self.before_write()  # may refuse (raise): nothing of this save is written then
        start = time.perf_counter()
        if with_state:
            with staged(path, is_main_process=self.is_main) as staging:
                state.save_training_state(
                    staging, self.trained(), self.trainer_state(), is_main_process=self.is_main,
                    process_index=runtime.process_index(), process_count=runtime.process_count())
                if self.is_main and self.written_by is not None:
                    write_json(join(staging, state.STATE_DIR, WRITTEN_BY_FILE), self.written_by)
                runtime.barrier()  # every host's shards are in before anything is published
                if hf:
                    self.export(path)  # publishes the staging directory
                elif self.is_main:
                    fs, out = url_to_fs(path)
                    _, stage = url_to_fs(staging)
                    write_bytes(fs, join(stage, COMPLETE_MARKER), f"{time.time():.3f}\n".encode())
                    publish(fs, stage, out)
        else:
            self.export(path)
        runtime.barrier()  # no host goes on (or exits) while the checkpoint is published
        logger.info("step %d: saved %s (%s) in %.1f s", step, path,
                    "HF" + (" + training state" if with_state else "") if hf else "training state",
                    time.perf_counter() - start)

    def _state_due(self, step: int) -> bool:
        """The minutes schedule, in steps every host agrees on (calibrated once)."""
        if not self.save_every_minutes:
            return False
        first = self.start_step + 1  # compiles: not timed
        calibrate_at = first + CALIBRATION_STEPS
        if step in (first, calibrate_at):
            self._marks[step] = self.clock()
        if step == calibrate_at:
            self._calibrate(step, (self._marks[step] - self._marks[first]) / CALIBRATION_STEPS)
        if self.state_every_steps is None or step <= calibrate_at:
            return False
        since = step - (self._state_saved_at if self._state_saved_at is not None else calibrate_at)
        return since >= self.state_every_steps

    def _calibrate(self, step: int, step_s: float) -> None:
        every = max(1, int(self.save_every_minutes * 60 // max(step_s, 1e-9)))
        if runtime.process_count() > 1:
            # Each host timed its own steps: process 0's answer is everyone's.
            shared = self.path(SCHEDULE_FILE)
            if self.is_main:
                write_json(shared, {"state_every_steps": every, "step_s": step_s, "at_step": step})
            runtime.barrier()
            every = int(read_json(shared)["state_every_steps"])
        self.state_every_steps = every
        logger.info("save_every_minutes=%g: a training-state save every %d step(s) (%.2f s per "
                    "step measured)", self.save_every_minutes, every, step_s)

    def _purge(self, step: int, written: list[str]) -> None:
        """Drop the state-only checkpoint once a newer one with a training state exists
        (process 0; the HF exports are the user's and stay)."""
        if not self.is_main or self.state_latest in written:
            return
        fs, p = url_to_fs(self.state_latest)
        for path in [p, *self._leftovers(fs, p)]:
            saved = _saved_step(fs, path)
            if saved is not None and saved < step:
                rm_quiet(fs, path)

    @staticmethod
    def _leftovers(fs, p: str) -> list[str]:
        parent, _, base = p.rpartition("/")
        if not fs.exists(parent):
            return []
        names = [x.rstrip("/").rpartition("/")[2] for x in fs.ls(parent, detail=False)]
        return [join(parent, n) for n in names if n.startswith(base + OLD_INFIX)]

    # -- loading ---------------------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        """Every directory of ``output_dir`` this manager writes (and their ``.old-*``
        leftovers), with its step when it can be resumed from, else why not."""
        fs, root = url_to_fs(self.output_dir)
        if not fs.exists(root):
            return []
        milestone = re.compile(re.escape(self.schedule.milestone_pattern).replace(r"\{step\}", r"\d+"))
        kinds = {self.schedule.latest_name, self.schedule.final_name, STATE_LATEST_NAME}
        out = []
        for entry in sorted(fs.ls(root, detail=False)):
            name = entry.rstrip("/").rpartition("/")[2]
            if TMP_INFIX in name:
                continue  # an unfinished write: garbage by the recovery rule
            base = name.split(OLD_INFIX, 1)[0]
            if base not in kinds and not milestone.fullmatch(base):
                continue
            path = join(root, name)
            if not fs.isdir(path):
                continue
            shown = display(fs, path)
            if not fs.exists(join(path, COMPLETE_MARKER)):
                out.append(Candidate(shown, None, "incomplete (no _COMPLETE: its write was interrupted)"))
                continue
            step = _saved_step(fs, path)
            out.append(Candidate(shown, step, "" if step is not None else
                                 "weights only (no training state: saved with save_training_state=false)"))
        return out

    def resolve(self, source: str) -> str | None:
        """The checkpoint ``source`` (``"auto"`` or a path) resumes from; None for a fresh
        start (``auto`` with nothing in ``output_dir``). :class:`ResumeError` (one line)
        when nothing usable is there."""
        if source != "auto":
            path = resolve_checkpoint(source)
            if path is None:
                raise ResumeError(f"resume_from={source}: not a complete checkpoint (no "
                                  f"{COMPLETE_MARKER}, and no complete .old-* beside it)")
            if not state.has_training_state(path):
                raise ResumeError(f"resume_from={source}: {path} holds weights but no training "
                                  "state (saved with save_training_state=false?), so the run "
                                  "cannot continue exactly")
            return path
        found = self.candidates()
        usable = [c for c in found if c.step is not None]
        if usable:
            # The highest step; on a tie the published directory before an .old-* leftover.
            best = max(usable, key=lambda c: (c.step, OLD_INFIX not in c.path))
            return best.path
        if found:
            why = "; ".join(f"{c.path.rpartition('/')[2]}: {c.problem}" for c in found)
            raise ResumeError(
                f"resume_from=auto: {self.output_dir} holds checkpoints but none can be resumed "
                f"from ({why}); set save_training_state=true or save_every_minutes for new "
                "runs, or move them away to start fresh")
        logger.warning("resume_from=auto: no checkpoint in %s: starting fresh", self.output_dir)
        return None

    def load(self, source: str | None) -> dict[str, Any] | None:
        """Load ``source``'s training state into :attr:`trained` (in place, each host its own
        shards) and return the trainer state; None when there is nothing to resume."""
        if not source:
            return None
        path = self.resolve(source)
        if path is None:
            return None
        try:
            saved = state.load_training_state(path, self.trained())
        except ValueError as e:  # saved for other models (a checkpoint without written_by.json)
            raise ResumeError(f"resume_from={source}: {one_line(e)}; resume from a checkpoint "
                              "of this trainer and these models") from e
        self.start_step = self._state_saved_at = int(saved["step"])
        logger.info("resumed from %s at step %d", path, self.start_step)
        return saved


def resume_source(cfg: Any) -> str | None:
    """The checkpoint ``cfg.resume_from`` names (``auto``: the newest resumable one in
    ``output_dir``), as the run's manager resolves it; None when there is none to resume. Reads
    the directory only (``--check`` and the run's set-up)."""
    if not cfg.resume_from:
        return None
    manager = CheckpointManager(
        cfg.output_dir, schedule=CheckpointSchedule(cfg.save_model_freq, cfg.save_milestone_freq),
        save_every_minutes=0, save_training_state=False, is_main=False, export=_unused,
        trained=dict, trainer_state=dict)
    return manager.resolve(cfg.resume_from)


def _unused(path: str) -> None:
    raise AssertionError("a manager that only resolves checkpoints exports nothing")


def _saved_step(fs, path: str) -> int | None:
    """The step of the training state in checkpoint ``path`` (None: none, or unreadable)."""
    file = join(path, state.STATE_DIR, state.TRAINER_STATE)
    if not (fs.exists(join(path, COMPLETE_MARKER)) and fs.exists(file)):
        return None
    try:
        return int(read_json(display(fs, file))["step"])
    except (ValueError, KeyError, TypeError):
        return None
