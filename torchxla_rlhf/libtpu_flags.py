"""``LIBTPU_INIT_ARGS`` checked against the libtpu that is installed.

libtpu reads its XLA/TPU flags from ``LIBTPU_INIT_ARGS`` when the TPU client starts; a flag
the library does not define can abort that start-up, and flags are renamed or removed between
releases. Every flag libtpu defines is compiled into ``libtpu.so`` as its name, a C string
(NUL-delimited), so a flag whose name is not such a string is unknown to it (a removed flag's
name may survive inside other data, such as a protobuf's list of reserved field names): :func:`filter_init_args`
drops such tokens (and anything that is not ``--name[=value]``) with a warning.

Imports no torch: the launcher's tests and the runtime (before the TPU client starts) use it.
Searching costs one read of the ~360 MB library, memory-mapped (well under a second).
"""

from __future__ import annotations

import importlib.util
import logging
import mmap
import os
import re
from typing import Iterable

logger = logging.getLogger(__name__)

ENV = "LIBTPU_INIT_ARGS"

TORCH_XLA_TPU_FLAGS = (
    "--xla_tpu_use_enhanced_launch_barrier=false",
    "--xla_latency_hiding_scheduler_rerun=1",
    "--xla_tpu_prefer_async_allgather_to_allreduce=true",
    "--xla_tpu_enable_flash_attention=false",
)
"""The flags torch_xla 2.9 gives libtpu on every TPU host (``torch_xla/__init__.py``,
``_setup_libtpu_flags``; v5 adds two async-collective flags): the TPU compiler that
``plan --compile`` asks runs with them, as a pod's does. They change scheduling and memory
(all-gathers kept async and rematerialized in the backward instead of held)."""

TORCH_XLA_V5_FLAGS = ("--xla_enable_async_all_gather=true", "--xla_enable_async_collective_permute=true")
_FLAG = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*)(?:=.*)?")


def libtpu_library() -> str | None:
    """The path of the installed ``libtpu/libtpu.so`` (the ``libtpu`` package torch_xla's
    ``tpu`` extra pins), or None when it is not installed."""
    spec = importlib.util.find_spec("libtpu")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "libtpu.so")
        if os.path.isfile(path):
            return path
    return None


def _has_c_string(m: mmap.mmap, name: bytes) -> bool:
    """True when ``name`` occurs as a whole NUL-terminated string (not inside a longer name:
    a removed flag survives only inside other data, e.g. a protobuf's reserved-names list)."""
    start = m.find(name + b"\0")
    while start >= 0:
        if start == 0 or m[start - 1] == 0:
            return True
        start = m.find(name + b"\0", start + 1)
    return False


def known_flags(library: str, names: Iterable[str]) -> set[str]:
    """The ``names`` the shared library ``library`` holds as C strings (a flag's name is one)."""
    wanted = set(names)
    if not wanted:
        return set()
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return {n for n in wanted if _has_c_string(m, n.encode())}


def filter_init_args(args: str, library: str) -> tuple[str, list[str]]:
    """``(kept args, dropped tokens)``: the ``--flag[=value]`` tokens of ``args`` whose flag
    name ``library`` defines, in order; the rest (unknown flags, stray words) dropped."""
    tokens = args.split()
    names = {m.group(1) for t in tokens if (m := _FLAG.fullmatch(t))}
    known = known_flags(library, names)
    kept, dropped = [], []
    for t in tokens:
        m = _FLAG.fullmatch(t)
        (kept if m and m.group(1) in known else dropped).append(t)
    return " ".join(kept), dropped


def drop_unknown_init_args(environ: dict[str, str] | None = None) -> list[str]:
    """Rewrite ``LIBTPU_INIT_ARGS`` in ``environ`` (default: this process's) to the flags the
    installed libtpu defines, warning about each dropped one; returns the dropped tokens.
    Nothing happens without the variable or without libtpu (XLA:CPU). Call before the TPU
    client starts (it reads the variable once)."""
    env = os.environ if environ is None else environ
    args = env.get(ENV, "")
    library = libtpu_library() if args.strip() else None
    if library is None:
        return []
    kept, dropped = filter_init_args(args, library)
    for token in dropped:
        logger.warning("%s: dropping %r: the installed libtpu (%s) does not define it",
                       ENV, token, library)
    if dropped:
        env[ENV] = kept
    return dropped
