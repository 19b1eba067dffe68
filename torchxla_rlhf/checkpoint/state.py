"""Training state for exact resume, saved sharded inside a checkpoint directory.

``<checkpoint>/training_state/``::

    <model>/process-<k>-of-<n>.bin    the shards process k holds (replica 0 of each piece),
                                      raw bytes, back to back
    <model>/process-<k>-of-<n>.json   its manifest: per tensor (``param.<fqn>``,
                                      ``exp_avg.<fqn>``, ``exp_avg_sq.<fqn>``, ``count``) the
                                      global shape, dtype, and each piece's box and byte range
    trainer_state.json                step, data-loader position, what must match on resume

Everything random in training is a function of ``(seed, step)`` and the learning rate a
function of the optimizer's update count, so with these the resumed run computes what the
uninterrupted one would have, bit for bit.

Each process writes only the shards its own devices hold, tensor by tensor, with no
all-gather and no whole-model host copy: host memory is one tensor's local shards at a time.
Loading reads, for each local device shard, only the saved pieces that overlap it: on the same
mesh exactly the process's own pieces; on another mesh (or device count) the overlapping
pieces of others, so the state reshards.

The checkpoint manager (:mod:`.manager`) writes it into a checkpoint's staging directory
before ``_COMPLETE`` (and before the HF weights when the checkpoint has them), so the state is
published whole or not at all. A preemption save and the timed saves write only this: no
gather, each host its own shards.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterator

import fsspec
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.checkpoint.fsio import COMPLETE_MARKER, read_json, write_json
from torchxla_rlhf.algos.optim import AdamW

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
FORMAT = "torchxla_rlhf.sharded_state/1"


def _trained(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs an :class:`AdamW` over ``model.parameters()`` holds, in
    its order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _entries(name: str, model: torch.nn.Module, opt: AdamW) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, device tensor)`` of everything saved for one model, in a fixed order."""
    named = _trained(model)
    if len(named) != len(opt.params):
        raise ValueError(f"{name}: the optimizer holds {len(opt.params)} tensors, the model "
                         f"{len(named)} trainable parameters")
    yield "count", opt.count
    for (fqn, p), m, v in zip(named, opt.exp_avg, opt.exp_avg_sq):
        yield f"param.{fqn}", p
        yield f"exp_avg.{fqn}", m
        yield f"exp_avg_sq.{fqn}", v


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (any dtype, bf16 included)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a training-state manifest")
    return dtype


def _file_stem(index: int, count: int) -> str:
    return f"process-{index:05d}-of-{count:05d}"


