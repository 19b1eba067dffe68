"""HF-format checkpoint export (docs/training.md), written straight from (sharded) XLA params.

A checkpoint directory holds what ``from_pretrained`` and the open-instruct evaluation suite
read::

    config.json                     model.config, dtype/torch_dtype = save dtype, architectures
    generation_config.json          bos/eos/pad ids (models that can generate only, as HF does)
    model.safetensors               one shard, or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json   several shards
    tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   tokenizers.save_tokenizer_files
    <extra files>                   e.g. the resolved training config
    _COMPLETE                       written last: the directory is whole

Streaming. The state dict is walked one tensor at a time in a fixed order; each tensor is
copied to the host with :func:`runtime.to_cpu` (for a sharded tensor an all-gather: on several
hosts EVERY process makes the same copies in the same order, only the main process writes),
cast to the save dtype and appended to the current shard. Shards are planned up front from
shapes and dtypes (no data needed), so their final names are known and at most one shard plus
one tensor is on the host at any time.

Atomic replace, and the recovery rule. Everything is written into a sibling
``<output_path>.tmp-<stamp>``, ``_COMPLETE`` last. Then an existing ``<output_path>`` (the
previous "latest") is moved aside to ``<output_path>.old-<stamp>``, the new directory is moved
to ``<output_path>``, and the old one is deleted. On a local disk a move is one ``rename``; on
object stores (``gs://``) it is copy + delete, with ``_COMPLETE`` copied last and deleted
first, so a half-copied directory never looks complete. After an interruption at any point:

* a directory is a usable checkpoint iff it contains ``_COMPLETE``;
* a leftover ``<output_path>.tmp-*`` is garbage;
* a leftover ``<output_path>.old-*`` with no complete ``<output_path>`` is the previous
  checkpoint (:func:`resolve_checkpoint` returns it);
* the next successful save to ``<output_path>`` deletes all ``.tmp-*`` / ``.old-*`` leftovers.

Resume state. With ``save_training_state`` the checkpoint also holds ``training_state/``
(:mod:`torchxla_rlhf.train_state`): every process writes its own shards into the shared
staging directory of :func:`staged` before the weights and ``_COMPLETE``, so a checkpoint
has its state iff it is complete. (Per-process shard files with a manifest rather than
``torch.distributed.checkpoint``: its 2.9 SPMD save planner drops partially replicated tensors
whose replicas sit on one process, pytorch/xla#7919, and it needs a process group.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import fsspec
import safetensors.torch
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.tokenizers import save_tokenizer_files

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
"""Written last into a checkpoint directory; its presence means the directory is whole."""

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME_PATTERN = "model-{index:05d}-of-{count:05d}.safetensors"
"""HF's shard naming, 1-based: ``model-00001-of-00003.safetensors``."""

TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"


# ----------------------------------------------------------------------------------------
# fsspec helpers
# ----------------------------------------------------------------------------------------


