"""Who owns an ``output_dir``: one writer at a time, and a run never overwrites another's results.

**One writer.** :func:`acquire_lock` creates ``run.lock`` (host, process id, boot id, start
time, run id) exclusively before the run writes anything, and :meth:`RunLock.release` removes
it at exit: a second run into the same directory gets one line naming the holder. The file is
created with an exclusive-create precondition (``open(..., "xb")``; on gs:// an
if-generation-match=0 upload), so two hosts cannot both win. A lock whose process is gone (same
host and boot, dead pid; or the host rebooted) is stale: a rerun with ``resume_from`` takes it
over with a warning (a relaunch after a crash), any other run is told how to clear it.

**Ownership.** A run's directory is marked by its ``config.yaml`` (first line
``# resolved <ConfigClass>``), written only after the config, the data and the models have been
checked, so a typo in a data path cannot overwrite a finished run's record. Before anything is
written, :func:`check_output_dir` refuses a non-empty ``output_dir`` that holds

- another trainer's run (a DPO run pointed at a reward model's directory), or
- a run of the same trainer whose config differs in anything but :data:`RESUME_SAFE_KEYS`,

unless ``resume_from`` is set (same trainer only) or ``overwrite_output_dir: true``.

**Resume** compares configs: a change to a key of :data:`DATA_KEYS` (what the data or the
models are) is refused naming the key and both values; any other change is logged and appended
to ``config_changes.jsonl`` with the step it applies from (``config.yaml`` keeps the values
the run started with). **Overwrite** moves the old run's files (checkpoints, training state,
metrics, config) into ``replaced-<time>/`` once the new run has passed its start-up checks,
so nothing of the old run can be resumed or appended to. A run of the same trainer that left
no checkpoint (it failed at start-up or in its first steps) is replaced the same way by a rerun.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import fsspec
import yaml

from torchxla_rlhf.errors import OutputDirError, ResumeError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"

RESUME_SAFE_KEYS = (
    "resume_from", "overwrite_output_dir", "total_steps", "num_epochs", "log_level",
    "remote_timeout_s", "save_model_freq", "save_milestone_freq", "eval_freq", "logger.*",
)
"""Keys a rerun in the same directory may change (how long, how often, how it logs)."""

LOCK_FILE = "run.lock"
CHANGES_FILE = "config_changes.jsonl"
REPLACED_PREFIX = "replaced-"

OWN_FILES = ("reference_logps_*.npz", "wandb", LOCK_FILE, f"{REPLACED_PREFIX}*")
"""What a run may leave before its config is written (caches keyed by their own fingerprint,
wandb's per-run folders, the lock, runs replaced by an overwrite): a directory holding only
these is free."""

DATA_KEYS = (
    "train_dataset.*", "model.name_or_path", "model.revision", "model.tiny.*",
    "reward_model.name_or_path", "reward_model.revision", "reward_model.tiny.*",
    "value_model.name_or_path", "value_model.revision", "value_model.tiny.*",
    "tokenizer", "tokenizer_pad_token_id", "tokenizer_legacy", "seed", "prompt_add_bos",
    "rollouts_per_prompt", "max_continuation_len", "load_reference_checkpoint",
)
"""Keys a resumed run may not change: they decide which examples, in which order and with
which tokens the run sees, or which models it starts from (the data position and weights in
the checkpoint would no longer mean what they say)."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": v}`` for nested dicts (an empty dict stays a leaf)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resume_safe(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_SAFE_KEYS)


