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

The directory is written beside its final name and published atomically (:mod:`.fsio`: the
recovery rule). Inside the checkpoint manager's :func:`~.manager.staged` the export writes
into the shared staging directory where every process already wrote its training-state
shards, so weights and state are published together or not at all.
"""


from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import fsspec
import safetensors.torch
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.checkpoint.fsio import (
    COMPLETE_MARKER,
    TMP_INFIX,
    is_local,
    join,
    publish,
    rm_quiet,
    stamp,
    url_to_fs,
    write_bytes,
)
from torchxla_rlhf.data.tokenizers import save_tokenizer_files

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME_PATTERN = "model-{index:05d}-of-{count:05d}.safetensors"
"""HF's shard naming, 1-based: ``model-00001-of-00003.safetensors``."""

STAGED: dict[str, str] = {}
"""``{checkpoint path: staging dir}`` of the saves inside the manager's ``staged`` (fsspec
paths): the export writes there instead of a fresh temporary directory."""


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
        self.local = is_local(fs)
        self._staging: str | None = None
        fs.makedirs(root, exist_ok=True)

    @property
    def staging(self) -> str:
        if self._staging is None:
            self._staging = self.root if self.local else tempfile.mkdtemp(prefix="ckpt-stage-")
        return self._staging

    def write_bytes(self, name: str, data: bytes) -> None:
        write_bytes(self.fs, join(self.root, name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_safetensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        local_path = os.path.join(self.staging, name)
        safetensors.torch.save_file(tensors, local_path, metadata={"format": "pt"})
        if not self.local:
            self.fs.put_file(local_path, join(self.root, name))
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
                    self.fs.put_file(os.path.join(d, name), join(self.root, name))

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
    fs, out = url_to_fs(output_path)
    # A staged save (training state already written by every process) publishes that dir.
    tmp = STAGED.get(out) or f"{out}{TMP_INFIX}{stamp()}"
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
                fs.makedirs(join(tmp, name.rsplit("/", 1)[0]), exist_ok=True)
            writer.write_bytes(name, content)
        writer.write_bytes(COMPLETE_MARKER, f"{time.time():.3f}\n".encode())
    except BaseException:
        rm_quiet(fs, tmp)
        raise
    finally:
        writer.close()

    publish(fs, tmp, out)
    logger.info(
        "Saved HF checkpoint %s: %d tensor(s), %.1f MiB in %d file(s), %.1f s",
        output_path,
        len(state),
        plan.total_size / 2**20,
        len(plan.shards),
        time.perf_counter() - start,
    )