def save_training_state(
    path: str,
    trained: dict[str, tuple[torch.nn.Module, AdamW]],
    trainer_state: dict[str, Any],
    *,
    is_main_process: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> None:
    """Write this process's shards of ``trained`` models' parameters and optimizer state under
    ``<path>/training_state`` (``path``: the checkpoint's staging directory), and, on the main
    process, ``trainer_state`` (JSON). Every process calls it; none waits for another."""
    root = f"{path.rstrip('/')}/{STATE_DIR}"
    fs, froot = fsspec.core.url_to_fs(root)
    stem = _file_stem(process_index, process_count)
    runtime.sync()  # the state must be materialized (and finished) before its shards are read
    runtime.wait()
    for name, (model, opt) in trained.items():
        fs.makedirs(f"{froot}/{name}", exist_ok=True)
        manifest: dict[str, Any] = {"format": FORMAT, "process": process_index,
                                    "processes": process_count, "tensors": {}}
        offset = 0
        with fs.open(f"{froot}/{name}/{stem}.bin", "wb") as f:
            for key, t in _entries(name, model, opt):
                boxes = runtime.local_shard_boxes(t)
                keep, seen = [], set()
                for i, (replica, box) in enumerate(boxes):
                    if replica == 0 and box not in seen:
                        keep.append(i)
                        seen.add(box)
                pieces = []
                if keep:
                    datas = runtime.local_shard_data(t)  # one tensor's local shards at a time
                    for i in keep:
                        box = boxes[i][1]
                        piece = datas[i][tuple(slice(0, b - a) for a, b in box)]  # drop padding
                        data = _as_bytes(piece)
                        f.write(data)
                        pieces.append({"box": [list(b) for b in box], "offset": offset,
                                       "nbytes": data.nbytes})
                        offset += data.nbytes
                    del datas
                manifest["tensors"][key] = {"shape": list(t.shape), "dtype": str(t.dtype),
                                            "pieces": pieces}
        with fs.open(f"{froot}/{name}/{stem}.json", "w") as f:
            json.dump(manifest, f)
    if is_main_process:
        write_json(f"{root}/{TRAINER_STATE}", trainer_state)


def has_training_state(path: str) -> bool:
    """True iff ``path`` is a complete checkpoint (``_COMPLETE``) holding a training state."""
    fs, p = fsspec.core.url_to_fs(path.rstrip("/"))
    return fs.exists(f"{p}/{COMPLETE_MARKER}") and fs.exists(f"{p}/{STATE_DIR}/{TRAINER_STATE}")


def _read_manifests(fs, froot: str, name: str, where: str) -> dict[str, dict]:
    """All processes' manifests of one model merged: ``{key: {shape, dtype, pieces}}``, each
    piece with its file."""
    files = sorted(fs.glob(f"{froot}/{name}/process-*.json"))
    if not files:
        raise FileNotFoundError(f"{where}/{name}: no training-state shards")
    merged: dict[str, dict] = {}
    expected_count = None
    for file in files:
        with fs.open(file, "r") as f:
            m = json.load(f)
        if m.get("format") != FORMAT:
            raise ValueError(f"{file}: format {m.get('format')!r}, expected {FORMAT!r}")
        expected_count = expected_count or m["processes"]
        for key, entry in m["tensors"].items():
            slot = merged.setdefault(key, {"shape": entry["shape"], "dtype": entry["dtype"],
                                           "pieces": []})
            bin_file = file[: -len(".json")] + ".bin"
            slot["pieces"] += [dict(p, file=bin_file) for p in entry["pieces"]]
    if len(files) != expected_count:
        raise ValueError(f"{where}/{name}: {len(files)} process manifest(s) of {expected_count}: "
                         "the save did not finish on every host")
    return merged


def _overlap(a: tuple, b: list) -> tuple | None:
    """Intersection of two boxes, or None."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def _fill(fs, target: torch.Tensor, box: tuple, pieces: list[dict], dtype: torch.dtype,
          read: dict) -> int:
    """Copy into ``target`` (a padded local shard covering ``box``) every saved piece that
    overlaps it; returns the elements covered. ``read`` caches pieces within one tensor."""
    covered = 0
    for p in pieces:
        ov = _overlap(box, p["box"])
        if ov is None:
            continue
        ident = (p["file"], p["offset"])
        if ident not in read:
            with fs.open(p["file"], "rb") as f:
                f.seek(p["offset"])
                raw = bytearray(f.read(p["nbytes"]))
            shape = [b - a for a, b in p["box"]]
            read.clear()  # keep one saved piece on the host at a time
            read[ident] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else \
                torch.empty(shape, dtype=dtype)
        src = read[ident][tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(ov, p["box"]))]
        target[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(ov, box))] = src
        covered += math.prod(hi - lo for lo, hi in ov)
    return covered


@torch.no_grad()
def load_training_state(path: str, trained: dict[str, tuple[torch.nn.Module, AdamW]]) -> dict[str, Any]:
    """Copy parameters and optimizer state from ``<path>/training_state`` into the (sharded)
    device tensors in place, each process reading only what its devices hold; return the
    trainer state JSON."""
    if not has_training_state(path):
        raise FileNotFoundError(
            f"{path}: not a complete checkpoint with a {STATE_DIR}/ (was the run saved with "
            "save_training_state=true?)"
        )
    root = f"{path.rstrip('/')}/{STATE_DIR}"
    fs, froot = fsspec.core.url_to_fs(root)
    held = sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(froot, detail=False)
                  if fs.isdir(p))
    if held and held != sorted(trained):  # (none at all: the shards' own error below)
        raise ValueError(f"{root} holds the state of {held}, this run trains {sorted(trained)}")
    for name, (model, opt) in trained.items():
        saved = _read_manifests(fs, froot, name, root)
        entries = list(_entries(name, model, opt))
        keys = {k for k, _ in entries}
        if set(saved) != keys:
            missing, extra = sorted(keys - set(saved)), sorted(set(saved) - keys)
            raise ValueError(f"{root}/{name} does not fit the model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for key, t in entries:
            entry = saved[key]
            dtype = _dtype(entry["dtype"])
            if entry["shape"] != list(t.shape) or dtype != t.dtype:
                raise ValueError(f"{root}/{name}: {key} is {entry['shape']} {entry['dtype']}, "
                                 f"the model's {list(t.shape)} {t.dtype}")
            boxes = runtime.local_shard_boxes(t)
            # Padded shard shape: the largest local piece per dim (uneven splits pad the last).
            padded = [max(b[d][1] - b[d][0] for _, b in boxes) for d in range(t.ndim)]
            read: dict = {}
            by_box: dict[tuple, torch.Tensor] = {}
            for _, box in boxes:
                if box in by_box:  # replicas share one host buffer
                    continue
                target = torch.zeros(padded, dtype=dtype)
                if _fill(fs, target, box, entry["pieces"], dtype, read) != math.prod(b - a for a, b in box):
                    raise ValueError(f"{root}/{name}: {key}: the saved pieces do not cover "
                                     f"{box} (a process's shards are missing)")
                by_box[box] = target
            runtime.load_local_shards(t, [by_box[box] for _, box in boxes])
            del by_box, read
    runtime.sync()
    return read_json(f"{root}/{TRAINER_STATE}")
