"""Who owns an ``output_dir``: a run never overwrites another run's results.

A run's directory is marked by its ``config.yaml`` (first line ``# resolved <ConfigClass>``),
written only after the config, the data and the models have been checked, so a typo in a
data path cannot overwrite a finished run's record. Before anything is written,
:func:`check_output_dir` refuses a non-empty ``output_dir`` that holds

- another trainer's run (a DPO run pointed at a reward model's directory), or
- a run of the same trainer whose config differs in anything but :data:`RESUME_SAFE_KEYS`,

unless ``resume_from`` is set (same trainer only) or ``overwrite_output_dir: true``.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import fsspec
import yaml

from torchxla_rlhf.errors import OutputDirError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"

RESUME_SAFE_KEYS = (
    "resume_from", "overwrite_output_dir", "total_steps", "num_epochs", "log_level",
    "remote_timeout_s", "save_model_freq", "save_milestone_freq", "eval_freq", "logger.*",
)
"""Keys a rerun in the same directory may change (how long, how often, how it logs)."""

OWN_FILES = ("reference_logps_*.npz", "wandb")
"""What a run may leave before its config is written (caches keyed by their own fingerprint,
wandb's per-run folders): a directory holding only these is free."""


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


def check_output_dir(output_dir: str, config_kind: str, config: dict[str, Any],
                     resume: bool, overwrite: bool) -> None:
    """Refuse to write into ``output_dir`` when it holds another run's results.

    Args:
      config_kind: this run's config class name (``DPOConfig``...).
      config: this run's resolved config as a dict.
      resume: ``resume_from`` is set.
      overwrite: ``overwrite_output_dir`` is set (then only a warning).
    """
    fs, path = fsspec.core.url_to_fs(output_dir)
    if not fs.exists(path):
        _check_creatable(fs, path, output_dir)
        return
    if not fs.isdir(path):
        raise OutputDirError(f"output_dir {output_dir}: exists and is not a directory")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    foreign = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in OWN_FILES)]
    if not foreign:
        return
    hint = "set overwrite_output_dir=true to replace it, or choose another output_dir"
    recorded = read_run_config(output_dir)
    if recorded is None:
        problem = (f"output_dir {output_dir} is not empty ({', '.join(foreign[:5])}"
                   f"{', ...' if len(foreign) > 5 else ''}) and holds no run's {CONFIG_FILE}")
    else:
        kind, previous = recorded
        if kind != config_kind:
            problem = (f"output_dir {output_dir} holds a {kind or 'different'} run "
                       f"(its {CONFIG_FILE}); this is a {config_kind} run")
        else:
            diffs = config_differences(previous, config)
            if not diffs or resume:
                return
            shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
            problem = (f"output_dir {output_dir} holds a {kind} run with another config ({shown})")
            hint = "set resume_from=auto to continue it, " + hint
    if overwrite:
        logger.warning("%s: overwrite_output_dir=true, replacing it", problem)
        return
    raise OutputDirError(f"{problem}; {hint}")


def _check_creatable(fs: fsspec.AbstractFileSystem, path: str, output_dir: str) -> None:
    """A local ``output_dir`` that does not exist yet must be creatable: its nearest existing
    ancestor is a writable directory (checked without writing anything)."""
    import os

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
