"""Record sources: JSON-lines files through fsspec, or HF hub datasets.

Each record comes with its origin string, used in every error message:
``"<path>:<line>"`` (1-based line numbers) or ``"<hf_name>[<split>]:<index>"`` (0-based row).
Every host reads the whole source (as the JAX code did); sharding happens in the loader.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from torchxla_rlhf.data.chat import DataError
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.errors import RemoteError

__all__ = ["iter_records", "SourceStats"]

logger = logging.getLogger(__name__)


class SourceStats(dict):
    """Counters filled while reading: ``read`` (records yielded), ``skipped_malformed``
    (bad JSON lines skipped with ``skip_malformed``)."""

    def __init__(self) -> None:
        super().__init__(read=0, skipped_malformed=0)


def _iter_jsonl(cfg: DatasetConfig, stats: SourceStats) -> Iterator[tuple[dict[str, Any], str]]:
    import fsspec  # light, but only needed here

    path = cfg.path
    assert path is not None
    try:
        f = fsspec.open(path, "rb").open()
    except FileNotFoundError as e:
        base = "" if "://" in path or os.path.isabs(path) else (
            f" (relative to the working directory {os.getcwd()}; in a config file, also to "
            "that file's folder)")
        raise FileNotFoundError(f"DatasetConfig.path: dataset file not found: {path}{base}") from e
    except ImportError as e:  # e.g. gs:// without gcsfs
        raise ImportError(
            f"DatasetConfig.path: cannot open {path}: {e} (for gs:// install gcsfs: pip install gcsfs)"
        ) from e
    offset = 0  # of the line's first byte, for a decoding error
    with f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            origin = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{origin}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                    f"offset {start + e.start} of the file)") from None
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise DataError(
                        f"{origin}: expected a JSON object per line, got {type(record).__name__}"
                    )
            except (json.JSONDecodeError, DataError) as e:
                msg = (
                    f"{origin}: malformed JSON line ({e.msg} at column {e.colno})"
                    if isinstance(e, json.JSONDecodeError)
                    else str(e)
                )
                if cfg.skip_malformed:
                    stats["skipped_malformed"] += 1
                    if stats["skipped_malformed"] <= 5:
                        logger.warning("skipping %s", msg)
                    continue
                raise DataError(msg) from None
            yield record, origin


def _iter_hf(cfg: DatasetConfig) -> Iterator[tuple[dict[str, Any], str]]:
    import datasets  # heavy import: only when a hub dataset is asked for

    try:
        ds = datasets.load_dataset(cfg.hf_name, split=cfg.hf_split, token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # network, unknown split, gated...: the message never includes the token
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = " (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: only cached datasets load)" \
            if any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) else ""
        raise RemoteError(
            f"DatasetConfig.hf_name/hf_split: could not load '{cfg.hf_name}' split "
            f"'{cfg.hf_split}': {type(e).__name__}: {detail}{offline}"
        ) from e
    for i, record in enumerate(ds):
        yield dict(record), f"{cfg.hf_name}[{cfg.hf_split}]:{i}"


def iter_records(cfg: DatasetConfig, stats: SourceStats | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Yield ``(record, origin)`` for every record of the configured source.

    ``cfg.path``: opened with ``fsspec.open`` (local, ``memory://``, ``gs://``...), one JSON
    object per non-blank line; a malformed line raises :class:`DataError` naming file and line,
    or is counted in ``stats["skipped_malformed"]`` and skipped when ``cfg.skip_malformed``.
    ``cfg.hf_name``: ``datasets.load_dataset(hf_name, split=hf_split)`` with ``$HF_TOKEN``.
    Stops after ``cfg.max_samples`` records.
    """
    cfg.validate()
    stats = stats if stats is not None else SourceStats()
    source = _iter_jsonl(cfg, stats) if cfg.path is not None else _iter_hf(cfg)
    for record, origin in source:
        if cfg.max_samples is not None and stats["read"] >= cfg.max_samples:
            break
        stats["read"] += 1
        yield record, origin


def iter_parsed(cfg: DatasetConfig, parse, stats: dict[str, int]) -> Iterator[tuple[Any, str]]:
    """``(parse(record, origin), origin)`` for each record. A record whose ``parse`` raises
    :class:`DataError` stops the build, or with ``cfg.skip_malformed`` is counted in
    ``stats["skipped_malformed"]`` and skipped (the first five are logged); malformed lines
    the source skipped are added there at the end."""
    src_stats = SourceStats()
    for record, origin in iter_records(cfg, src_stats):
        try:
            parsed = parse(record, origin)
        except DataError as e:
            if not cfg.skip_malformed:
                raise
            stats["skipped_malformed"] += 1
            if stats["skipped_malformed"] <= 5:
                logger.warning("skipping %s", e)
            continue
        yield parsed, origin
    stats["skipped_malformed"] += src_stats["skipped_malformed"]
