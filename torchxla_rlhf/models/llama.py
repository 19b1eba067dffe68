"""Build and load transformers' own Llama classes, sharded on the mesh as they load.

- :func:`load_causal_lm`: ``LlamaForCausalLM`` (policy, DPO reference).
- :func:`load_sequence_classifier`: ``LlamaForSequenceClassification`` with ``num_labels=1``
  (reward and value models), from a reward-model checkpoint or from a causal-LM checkpoint
  (backbone kept, LM head dropped, ``score`` drawn from normal(0, initializer_range)).

Weights are read from safetensors (or PyTorch ``.bin`` shards, memory-mapped) one tensor at a time and placed straight onto their sharded
devices; the model skeleton is built on the ``meta`` device, so the host never holds a whole
model (what lets 13B and 70B load on a TPU VM host). ``"tiny"`` names a seeded random Llama of
:class:`TinyModelConfig`'s shape, built locally for the CPU configs and the tests.

Attention is ``ModelConfig.attn_implementation``: by default attention.py's einsum form
(registered through transformers' ``AttentionInterface``; it keeps heads split over ``mp``),
or HF's ``eager``; always with an explicit 2-D attention mask and explicit position ids:
transformers' default ``sdpa`` mask code does Python-level ``.all()`` checks, i.e. hidden host
syncs in every forward (seen on torch_xla 2.9).
"""

from __future__ import annotations

import contextlib
import json
import dataclasses
import logging
import os
from typing import Any

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from torchxla_rlhf import runtime
from torchxla_rlhf.models import attention
from torchxla_rlhf.models import sharding
from torchxla_rlhf.configs.sections import ModelConfig, TinyModelConfig
from torchxla_rlhf.configs.loader import ConfigError
from torchxla_rlhf.errors import UserError
from torchxla_rlhf.preflight.shapes import frozen_dtype  # one rule for the pre-flight and the loader
from torchxla_rlhf.algos.rl import last_token_index, position_ids_from_mask


class ModelRoleError(UserError, ValueError):
    """A checkpoint that cannot play the role it was given (a reward model as the policy, a
    causal LM as the frozen reward model)."""