def config_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: previous -> current`` for every key that is not resume-safe and differs."""
    a, b = _flatten(previous), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _resume_safe(key):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def read_run_config(output_dir: str) -> tuple[str | None, dict[str, Any]] | None:
    """``(config class name, config dict)`` of the run recorded in ``output_dir``, or None."""
    fs, path = fsspec.core.url_to_fs(f"{output_dir.rstrip('/')}/{CONFIG_FILE}")
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        text = f.read()
    first = text.split("\n", 1)[0]
    kind = first[len("# resolved "):].strip() if first.startswith("# resolved ") else None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise OutputDirError(f"{output_dir}/{CONFIG_FILE}: not a readable run config ({e})") from None
    return kind, tree if isinstance(tree, dict) else {}


def _names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _foreign(names: list[str]) -> list[str]:
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in OWN_FILES)]


def _has_checkpoint(names: list[str]) -> bool:
    """Whether a run left a checkpoint (complete or being published) among ``names``."""
    return any(n == "final" or n.startswith(("final.", "checkpoint-", "training-state-"))
               for n in names)


def recorded_config(output_dir: str) -> tuple[str | None, dict[str, Any]] | None:
    """The run's config as it stands now: ``config.yaml`` with the changes of later resumes
    (``config_changes.jsonl``) applied, flattened to dotted keys; None without a run."""
    recorded = read_run_config(output_dir)
    if recorded is None:
        return None
    kind, tree = recorded
    flat = _flatten(tree)
    fs, path = fsspec.core.url_to_fs(f"{output_dir.rstrip('/')}/{CHANGES_FILE}")
    if fs.exists(path):
        with fs.open(path, "r", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    flat.update({k: v[1] for k, v in json.loads(line)["changes"].items()})
    return kind, flat


def check_output_dir(output_dir: str, config_kind: str, config: dict[str, Any],
                     resume: bool, overwrite: bool) -> str:
    """Refuse to write into ``output_dir`` when it holds another run's results; returns what
    :func:`record_config` will do once the run has passed its start-up checks:
    ``"new"`` (nothing there), ``"same"`` (this config's run, or only resume-safe changes),
    ``"resume"`` (``resume_from`` with allowed changes, recorded per step) or ``"replace"``
    (``overwrite_output_dir``, or the same trainer's run that left no checkpoint). With
    ``resume_from`` set, ``overwrite_output_dir`` replaces only another trainer's run or files
    that are no run's: a relaunch that adds ``resume_from=auto`` continues its own run.

    Args:
      config_kind: this run's config class name (``DPOConfig``...).
      config: this run's resolved config as a dict.
      resume: ``resume_from`` is set.
      overwrite: ``overwrite_output_dir`` is set (then only a warning).
    """
    fs, path = fsspec.core.url_to_fs(output_dir)
    if not fs.exists(path):
        _check_creatable(fs, path, output_dir)
        return "new"
    if not fs.isdir(path):
        raise OutputDirError(f"output_dir {output_dir}: exists and is not a directory")
    names = _names(fs, path)
    foreign = _foreign(names)
    if not foreign:
        return "new"
    hint = "set overwrite_output_dir=true to replace it, or choose another output_dir"
    recorded = recorded_config(output_dir)
    if recorded is None:
        problem = (f"output_dir {output_dir} is not empty ({', '.join(foreign[:5])}"
                   f"{', ...' if len(foreign) > 5 else ''}) and holds no run's {CONFIG_FILE}")
    else:
        kind, previous = recorded
        if kind != config_kind:
            problem = (f"output_dir {output_dir} holds a {kind or 'different'} run "
                       f"(its {CONFIG_FILE}); this is a {config_kind} run")
        elif overwrite and not resume:  # starts over even with the same config
            problem = f"output_dir {output_dir} holds a {kind} run"
        elif not _has_checkpoint(names):
            logger.warning("output_dir %s holds a %s run that left no checkpoint: this run "
                           "replaces it (its files move to %s<time>/)", output_dir, kind,
                           REPLACED_PREFIX)
            return "replace"
        elif resume:  # a relaunch that keeps overwrite_output_dir continues its own run
            changed = [k for k in _changed_keys(previous, config) if _matches(k, DATA_KEYS)]
            if changed:
                now = _flatten(config)
                key = changed[0]
                raise OutputDirError(
                    f"resume_from: {key} was {previous.get(key, '<absent>')!r} in the run in "
                    f"{output_dir}, this config has {now.get(key, '<absent>')!r}; a resumed run "
                    f"must read the same data and models (set it back, or start a new run in "
                    f"another output_dir)")
            return "resume"
        else:
            diffs = config_differences(previous, config)
            if not diffs:
                return "same"
            shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
            problem = (f"output_dir {output_dir} holds a {kind} run with another config ({shown})")
            hint = "set resume_from=auto to continue it, " + hint
    if overwrite:
        logger.warning("%s: overwrite_output_dir=true, its files move to %s<time>/ once this "
                       "run has started", problem, REPLACED_PREFIX)
        return "replace"
    raise OutputDirError(f"{problem}; {hint}")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _changed_keys(previous_flat: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = previous_flat, _flatten(current)
    return [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


WRITTEN_BY_FILE = "written_by.json"
"""Beside a checkpoint's training state (``<checkpoint>/training_state/``): what wrote it."""
WRITTEN_BY_FORMAT = "torchxla_rlhf.written_by/1"
MODEL_KEYS = tuple(k for k in DATA_KEYS if k.startswith(("model.", "reward_model.", "value_model.")))
"""Keys naming the models a run starts from: a resume from any directory must keep them."""


def written_by(cfg: Any) -> dict[str, Any]:
    """What a checkpoint's training state records about the run that wrote it (plain JSON):
    its trainer kind, config class, models (role, config key, head, trained) and resolved
    config. A resume compares it with its own (:func:`check_resume_source`)."""
    from torchxla_rlhf.configs.loader import to_dict

    return {"format": WRITTEN_BY_FORMAT, "trainer": cfg.trainer, "config_class": type(cfg).__name__,
            "models": _models(cfg), "config": to_dict(cfg)}


def _models(cfg: Any) -> list[str]:
    """The models a run trains (what its training state holds), as ``role (key, head)``."""
    return [f"{r.role} ({r.key}, {r.head})" for r in cfg.model_roles() if r.trained]


def read_written_by(checkpoint: str, state_dir: str = "training_state") -> dict[str, Any] | None:
    """The :func:`written_by` record of ``checkpoint`` (flattened ``config``). A checkpoint
    saved before the record existed answers with its run's ``config.yaml`` (plus
    ``config_changes.jsonl``) when its directory has one; None when nothing says."""
    root = checkpoint.rstrip("/")
    fs, path = fsspec.core.url_to_fs(f"{root}/{state_dir}/{WRITTEN_BY_FILE}")
    if fs.exists(path):
        try:
            meta = json.loads(fs.cat_file(path))
            if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict)):
                raise ValueError("not a written_by record")
        except ValueError as e:
            raise OutputDirError(f"{root}/{state_dir}/{WRITTEN_BY_FILE}: unreadable ({e}); the "
                                 "checkpoint cannot say what wrote it") from None
        return dict(meta, config=_flatten(meta["config"]))
    run = root.rpartition("/")[0]
    recorded = recorded_config(run) if run else None
    if recorded is None:
        return None
    kind, flat = recorded
    return {"trainer": flat.get("trainer") or kind, "config_class": kind, "models": None,
            "config": flat}


