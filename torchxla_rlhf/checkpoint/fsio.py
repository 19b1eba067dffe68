"""Filesystem helpers of the checkpoint manager: local paths and fsspec URLs (``gs://``) alike.

Atomic replace, and the recovery rule. A checkpoint is written into a sibling
``<path>.tmp-<stamp>``, ``_COMPLETE`` last. :func:`publish` then moves an existing ``<path>``
(the previous one) aside to ``<path>.old-<stamp>``, moves the new directory to ``<path>``,
and deletes the old one. On a local disk a move is one ``rename``; on object stores it is
copy + delete, with ``_COMPLETE`` copied last and deleted first, so a half-copied directory
never looks complete. After an interruption at any point:

* a directory is a usable checkpoint iff it contains ``_COMPLETE``;
* a leftover ``<path>.tmp-*`` is garbage;
* a leftover ``<path>.old-*`` with no complete ``<path>`` is the previous checkpoint
  (:func:`resolve_checkpoint` returns it);
* the next successful publish to ``<path>`` deletes all ``.tmp-*`` / ``.old-*`` leftovers.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
"""Written last into a checkpoint directory; its presence means the directory is whole."""

TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"



def url_to_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs, fs_path.rstrip("/") or fs_path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as the user spelled it: plain for local paths, with the protocol otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to a local path or fsspec URL.

    Local files are written to a temporary name and renamed (readers never see half a file);
    an object-store upload is atomic by itself.
    """
    fs, p = url_to_fs(path)
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = f"{p}{TMP_INFIX}{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    else:
        write_bytes(fs, p, data)


def read_json(path: str) -> Any:
    """Read a JSON file from a local path or fsspec URL; errors name the file."""
    fs, p = url_to_fs(path)
    try:
        with fs.open(p, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def require_shared_output_dir(output_dir: str, num_processes: int) -> None:
    """With several processes, ``output_dir`` must be one location every host sees (``gs://``
    or another fsspec URL): process 0 writes checkpoints and caches there and every host reads
    its decisions back from it (``resume_from: auto``, cached reference log-probs). A local
    path is a different directory on each host: they would disagree, and wait forever."""
    if num_processes <= 1:
        return
    # The protocol alone decides (instantiating gs:// would need gcsfs here).
    if fsspec.core.split_protocol(output_dir)[0] in (None, "file", "local"):
        raise ValueError(
            f"output_dir={output_dir!r} is a local path, but this run has {num_processes} "
            "processes (hosts): each would see its own directory. Use a shared location, e.g. "
            "output_dir=gs://BUCKET/run"
        )


def is_complete_checkpoint(path: str) -> bool:
    """True iff ``path`` is a checkpoint directory whose writing finished (has ``_COMPLETE``)."""
    fs, p = url_to_fs(path)
    return fs.exists(join(p, COMPLETE_MARKER))


def siblings(fs: fsspec.AbstractFileSystem, p: str, infix: str) -> list[str]:
    """Paths ``<p><infix>*`` next to ``p`` (listed, not globbed: ``p`` may contain ``[``)."""
    parent, _, base = p.rpartition("/")
    parent = parent or "/"
    if not fs.exists(parent):
        return []
    prefix = base + infix
    names = [x.rstrip("/").rpartition("/")[2] for x in fs.ls(parent, detail=False)]
    return sorted(join(parent, n) for n in names if n.startswith(prefix))


def resolve_checkpoint(path: str) -> str | None:
    """The complete checkpoint to load for ``path``, following the recovery rule.

    ``path`` itself when it has ``_COMPLETE``; otherwise the newest complete
    ``<path>.old-*`` (the previous checkpoint, left by an interrupted replace); else None.
    """
    fs, p = url_to_fs(path)
    if fs.exists(join(p, COMPLETE_MARKER)):
        return path
    # Stamps start with a zero-padded millisecond time, so the last name is the newest.
    for old in reversed(siblings(fs, p, OLD_INFIX)):
        if fs.exists(join(old, COMPLETE_MARKER)):
            return display(fs, old)
    return None


def stamp() -> str:
    return f"{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(3)}"


def move_dir(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move directory ``src`` to ``dst`` (which must not exist).

    Local: one atomic ``rename``. Object stores: server-side copy of every file with
    ``_COMPLETE`` copied last, then delete with ``_COMPLETE`` deleted first, so neither side
    looks complete while it is partial. Costs one server-side copy of the directory.
    """
    if is_local(fs):
        os.rename(src, dst)
        return
    marker = join(src, COMPLETE_MARKER)
    has_marker = fs.exists(marker)
    for f in fs.find(src):
        rel = f[len(src.rstrip("/")) + 1 :]
        if rel != COMPLETE_MARKER:
            fs.copy(f, join(dst, rel))
    if has_marker:
        write_bytes(fs, join(dst, COMPLETE_MARKER), fs.cat_file(marker))
        fs.rm(marker)
    fs.rm(src, recursive=True)


def rm_quiet(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # cleanup is best effort; the recovery rule covers leftovers
        logger.warning("Could not remove %s: %s", display(fs, path), e)


def publish(fs: fsspec.AbstractFileSystem, tmp: str, out: str) -> None:
    """Swap the complete ``tmp`` directory in as ``out``: old aside, new in, old deleted."""
    old: str | None = None
    try:
        if fs.exists(out):
            old = f"{out}{OLD_INFIX}{stamp()}"
            move_dir(fs, out, old)
        move_dir(fs, tmp, out)
    except BaseException:
        _restore_after_failed_publish(fs, tmp, out, old)
        raise
    # The new checkpoint is in place: every leftover of this or earlier saves is garbage.
    for leftover in siblings(fs, out, OLD_INFIX) + siblings(fs, out, TMP_INFIX):
        rm_quiet(fs, leftover)


def _restore_after_failed_publish(
    fs: fsspec.AbstractFileSystem, tmp: str, out: str, old: str | None
) -> None:
    """Best effort after an exception during the swap: put the previous checkpoint back if
    it had been moved aside, and drop the temporary directory. (A hard crash skips this;
    the recovery rule in the module docstring covers that case.)"""
    try:
        if old is not None and fs.exists(old) and not fs.exists(join(out, COMPLETE_MARKER)):
            rm_quiet(fs, out)
            move_dir(fs, old, out)
    except Exception as e:
        logger.warning("Could not move %s back to %s: %s", display(fs, old), display(fs, out), e)
    rm_quiet(fs, tmp)