class WeightFileError(UserError, ValueError):
    """A weight file or checkpoint index that cannot be read (the message names the file)."""

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEBUG_SHAPE = dict(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
"""EasyLM's ``debug`` Llama shape, used by the benchmarks: set it as the
``tiny`` model's shape (``model.tiny.hidden_size=128`` ...) to build one."""


# ----------------------------------------------------------------------------------------
# Config and weight sources
# ----------------------------------------------------------------------------------------


def tiny_llama_config(tiny: TinyModelConfig, pad_token_id: int = 0, **overrides) -> LlamaConfig:
    """The ``tiny`` model's ``LlamaConfig`` (LLaMA's special ids: unk/pad 0, bos 1, eos 2);
    ``overrides`` replace any other ``LlamaConfig`` argument (the tests' variants)."""
    return LlamaConfig(**{**dict(
        vocab_size=tiny.vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.02,
    ), **overrides})


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> str:
    """A local directory holding ``config.json`` and the safetensors files.

    Local directories are used as they are; ``gs://`` (or any fsspec URL) directories are copied
    to a local cache first; anything else is a hub name fetched with ``HF_TOKEN`` from the
    environment (the token is never logged).
    """
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(f"model directory {name_or_path!r} has no config.json")
        return name_or_path
    if "://" in name_or_path:
        return _copy_remote_dir(name_or_path)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        # Not a hub name ("org/name" has one slash): a local path that does not exist.
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
    from huggingface_hub import snapshot_download

    from torchxla_rlhf.remote import hub_error

    def fetch(weights: str) -> str:
        try:
            return snapshot_download(
                name_or_path,
                revision=revision,
                token=os.environ.get("HF_TOKEN"),
                allow_patterns=["*.json", weights, "tokenizer.model", "*.txt"],
            )
        except Exception as e:  # noqa: BLE001 - offline, gated, missing, network: one line naming the id
            raise hub_error(name_or_path, e) from e

    path = fetch("*.safetensors")
    if safetensors_index(path) is None:
        # No safetensors (e.g. allenai/tulu-2-13b publishes pytorch_model-*.bin shards only):
        # fetch the .bin files. Never both formats: a 13B model twice is 52 GB.
        path = fetch("*.bin")
    return path


def weight_pattern(files) -> str:
    """Which weight files to copy from a listing: safetensors when there are any, else the
    PyTorch ``.bin`` shards; never both."""
    return "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"


def _object_version(info: dict) -> str:
    """What identifies one version of a stored file: the object store's generation or
    checksum (gcsfs: ``generation``, ``md5Hash``/``crc32c``; s3: ``ETag``), else its size and
    modification time (local and memory filesystems)."""
    for key in ("generation", "md5Hash", "crc32c", "etag", "ETag", "VersionId"):
        if info.get(key):
            return f"{key}={info[key]}"
    when = next((info[k] for k in ("mtime", "LastModified", "updated", "created") if info.get(k)), "")
    return f"size={info.get('size')} time={when}"


_REMOTE_VERSIONS: dict[str, str] = {}
"""``{url: version}`` of every remote model directory this process loaded (see
:func:`check_hosts_loaded_the_same_models`)."""


def _remote_files(fs, path: str) -> dict[str, dict]:
    """``{file name: info}`` of the files a model directory copy takes."""
    infos = {os.path.basename(i["name"].rstrip("/")): i for i in fs.ls(path, detail=True)}
    weights = weight_pattern(infos).lstrip("*")
    return {n: i for n, i in sorted(infos.items())
            if i.get("type") != "directory" and n.endswith((".json", weights, ".model", ".txt", ".jinja"))}


def _version_of(files: dict[str, dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, info in files.items():
        h.update(f"{name}\0{_object_version(info)}\n".encode())
    return h.hexdigest()[:16]


def _copy_remote_dir(url: str) -> str:
    """Copy an fsspec directory (``gs://bucket/model``) to a local cache directory keyed by
    the URL and the version of its files (generation or checksum), so that a model rewritten
    at the same URL is copied again, never served stale from the cache."""
    import hashlib

    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path.rstrip("/") + "/config.json"):
        raise FileNotFoundError(f"model directory {url!r} has no config.json")
    files = _remote_files(fs, path)
    version = _version_of(files)
    cache = os.path.join(
        os.environ.get("TORCHXLA_RLHF_CACHE", os.path.expanduser("~/.cache/torchxla_rlhf")),
        f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{version}",
    )
    if not os.path.exists(os.path.join(cache, ".complete")):
        os.makedirs(cache, exist_ok=True)
        for name, info in files.items():
            fs.get(info["name"], os.path.join(cache, name))
        if _version_of(_remote_files(fs, path)) != version:
            raise UserError(f"{url}: its files changed while they were being copied; start "
                            "again once the model is written")
        open(os.path.join(cache, ".complete"), "w").close()
    _REMOTE_VERSIONS[url] = version
    return cache


def check_hosts_loaded_the_same_models(output_dir: str) -> None:
    """Process 0's versions of the remote models are the run's: every other host checks that
    it loaded the same ones (a model rewritten at its URL during start-up would otherwise be
    trained against in two versions, silently). Every process calls it, at the same point."""
    if runtime.process_count() == 1 or not _REMOTE_VERSIONS:
        return
    from torchxla_rlhf.checkpoint.fsio import read_json, write_json

    shared = f"{output_dir.rstrip('/')}/model-versions.json"
    if runtime.is_main_process():
        write_json(shared, _REMOTE_VERSIONS)
    runtime.barrier()
    decided = read_json(shared)
    differ = sorted(u for u, v in _REMOTE_VERSIONS.items() if decided.get(u) != v)
    if differ:
        raise UserError(f"{differ[0]}: process {runtime.process_index()} loaded another version "
                        f"of it than process 0 (rewritten during start-up?); start again")


def _format_index(model_dir: str, single_name: str, names_of) -> dict[str, str] | None:
    """Tensor name -> file for one weight format: its ``<single_name>.index.json`` when
    sharded, else the single file ``single_name`` (names read by ``names_of``); None when the
    directory holds neither."""
    index_path = os.path.join(model_dir, f"{single_name}.index.json")
    if os.path.exists(index_path):
        return _read_index(model_dir, index_path)
    single = os.path.join(model_dir, single_name)
    if not os.path.exists(single):
        return None
    return {name: single for name in names_of(single)}


def _safetensors_names(path: str) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


def safetensors_index(model_dir: str) -> dict[str, str] | None:
    """Map of tensor name -> safetensors file path, or None when the directory holds none."""
    return _format_index(model_dir, "model.safetensors", _safetensors_names)


def bin_index(model_dir: str) -> dict[str, str] | None:
    """Map of tensor name -> ``pytorch_model*.bin`` file path, or None when there are none.
    A single ``pytorch_model.bin`` has no index; its names come from opening it with
    ``mmap=True`` (the pickle's metadata is read, not the tensor data)."""
    return _format_index(model_dir, "pytorch_model.bin", lambda path: list(_load_bin(path)))


def weight_index(model_dir: str) -> dict[str, str]:
    """Map of tensor name -> weight file: safetensors if the directory has them, else
    PyTorch ``.bin`` shards."""
    index = safetensors_index(model_dir)
    if index is None:
        index = bin_index(model_dir)
    if index is None:
        raise FileNotFoundError(
            f"{model_dir!r} holds no weights: expected model.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
        )
    return index


def _read_index(model_dir: str, index_path: str) -> dict[str, str]:
    """A sharded checkpoint's ``*.index.json``: name -> shard path; every shard must exist."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty or not an object")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise WeightFileError(
            f"{index_path}: not a checkpoint index (expected JSON with a non-empty "
            f"'weight_map' of tensor name -> shard file): {type(e).__name__}: {e}"
        ) from None
    index = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    missing = sorted({p for p in index.values() if not os.path.exists(p)})
    if missing:
        raise FileNotFoundError(
            f"{index_path} names shard(s) that are not in {model_dir!r}: "
            f"{[os.path.basename(p) for p in missing]}"
        )
    return index


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` shard as a dict of memory-mapped tensors: ``weights_only`` (tensors and
    containers only, never arbitrary pickled objects) and ``mmap`` (tensor data stays in the
    file until a tensor is read), so opening a 10 GB shard costs its metadata only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # zip, pickle and weights_only errors all mean "not readable"
        raise WeightFileError(
            f"{path}: cannot read as a PyTorch checkpoint shard (torch.load weights_only=True, "
            f"mmap=True; legacy non-zip .bin files need re-saving): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(state, dict):
        raise WeightFileError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return state


def open_safetensors(path: str):
    """``safe_open(path)``, with a corrupt or truncated file named in a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from None


class _TensorReader:
    """Reads named tensors from safetensors or ``.bin`` files, one tensor at a time.

    Safetensors files stay open (``safe_open`` reads a tensor on request). Of the ``.bin``
    shards only the current one is kept memory-mapped; tensors are read in parameter order,
    which follows the shards, so each shard is opened about once, and the host holds one
    tensor plus the mapped pages the OS can drop."""

    def __init__(self, index: dict[str, str]):
        self.index = index
        self._stack = contextlib.ExitStack()
        self._files: dict[str, Any] = {}
        self._bin: tuple[str, dict[str, torch.Tensor]] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        path = self.index[name]
        if path.endswith(".bin"):
            if self._bin is None or self._bin[0] != path:
                self._bin = None  # release the previous shard's mapping first
                self._bin = (path, _load_bin(path))
            tensor = self._bin[1].get(name)
            if tensor is None:
                raise KeyError(f"{path}: the index lists tensor {name!r} here, the shard lacks it")
            return tensor
        if path not in self._files:
            self._files[path] = self._stack.enter_context(open_safetensors(path))
        return self._files[path].get_tensor(name)

    def close(self) -> None:
        self._bin = None
        self._stack.close()


def _check_pad_id(cfg: ModelConfig, config: LlamaConfig, pad_token_id: int | None) -> None:
    if pad_token_id is not None and not 0 <= pad_token_id < config.vocab_size:
        raise ConfigError(f"tokenizer_pad_token_id={pad_token_id} is outside the vocabulary of "
                          f"{cfg.name_or_path!r} (vocab_size {config.vocab_size})",
                          key="tokenizer_pad_token_id")


# ----------------------------------------------------------------------------------------
# Building models
# ----------------------------------------------------------------------------------------


def _model_config(cfg: ModelConfig, pad_token_id: int | None) -> tuple[LlamaConfig, str | None]:
    """The HF config and the directory weights come from (None for ``tiny``)."""
    if cfg.name_or_path == "tiny":
        _check_pad_id(cfg, tiny_llama_config(cfg.tiny), pad_token_id)
        return tiny_llama_config(cfg.tiny, pad_token_id=pad_token_id or 0), None
    model_dir = resolve_model_dir(cfg.name_or_path, cfg.revision)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ModelRoleError(
            f"{cfg.name_or_path!r} is a {config.model_type!r} model; torchxla_rlhf trains Llama models"
        )
    _check_pad_id(cfg, config, pad_token_id)
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config, model_dir


def _init_cpu_tensors(model_cls, config: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random init on the host (only for ``tiny`` models and fresh heads)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _build_sharded(
    model_cls,
    config: LlamaConfig,
    mesh: runtime.MeshInfo,
    cfg: ModelConfig,
    get_tensor,
    place=None,
) -> torch.nn.Module:
    """Skeleton on ``meta``; each parameter read by ``get_tensor(name)`` (CPU), cast to
    ``param_dtype``, moved to the device and sharded, one at a time. ``place(shape, dtype,
    spec, requires_grad) -> Parameter`` instead makes each parameter itself (a placeholder of
    :func:`placeholder_model`)."""
    config._attn_implementation = attention.resolve(cfg.attn_implementation)
    # use_cache stays as the source config has it (exported config.json keeps it, so vLLM and
    # HF generate cache keys/values); every training forward passes use_cache=False itself.
    with torch.device("meta"):
        model = model_cls(config)
    specs = sharding.match_specs(
        ((n, tuple(p.shape)) for n, p in model.named_parameters()),
        sharding.rules_for(model),
        axis_sizes=mesh.sizes,
    )
    sharding.check_heads_fit(config, mesh)
    dtype = DTYPES[cfg.param_dtype]
    dev = runtime.device()
    for name, meta_param in list(model.named_parameters()):
        if place is not None:
            param = place(tuple(meta_param.shape), dtype, specs[name], meta_param.requires_grad)
        else:
            cpu = get_tensor(name)
            if tuple(cpu.shape) != tuple(meta_param.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(cpu.shape)}, the model expects "
                    f"{tuple(meta_param.shape)}"
                )
            # One tensor at a time: the host holds at most one weight.
            t = runtime.shard_to_device(cpu.to(dtype), mesh, specs[name])
            param = torch.nn.Parameter(t, requires_grad=meta_param.requires_grad)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, param)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # lm_head still points at the meta tensor the skeleton tied it to
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them on the device.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(dev)
    for name, t in list(model.named_buffers()) + list(model.named_parameters(remove_duplicate=False)):
        if t.is_meta:
            raise RuntimeError(f"{name!r} was not materialised")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def llama_config(shape: Any, layers: int | None = None, pad_token_id: int = 0) -> LlamaConfig:
    """A ``LlamaConfig`` of ``shape`` (a ``preflight.shapes.Shape``), with ``layers`` decoder
    layers instead of its own when given."""
    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim or shape.hidden // shape.heads,
        max_position_embeddings=shape.max_positions or 4096, tie_word_embeddings=shape.tie,
        attention_bias=shape.attention_bias, mlp_bias=shape.mlp_bias, pad_token_id=pad_token_id,
    )