def _same_dir(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    if "://" in a or "://" in b:
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def check_resume_source(cfg: Any, checkpoint: str, output_dir: str) -> dict[str, list[Any]]:
    """Refuse to resume ``cfg``'s run from ``checkpoint`` when another kind of trainer or other
    models wrote it (one line naming both); the other config differences, ``{key: [the
    checkpoint's, this run's]}``, when it comes from another directory (those inside
    ``output_dir`` are :func:`check_output_dir`'s and :func:`record_config`'s). Reads JSON only."""
    meta = read_written_by(checkpoint)
    source = f"resume_from={cfg.resume_from}" + ("" if cfg.resume_from == checkpoint
                                                  else f" ({checkpoint})")
    weights_only = ("a resume continues the same trainer on the same models; to start from its "
                    "weights instead, set model.name_or_path to an exported checkpoint of that "
                    "run (its final/ or checkpoint-*/) and leave resume_from unset")
    if meta is None:
        logger.warning("%s: the checkpoint records no trainer or config (saved by an older "
                       "version, outside a run directory): not compared with this run", source)
        return {}
    kind, own = meta.get("trainer"), cfg.trainer
    if kind not in (own, type(cfg).__name__):
        raise ResumeError(f"{source}: written by a {kind} run, this is a {own} run; {weights_only}")
    if meta.get("models") is not None and meta["models"] != _models(cfg):
        raise ResumeError(f"{source}: its run trained {'; '.join(meta['models'])}, this one "
                          f"{'; '.join(_models(cfg))}; {weights_only}")
    tree = written_by(cfg)["config"]
    now, before = _flatten(tree), meta["config"]
    changed = _changed_keys(before, tree)
    for key in changed:
        if _matches(key, MODEL_KEYS):
            raise ResumeError(
                f"{source}: its run started from {key}={before.get(key, '<absent>')!r}, this "
                f"config has {now.get(key, '<absent>')!r}; {weights_only}")
    if _same_dir(checkpoint.rstrip("/").rpartition("/")[0], output_dir):
        return {}
    return {k: [before.get(k), now.get(k)] for k in changed if not _matches(k, ("resume_from",))}


def record_config(output_dir: str, cfg: Any, plan: str, step: int,
                  checkpoint_changes: dict[str, list[Any]] | None = None) -> None:
    """Write the run's record once it has passed its start-up checks (process 0 only).

    ``plan`` is :func:`check_output_dir`'s answer: ``"replace"`` first moves the old run's
    files aside; ``"resume"`` keeps ``config.yaml`` as the run started and appends the changed
    keys (``{"from_step": step, "changes": {key: [before, after]}}``) to ``config_changes.jsonl``;
    otherwise ``config.yaml`` is written. ``checkpoint_changes``: a run resumed from another
    directory's checkpoint (:func:`check_resume_source`) writes its ``config.yaml`` and appends
    how it differs from the checkpoint's run the same way."""
    from torchxla_rlhf.configs.loader import save_config, to_dict

    root = output_dir.rstrip("/")
    if plan == "replace":
        replace_run(root)
    if plan == "resume":
        recorded = recorded_config(root)
        if recorded is not None:
            now = _flatten(to_dict(cfg))
            _append_changes(root, step, {k: [recorded[1].get(k), now.get(k)]
                                         for k in _changed_keys(recorded[1], to_dict(cfg))
                                         if not _matches(k, ("resume_from",))})
            return
    save_config(cfg, f"{root}/{CONFIG_FILE}")
    if checkpoint_changes:
        _append_changes(root, step, checkpoint_changes, f" of the checkpoint's run ({cfg.resume_from})")


def _append_changes(root: str, step: int, changes: dict[str, list[Any]], source: str = "") -> None:
    if not changes:
        return
    for key, (before, after) in changes.items():
        logger.warning("resume: %s changes from %r%s to %r from step %d on (recorded in %s)",
                       key, before, source, after, step + 1, CHANGES_FILE)
    fs, path = fsspec.core.url_to_fs(f"{root}/{CHANGES_FILE}")
    previous = fs.cat_file(path) if fs.exists(path) else b""
    row = json.dumps({"from_step": step + 1, "changes": changes}) + "\n"
    with fs.open(path, "wb") as f:  # rewritten whole: gs:// cannot append
        f.write(previous + row.encode())


def replace_run(output_dir: str) -> str | None:
    """Move everything of the run in ``output_dir`` (but :data:`OWN_FILES`: the lock, caches
    keyed by their own fingerprint, wandb folders, earlier replaced runs) into ``replaced-<time>/``; returns that directory (None: nothing)."""
    fs, path = fsspec.core.url_to_fs(output_dir)
    if not fs.exists(path):
        return None
    names = _foreign(_names(fs, path))
    if not names:
        return None
    aside = f"{path.rstrip('/')}/{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    fs.makedirs(aside, exist_ok=True)
    for name in names:
        fs.mv(f"{path.rstrip('/')}/{name}", f"{aside}/{name}", recursive=True)
    logger.warning("output_dir %s: the previous run's files (%s) moved to %s", output_dir,
                   ", ".join(names[:6]) + (", ..." if len(names) > 6 else ""), aside)
    return aside


# ---------------------------------------------------------------------------------------------
# One writer per output_dir


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclasses.dataclass
class RunLock:
    """The held ``run.lock`` of an ``output_dir`` (see :func:`acquire_lock`)."""

    output_dir: str
    holder: dict[str, Any]
    created_dir: bool
    released: bool = False

    def release(self) -> None:
        """Remove the lock (and the directory when this run created it and left it empty).
        Idempotent; never raises (it runs while another error may be on its way out)."""
        if self.released:
            return
        self.released = True
        try:
            fs, path = fsspec.core.url_to_fs(self.output_dir)
            lock = f"{path.rstrip('/')}/{LOCK_FILE}"
            if fs.exists(lock) and json.loads(fs.cat_file(lock)).get("run_id") == self.holder["run_id"]:
                fs.rm_file(lock)
            if self.created_dir and fs.isdir(path) and not fs.ls(path, detail=False):
                fs.rmdir(path)
        except Exception as e:  # noqa: BLE001 - leaving a lock behind is reported, not fatal
            logger.warning("could not remove %s/%s: %s", self.output_dir, LOCK_FILE, e)


def _describe_holder(h: dict[str, Any]) -> str:
    return (f"run {h.get('run_id', '?')} (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
            f"started {h.get('started', '?')})")


def _stale(h: dict[str, Any]) -> bool:
    """The holder is known to be gone: same host, and rebooted since or its pid is dead."""
    if h.get("host") != socket.gethostname():
        return False
    if h.get("boot_id") and _boot_id() and h["boot_id"] != _boot_id():
        return True
    return isinstance(h.get("pid"), int) and not _pid_alive(h["pid"])


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data``, or raise ``FileExistsError`` if it exists: atomic on
    local disks, the memory filesystem and object stores whose fsspec driver supports ``"xb"``
    (gcsfs: an if-generation-match=0 upload)."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        raise
    except OSError:
        # An object store may report a failed precondition (HTTP 412) as another error:
        # the object exists and is not ours means another run won.
        fs.invalidate_cache(path)
        if fs.exists(path) and fs.cat_file(path) != data:
            raise FileExistsError(path) from None
        raise
    except (ValueError, NotImplementedError):  # a driver without exclusive create
        if fs.exists(path):
            raise FileExistsError(path) from None
        logger.warning("%s: this filesystem cannot create a file exclusively; the lock is "
                       "checked, not guaranteed", path)
        with fs.open(path, "wb") as f:
            f.write(data)


LOCK_FIELDS = ("host", "pid", "run_id")
"""What every ``run.lock`` this library writes holds (besides boot id and start time)."""


def _require_directory(fs: fsspec.AbstractFileSystem, path: str, output_dir: str) -> None:
    if fs.exists(path) and not fs.isdir(path):
        raise OutputDirError(f"output_dir {output_dir}: exists and is not a directory (it is a "
                             "file); choose a directory path")


def read_lock(output_dir: str, *, wait_s: float = 1.0) -> dict[str, Any] | None:
    """The holder recorded in ``output_dir``'s ``run.lock`` (None: no lock). A lock whose
    content is not what :func:`acquire_lock` writes (empty after ``wait_s`` -- a write in
    progress is given that long --, not JSON, not an object with host, pid and run id) is an
    :class:`OutputDirError` saying so and how to clear it."""
    fs, path = fsspec.core.url_to_fs(output_dir)
    lock = f"{path.rstrip('/')}/{LOCK_FILE}"
    where = f"{output_dir.rstrip('/')}/{LOCK_FILE}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            raw = fs.cat_file(lock)
        except FileNotFoundError:
            return None
        if raw.strip() or time.monotonic() >= deadline:
            break
        time.sleep(0.1)  # created, content on its way
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = None
    if not (isinstance(holder, dict) and all(k in holder for k in LOCK_FIELDS)):
        shown = raw[:60].decode("utf-8", "replace").strip() or "empty"
        what = "is empty" if shown == "empty" else f"holds {shown!r}"
        raise OutputDirError(
            f"output_dir {output_dir}: {where} {what}, not a lock a run wrote (JSON with "
            f"{', '.join(LOCK_FIELDS)}); if no run writes to {output_dir}, delete {where} and "
            "rerun")
    return holder


def check_lock(output_dir: str, *, takeover_stale: bool) -> dict[str, Any] | None:
    """Whether a run may take ``output_dir``'s lock, without taking it (what ``--check``
    asks, and what :func:`acquire_lock` asks before each try): the stale holder it would take
    over, or None when there is no lock; an :class:`OutputDirError` naming the holder when a
    live run has it (or a dead one and not ``takeover_stale``), or when the lock is not one."""
    fs, path = fsspec.core.url_to_fs(output_dir)
    _require_directory(fs, path, output_dir)
    other = read_lock(output_dir)
    if other is None:
        return None
    where = f"{output_dir.rstrip('/')}/{LOCK_FILE}"
    if not _stale(other):
        raise OutputDirError(
            f"output_dir {output_dir} is in use by {_describe_holder(other)} ({where}); "
            f"wait for it to finish or choose another output_dir")
    if not takeover_stale:
        raise OutputDirError(
            f"output_dir {output_dir}: {where} was left by {_describe_holder(other)}, "
            f"which is no longer running; if no other run writes there, delete {where} "
            f"and rerun (or rerun with resume_from=auto to continue that run)")
    return other


def acquire_lock(output_dir: str, *, takeover_stale: bool) -> RunLock:
    """Take ``output_dir``'s ``run.lock`` for this process, creating the directory if needed;
    an :class:`OutputDirError` naming the holder when another run has it (:func:`check_lock`).

    ``takeover_stale``: a lock whose process is gone (:func:`_stale`) is replaced with a warning
    (a relaunch with ``resume_from`` after a crash) instead of refused."""
    fs, path = fsspec.core.url_to_fs(output_dir)
    _require_directory(fs, path, output_dir)
    created = not fs.exists(path)
    if created:
        _check_creatable(fs, path, output_dir)
    fs.makedirs(path, exist_ok=True)
    lock = f"{path.rstrip('/')}/{LOCK_FILE}"
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": uuid.uuid4().hex[:12]}
    data = (json.dumps(holder) + "\n").encode()
    for _ in range(3):
        try:
            _create_exclusive(fs, lock, data)
            return RunLock(output_dir, holder, created)
        except FileExistsError:
            other = check_lock(output_dir, takeover_stale=takeover_stale)
            if other is None:
                continue  # released between our try and the read: try again
            logger.warning("output_dir %s: taking over the lock of %s, which is no longer "
                           "running", output_dir, _describe_holder(other))
            fs.rm_file(lock)
    raise OutputDirError(f"output_dir {output_dir}: could not take {LOCK_FILE}: other runs "
                         f"took and released it three times while this one tried; run one at "
                         f"a time")


def _check_creatable(fs: fsspec.AbstractFileSystem, path: str, output_dir: str) -> None:
    """A local ``output_dir`` that does not exist yet must be creatable: its nearest existing
    ancestor is a writable directory (checked without writing anything)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" not in protocols and "local" not in protocols:
        return
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputDirError(f"output_dir {output_dir}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir {output_dir}: cannot be created, {parent} is not writable")