def _url_to_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs, fs_path.rstrip("/") or fs_path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as the user spelled it: plain for local paths, with the protocol otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to a local path or fsspec URL.

    Local files are written to a temporary name and renamed (readers never see half a file);
    an object-store upload is atomic by itself.
    """
    fs, p = _url_to_fs(path)
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{p}{TMP_INFIX}{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    else:
        _write_bytes(fs, p, data)


def read_json(path: str) -> Any:
    """Read a JSON file from a local path or fsspec URL; errors name the file."""
    fs, p = _url_to_fs(path)
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
    fs, p = _url_to_fs(path)
    return fs.exists(_join(p, COMPLETE_MARKER))


def _siblings(fs: fsspec.AbstractFileSystem, p: str, infix: str) -> list[str]:
    """Paths ``<p><infix>*`` next to ``p`` (listed, not globbed: ``p`` may contain ``[``)."""
    parent, _, base = p.rpartition("/")
    parent = parent or "/"
    if not fs.exists(parent):
        return []
    prefix = base + infix
    names = [x.rstrip("/").rpartition("/")[2] for x in fs.ls(parent, detail=False)]
    return sorted(_join(parent, n) for n in names if n.startswith(prefix))


def resolve_checkpoint(path: str) -> str | None:
    """The complete checkpoint to load for ``path``, following the recovery rule.

    ``path`` itself when it has ``_COMPLETE``; otherwise the newest complete
    ``<path>.old-*`` (the previous checkpoint, left by an interrupted replace); else None.
    """
    fs, p = _url_to_fs(path)
    if fs.exists(_join(p, COMPLETE_MARKER)):
        return path
    # Stamps start with a zero-padded millisecond time, so the last name is the newest.
    for old in reversed(_siblings(fs, p, OLD_INFIX)):
        if fs.exists(_join(old, COMPLETE_MARKER)):
            return _display(fs, old)
    return None


def _stamp() -> str:
    return f"{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(3)}"


def _move_dir(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move directory ``src`` to ``dst`` (which must not exist).

    Local: one atomic ``rename``. Object stores: server-side copy of every file with
    ``_COMPLETE`` copied last, then delete with ``_COMPLETE`` deleted first, so neither side
    looks complete while it is partial. Costs one server-side copy of the directory.
    """
    if _is_local(fs):
        os.rename(src, dst)
        return
    marker = _join(src, COMPLETE_MARKER)
    has_marker = fs.exists(marker)
    for f in fs.find(src):
        rel = f[len(src.rstrip("/")) + 1 :]
        if rel != COMPLETE_MARKER:
            fs.copy(f, _join(dst, rel))
    if has_marker:
        _write_bytes(fs, _join(dst, COMPLETE_MARKER), fs.cat_file(marker))
        fs.rm(marker)
    fs.rm(src, recursive=True)


def _rm_quiet(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # cleanup is best effort; the recovery rule covers leftovers
        logger.warning("Could not remove %s: %s", _display(fs, path), e)


# ----------------------------------------------------------------------------------------
# Shard planning
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """Which tensors go into which file, decided from shapes and dtypes before any copy.

    ``shards[k]`` lists the state-dict names of file ``k`` in write order; ``filenames[k]`` is
    its name; ``total_size`` is the byte size of all saved tensors (index ``metadata``).
    """

    shards: list[list[str]]
    filenames: list[str]
    total_size: int
    total_parameters: int

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: fn for names, fn in zip(self.shards, self.filenames) for name in names}


def _saved_dtype(t: torch.Tensor, save_dtype: torch.dtype) -> torch.dtype:
    """Floating tensors are cast to ``save_dtype``; integer/bool buffers keep their dtype."""
    return save_dtype if t.is_floating_point() else t.dtype


def plan_shards(
    specs: Iterable[tuple[str, torch.Size, torch.dtype]], max_shard_size_bytes: int
) -> ShardPlan:
    """Split ``(name, shape, saved dtype)`` entries, in order, into shards of at most
    ``max_shard_size_bytes`` (greedy, as HF does; a tensor bigger than the limit gets a shard
    of its own). One shard is named ``model.safetensors``, several
    ``model-0000k-of-0000n.safetensors``.
    """
    if max_shard_size_bytes <= 0:
        raise ValueError(f"max_shard_size_bytes={max_shard_size_bytes}: expected a positive size")
    shards: list[list[str]] = [[]]
    current = 0
    total = 0
    params = 0
    for name, shape, dtype in specs:
        numel = math.prod(shape)
        size = numel * dtype.itemsize
        if shards[-1] and current + size > max_shard_size_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
        total += size
        params += numel
    n = len(shards)
    if n == 1:
        filenames = [SAFE_WEIGHTS_NAME]
    else:
        filenames = [SHARD_NAME_PATTERN.format(index=k + 1, count=n) for k in range(n)]
    return ShardPlan(shards=shards, filenames=filenames, total_size=total, total_parameters=params)


def tensors_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries that go into the safetensors files, in state-dict order.

    ``model.state_dict()`` already leaves out non-persistent buffers (rotary ``inv_freq``).
    Tied weights are saved once, under the name HF keeps: for
    ``tie_word_embeddings=True`` LLaMA that is ``model.embed_tokens.weight``, and
    ``lm_head.weight`` is left out (``from_pretrained`` re-ties it). No data is copied: the
    values are the model's own (device) tensors.
    """
    state = model.state_dict()
    tied: dict[str, str] = {}
    if hasattr(model, "get_expanded_tied_weights_keys"):
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in tied.items():
        if target in state and source in state:
            if target in params and source in params and params[target] is not params[source]:
                # Moving a module to the XLA device re-creates each Parameter, which unties
                # them. Only the source is saved and from_pretrained re-ties, so the target's
                # own values would be lost if they had been trained separately.
                logger.warning(
                    "%s and %s are declared tied (tie_word_embeddings) but are different "
                    "tensors on %s; only %s is saved. Re-tie after moving the model "
                    "(model.tie_weights()) so that both train as one.",
                    target,
                    source,
                    params[source].device,
                    source,
                )
            del state[target]
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return state


# ----------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------


def _eos_ids(eos: Any) -> list[int]:
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _is_sequence_classifier(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def export_config_dict(model: Any, tokenizer: Any, save_dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` content: the model's config (not modified in place) with
    ``dtype`` and ``torch_dtype`` = the save dtype's name (transformers 5 reads ``dtype``;
    vLLM and older transformers read ``torch_dtype`` and map a missing/fp32 one to fp16) and
    ``architectures = [class name]``.

    Sequence classifiers (reward/value models) must carry a ``pad_token_id`` different from
    eos: transformers pools at the rightmost non-pad token, so pad == eos would move the
    scored position. A missing one is taken from the tokenizer; otherwise a ValueError.
    """
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if _is_sequence_classifier(model):
        if config.pad_token_id is None and tokenizer is not None:
            config.pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if config.pad_token_id is None:
            raise ValueError(
                f"{type(model).__name__}: config.pad_token_id is not set (and the tokenizer "
                "has no pad token). Sequence classifiers need it to find the last token; set "
                "model.config.pad_token_id (Tulu/LLaMA-2: 0)."
            )
        if config.pad_token_id in _eos_ids(config.eos_token_id):
            raise ValueError(
                f"{type(model).__name__}: config.pad_token_id={config.pad_token_id} equals "
                f"eos_token_id={config.eos_token_id}. transformers and RewardBench score the "
                "rightmost non-pad token, so pad == eos would score the wrong position; use a "
                "distinct pad id (Tulu/LLaMA-2: 0)."
            )
    out = json.loads(config.to_json_string(use_diff=True))
    dtype_name = str(save_dtype).removeprefix("torch.")
    out["dtype"] = dtype_name
    out["torch_dtype"] = dtype_name
    out["architectures"] = [type(model).__name__]
    return out


def export_generation_config_dict(model: Any, config_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """``generation_config.json`` content (None for models that cannot generate, such as
    sequence classifiers, as ``save_pretrained`` does): the model's generation config with
    bos/eos/pad ids taken from the exported config where set."""
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        return None
    import transformers

    gen = copy.deepcopy(getattr(model, "generation_config", None))
    if gen is None:
        gen = transformers.GenerationConfig()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config_dict.get(key) is not None:
            setattr(gen, key, config_dict[key])
    return json.loads(gen.to_json_string(use_diff=True))


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------


class _DirWriter:
    """Writes files into the temporary checkpoint directory, locally or through fsspec.

    Object stores: files are written on local disk first (``staging``) and uploaded, so a
    shard is never held twice in host memory (tensors + serialized bytes).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.root = fs, root
        self.local = _is_local(fs)
        self._staging: str | None = None
        fs.makedirs(root, exist_ok=True)

    @property
    def staging(self) -> str:
        if self._staging is None:
            self._staging = self.root if self.local else tempfile.mkdtemp(prefix="ckpt-stage-")
        return self._staging

    def write_bytes(self, name: str, data: bytes) -> None:
        _write_bytes(self.fs, _join(self.root, name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_safetensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        local_path = os.path.join(self.staging, name)
        safetensors.torch.save_file(tensors, local_path, metadata={"format": "pt"})
        if not self.local:
            self.fs.put_file(local_path, _join(self.root, name))
            os.remove(local_path)

    def save_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer files, portable to transformers 4 and 5 (``save_tokenizer_files``):
        plain ``AutoTokenizer.from_pretrained`` on the checkpoint gives the training ids."""
        if self.local:
            save_tokenizer_files(tokenizer, self.root)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt-tok-") as d:
            save_tokenizer_files(tokenizer, d)
            for name in sorted(os.listdir(d)):
                if os.path.isfile(os.path.join(d, name)):
                    self.fs.put_file(os.path.join(d, name), _join(self.root, name))

    def close(self) -> None:
        if self._staging is not None and not self.local:
            shutil.rmtree(self._staging, ignore_errors=True)


def _check_extra_files(extra_files: Mapping[str, str | bytes] | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, content in (extra_files or {}).items():
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or ".." in parts or not name or name == COMPLETE_MARKER:
            raise ValueError(
                f"extra_files: {name!r} is not allowed; expected a relative file name inside "
                f"the checkpoint directory (no '..', not {COMPLETE_MARKER!r})"
            )
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, bytes):
            raise TypeError(f"extra_files[{name!r}]: expected str or bytes, got {type(content).__name__}")
        out[name] = content
    return out


def save_hf_checkpoint(
    model: Any,
    tokenizer: Any,
    output_path: str,
    *,
    save_dtype: torch.dtype = torch.bfloat16,
    max_shard_size_bytes: int = 5 * 2**30,
    is_main_process: bool = True,
    extra_files: dict[str, str | bytes] | None = None,
) -> None:
    """Write ``model`` (+ ``tokenizer``) as an HF checkpoint directory at ``output_path``.

    ``output_path`` is a local path or an fsspec URL (``gs://bucket/run/checkpoint-latest``).
    It is replaced atomically (see the module docstring for the recovery rule).

    Every process must call this with the same model, because the host copies are
    collectives on several hosts; only ``is_main_process`` writes, the others make the copies
    and return. Host memory: at most one shard (``max_shard_size_bytes`` in the save dtype)
    plus one tensor in its original dtype. Cost: one device-to-host transfer (all-gather) per
    tensor, a host sync each.

    Args:
        model: a ``transformers.PreTrainedModel`` whose params may be (SPMD-sharded) XLA
            tensors or CPU tensors.
        tokenizer: saved with ``tokenizers.save_tokenizer_files`` (portable class name, chat
            template also in tokenizer_config.json); None to skip.
        save_dtype: dtype of floating tensors in the files, and ``dtype`` in config.json.
        max_shard_size_bytes: size limit of one safetensors file (in the save dtype).
        is_main_process: whether this process writes.
        extra_files: ``{relative name: text or bytes}`` written into the directory too.

    Raises:
        ValueError: sequence classifier without a pad id, or with pad == eos (raised on
            every process, before any collective); bad ``extra_files`` names.
    """
    # Everything that can fail on bad input runs first, on every process, so no process is
    # left waiting in a collective that another one never reaches.
    if not (isinstance(save_dtype, torch.dtype) and save_dtype.is_floating_point):
        raise ValueError(f"save_dtype={save_dtype!r}: expected a floating torch.dtype")
    config_dict = export_config_dict(model, tokenizer, save_dtype)
    generation_dict = export_generation_config_dict(model, config_dict)
    extras = _check_extra_files(extra_files)
    state = tensors_to_save(model)
    plan = plan_shards(
        ((name, t.shape, _saved_dtype(t, save_dtype)) for name, t in state.items()),
        max_shard_size_bytes,
    )

    if not is_main_process:
        for names in plan.shards:
            for name in names:
                runtime.to_cpu(state[name])  # same collectives as the main process; discarded
        return

    start = time.perf_counter()
    fs, out = _url_to_fs(output_path)
    # A staged save (training state already written by every process) publishes that dir.
    tmp = _STAGED.get(out) or f"{out}{TMP_INFIX}{_stamp()}"
    writer = _DirWriter(fs, tmp)
    try:
        for names, filename in zip(plan.shards, plan.filenames):
            shard: dict[str, torch.Tensor] = {}
            for name in names:
                host = runtime.to_cpu(state[name])  # host sync; all-gather if sharded
                shard[name] = host.to(_saved_dtype(host, save_dtype)).contiguous()
                del host
            writer.write_safetensors(filename, shard)
            del shard
        if len(plan.shards) > 1:
            writer.write_json(
                SAFE_WEIGHTS_INDEX_NAME,
                {
                    "metadata": {
                        "total_size": plan.total_size,
                        "total_parameters": plan.total_parameters,
                    },
                    "weight_map": plan.weight_map,
                },
            )
        writer.write_json("config.json", config_dict)
        if generation_dict is not None:
            writer.write_json("generation_config.json", generation_dict)
        if tokenizer is not None:
            writer.save_tokenizer(tokenizer)
        for name, content in extras.items():
            if "/" in name:
                fs.makedirs(_join(tmp, name.rsplit("/", 1)[0]), exist_ok=True)
            writer.write_bytes(name, content)
        writer.write_bytes(COMPLETE_MARKER, f"{time.time():.3f}\n".encode())
    except BaseException:
        _rm_quiet(fs, tmp)
        raise
    finally:
        writer.close()

    _publish(fs, tmp, out)
    logger.info(
        "Saved HF checkpoint %s: %d tensor(s), %.1f MiB in %d file(s), %.1f s",
        output_path,
        len(state),
        plan.total_size / 2**20,
        len(plan.shards),
        time.perf_counter() - start,
    )


_STAGED: dict[str, str] = {}
"""``{checkpoint path: staging dir}`` of the saves inside :func:`staged` (fsspec paths)."""


@contextlib.contextmanager
def staged(output_path: str, *, is_main_process: bool) -> Iterator[str]:
    """A staging directory shared by every process for the next :func:`save_hf_checkpoint` to
    ``output_path``: the processes write their training-state shards into it, then the HF
    save writes the weights and ``_COMPLETE`` there and publishes it, so weights and state
    appear together or not at all.

    Its name is fixed (``<output_path>.tmp-staged``) because the hosts cannot agree on a
    random one; process 0 empties it first and a :func:`runtime.barrier` makes the others
    wait for that. Yields the URL to write into.
    """
    fs, out = _url_to_fs(output_path)
    staging = f"{out}{TMP_INFIX}staged"
    if is_main_process:
        _rm_quiet(fs, staging)
        fs.makedirs(staging, exist_ok=True)
    runtime.barrier()
    _STAGED[out] = staging
    try:
        yield _display(fs, staging)
    finally:
        _STAGED.pop(out, None)
        if is_main_process and fs.exists(staging):  # the save failed before publishing
            _rm_quiet(fs, staging)


def _publish(fs: fsspec.AbstractFileSystem, tmp: str, out: str) -> None:
    """Swap the complete ``tmp`` directory in as ``out``: old aside, new in, old deleted."""
    old: str | None = None
    try:
        if fs.exists(out):
            old = f"{out}{OLD_INFIX}{_stamp()}"
            _move_dir(fs, out, old)
        _move_dir(fs, tmp, out)
    except BaseException:
        _restore_after_failed_publish(fs, tmp, out, old)
        raise
    # The new checkpoint is in place: every leftover of this or earlier saves is garbage.
    for leftover in _siblings(fs, out, OLD_INFIX) + _siblings(fs, out, TMP_INFIX):
        _rm_quiet(fs, leftover)


def _restore_after_failed_publish(
    fs: fsspec.AbstractFileSystem, tmp: str, out: str, old: str | None
) -> None:
    """Best effort after an exception during the swap: put the previous checkpoint back if
    it had been moved aside, and drop the temporary directory. (A hard crash skips this;
    the recovery rule in the module docstring covers that case.)"""
    try:
        if old is not None and fs.exists(old) and not fs.exists(_join(out, COMPLETE_MARKER)):
            _rm_quiet(fs, out)
            _move_dir(fs, old, out)
    except Exception as e:
        logger.warning("Could not move %s back to %s: %s", _display(fs, old), _display(fs, out), e)
    _rm_quiet(fs, tmp)


# ----------------------------------------------------------------------------------------
# When to save
# ----------------------------------------------------------------------------------------


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