def placeholder_model(head: str, config: LlamaConfig, mesh: runtime.MeshInfo, cfg: ModelConfig,
                      capture: Any) -> transformers.PreTrainedModel:
    """The model ``cfg`` describes, of ``config``'s shape, sharded by the partition rules, with
    every weight a placeholder of ``capture`` (a ``runtime.GraphCapture``): no buffer, nothing
    read; what ``plan --compile`` traces 13B-wide graphs with. ``head``: ``causal`` or
    ``classifier`` (``num_labels=1``, as :func:`load_sequence_classifier`)."""
    if head == "classifier":
        config.num_labels = 1
    cls = LlamaForCausalLM if head == "causal" else LlamaForSequenceClassification

    def place(shape, dtype, spec, requires_grad):
        param = torch.nn.Parameter(capture.placeholder(shape, dtype, spec), requires_grad=requires_grad)
        return capture.adopt(param, capture.sharding_text(spec, len(shape)))

    return _build_sharded(cls, config, mesh, cfg, None, place)


def enable_gradient_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Recompute decoder layers in backward with torch_xla's checkpoint.

    ``gradient_checkpointing_enable()`` (torch.utils.checkpoint) crashes on XLA tensors; the
    working route is HF's private hook with torch_xla's reentrant checkpoint, and
    ``use_cache=False`` (else k/v gradients come out silently zero): the forward helpers
    here always pass it.
    """
    model._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=runtime.activation_checkpoint_fn()
    )


def _load(
    model_cls, config: LlamaConfig, model_dir: str | None, mesh: runtime.MeshInfo,
    cfg: ModelConfig, defaults: dict[str, torch.Tensor],
) -> torch.nn.Module:
    """Build ``model_cls`` sharded, each parameter from the checkpoint in ``model_dir`` (or
    the seeded random ``tiny`` init when None), falling back to ``defaults`` for names the
    checkpoint lacks (a fresh score head)."""
    if model_dir is None:
        tensors = {**_init_cpu_tensors(LlamaForCausalLM, config, cfg.tiny.seed), **defaults}
        return _build_sharded(model_cls, config, mesh, cfg, tensors.__getitem__)
    reader = _TensorReader(weight_index(model_dir))

    def get(name: str) -> torch.Tensor:
        if name in reader:
            return reader.get(name)
        if name in defaults:
            return defaults[name]
        raise KeyError(f"{model_dir!r}: checkpoint has no tensor {name!r}")

    try:
        return _build_sharded(model_cls, config, mesh, cfg, get)
    finally:
        reader.close()


def load_causal_lm(
    cfg: ModelConfig, mesh: runtime.MeshInfo, *, pad_token_id: int | None = 0
) -> LlamaForCausalLM:
    """``LlamaForCausalLM`` from ``cfg.name_or_path``, sharded on ``mesh``."""
    config, model_dir = _model_config(cfg, pad_token_id)
    if model_dir is not None:
        names = weight_index(model_dir)
        if "score.weight" in names and "lm_head.weight" not in names \
                and not getattr(config, "tie_word_embeddings", False):
            raise ModelRoleError(
                f"{cfg.name_or_path}: a sequence classifier (reward/value model: score head, no "
                "lm_head) cannot be a policy; give the policy a causal LM checkpoint "
                "(LlamaForCausalLM, e.g. a DPO or SFT model's directory)")
    # A tied LM head is not a parameter of its own (named_parameters() skips it).
    return _load(LlamaForCausalLM, config, model_dir, mesh, cfg, {})


def load_sequence_classifier(
    cfg: ModelConfig, mesh: runtime.MeshInfo, *, pad_token_id: int | None = 0, head_seed: int = 0,
    role: str = "value model", require_trained_head: bool = False,
) -> LlamaForSequenceClassification:
    """``LlamaForSequenceClassification`` (``num_labels=1``, bias-free ``score``), sharded.

    From a reward-model checkpoint its ``score`` is kept; from a causal-LM checkpoint (or
    ``tiny``) the LM head is dropped and ``score`` is drawn from normal(0, initializer_range)
    with ``head_seed`` (logged, naming ``role``). ``require_trained_head``: refuse a checkpoint
    without a score head (a frozen reward model with an untrained head scores noise).
    """
    config, model_dir = _model_config(cfg, pad_token_id)
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    if config.pad_token_id is None or config.pad_token_id == config.eos_token_id:
        raise ModelRoleError(
            f"reward/value models need pad_token_id set and different from eos "
            f"({config.eos_token_id}); got {config.pad_token_id}"
        )
    gen = torch.Generator().manual_seed(head_seed)
    fresh_head = torch.randn((1, config.hidden_size), generator=gen) * config.initializer_range
    # 'tiny' is the seeded random model of tests and benchmarks: random by request.
    if require_trained_head and model_dir is not None and "score.weight" not in weight_index(model_dir):
        raise ModelRoleError(
            f"{cfg.name_or_path}: the {role} needs a trained score head (score.weight), and this "
            "checkpoint has none (it is a causal LM): its rewards would be noise; train one "
            "with python -m torchxla_rlhf.reward (model.name_or_path=this model) and give its "
            "final/ directory here")
    if model_dir is not None and "score.weight" not in weight_index(model_dir):
        logger.warning("%s: the %s starts from a causal LM: its score head is new, drawn from "
                       "normal(0, %g)", cfg.name_or_path, role, config.initializer_range)
    return _load(LlamaForSequenceClassification, config, model_dir, mesh, cfg,
                 {"score.weight": fresh_head})


def freeze(
    model: torch.nn.Module, cfg: ModelConfig | None = None, mesh: runtime.MeshInfo | None = None
) -> torch.nn.Module:
    """A frozen model: no gradients (so no optimizer state), eval mode.

    With ``cfg`` and ``mesh``, the weights of its ``nn.Linear`` layers (all but the
    embeddings and norms, >97 % of a Llama's bytes) are stored in ``frozen_dtype(cfg)``: under
    bf16 autocast a matmul casts its fp32 weight to bf16 anyway, so the outputs are the same
    bits while the frozen model takes half the memory. Embeddings and norms stay as loaded
    (their outputs feed the residual stream, which autocast leaves in fp32). Each cast weight
    is re-annotated with its partition spec.

    Each decoder layer's weights wait for its input (``runtime.gather_weights_per_layer``):
    a frozen forward is not checkpointed, and without that XLA:CPU gathers every layer's
    FSDP weights at the top of the step's graph (the same bits either way).
    """
    model.requires_grad_(False)
    model.eval()
    runtime.gather_weights_per_layer(getattr(model, model.base_model_prefix).layers)
    if cfg is not None and mesh is not None:
        dtype = DTYPES[frozen_dtype(cfg)]
        tied = model.get_input_embeddings().weight  # a tied LM head stays with the embedding
        for module in model.modules():
            if (isinstance(module, torch.nn.Linear) and module.weight.dtype != dtype
                    and module.weight is not tied):
                module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        sharding.shard_model(model, mesh)
    return model


# ----------------------------------------------------------------------------------------
# Forward helpers
# ----------------------------------------------------------------------------------------


def causal_lm_logits(
    model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Logits ``[B, L, V]`` with explicit position ids and a 2-D mask (no hidden syncs)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.logits


def sequence_classifier_scores(
    model: LlamaForSequenceClassification,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    every_position: bool = False,
) -> torch.Tensor:
    """Scores of a ``num_labels=1`` sequence classifier.

    Returns ``[B]``, the head's output at the last real token (``argmax`` of the position
    ids, docs/reward.md), or ``[B, L]`` at every position (the value model) when
    ``every_position``. Computed here rather than by HF's pooling (rightmost non-pad id),
    which agrees for right-padded inputs but not for ``[left-padded prompt | response]``.
    """
    hidden = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    per_position = model.score(hidden).squeeze(-1).float()  # [B, L]
    if every_position:
        return per_position
    # The same token the EOS rule (rl.apply_eos_penalty) inspects.
    last = last_token_index(attention_mask)[:, None]  # [B, 1]
    return per_position.gather(1, last).squeeze(1)


# ----------------------------------------------------------------------------------------
# Identity of a model's weights (cache keys)
# ----------------------------------------------------------------------------------------

_SAMPLES_PER_FILE = 16
_SAMPLE_BYTES = 1 << 16


def weights_fingerprint(cfg: ModelConfig) -> str:
    """A digest that changes whenever the weights ``cfg`` loads change.

    ``tiny``: its shape and seed. A directory: for each weight file, its name, size, the first
    64 KiB (the safetensors header: names, dtypes, shapes) and 16 evenly spaced 64 KiB samples.
    Reading all 26 GB of a 13B checkpoint on every host for a cache key would cost a minute;
    training changes every tensor, so samples tell two checkpoints apart for ~1 MiB per file.
    """
    import hashlib

    h = hashlib.sha256()
    if cfg.name_or_path == "tiny":
        h.update(repr(sorted(dataclasses.asdict(cfg.tiny).items())).encode())
        return h.hexdigest()
    model_dir = resolve_model_dir(cfg.name_or_path, cfg.revision)
    files = sorted(n for n in os.listdir(model_dir) if n.endswith((".safetensors", ".bin")))
    for name in files:
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            offsets = {0} | {size * k // _SAMPLES_PER_FILE for k in range(1, _SAMPLES_PER_FILE)}
            for offset in sorted(offsets):
                f.seek(offset)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()
