"""A model's shape, read from its ``config.json`` and nothing else.

:func:`read_shape` is the one reader: ``tiny`` (the config's own numbers), a local directory,
a ``gs://`` (any fsspec) directory, or a hub name (``revision``, ``HF_TOKEN``; the hub's cache
answers offline). A name is never read for a size: ``tulu-2-13b`` is whatever its
``config.json`` says. For ``plan``, when the hub cannot answer (offline, unreachable), a hub
model that a shipped config names is read from the copy of its ``config.json`` shipped in
``model_configs/`` (``ORG--NAME.json``), and the shape says so in :attr:`Shape.note`. :meth:`Shape.params` lists the parameters a transformers Llama of that
shape has (names and shapes, as ``named_parameters`` gives them), which is what the sharding
checks and the memory plan count. No torch, no transformers.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torchxla_rlhf.errors import UserError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of the dtypes a config may name (the one table the checks, the memory
plan and the start-up log use)."""

Head = Literal["causal", "classifier"]
"""``causal``: ``LlamaForCausalLM`` (the LM head); ``classifier``: ``LlamaForSequenceClassification``
with one label (the reward and value models' ``score`` head)."""


class ShapeError(UserError, ValueError):
    """A model whose shape cannot be read (no config.json, not a Llama, a key missing)."""


class NoSuchModel(ShapeError, FileNotFoundError):
    """A local model directory that does not exist (yet)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def frozen_dtype(model_cfg: Any) -> str:
    """The dtype a frozen copy of ``model_cfg``'s matmul weights is stored in: the compute dtype
    only where autocast is on (else the forward's activations stay in param_dtype and a bf16
    weight would not match them); ``frozen_dtype: param`` keeps param_dtype."""
    autocast_on = (model_cfg.compute_dtype != model_cfg.param_dtype
                   and model_cfg.compute_dtype != "float32")
    if model_cfg.frozen_dtype == "compute" and autocast_on:
        return model_cfg.compute_dtype
    return model_cfg.param_dtype


@dataclass(frozen=True)
class Shape:
    """What the pre-flight needs of a Llama: its sizes (``config.json``'s numbers)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 0
    """``hidden // heads`` unless config.json says otherwise."""
    tie: bool = False
    """``tie_word_embeddings``: the LM head is the embedding matrix."""
    dtype: str | None = None
    """The dtype config.json says the weights were saved in (informational)."""
    max_positions: int | None = None
    """``max_position_embeddings``."""
    attention_bias: bool = False
    mlp_bias: bool = False
    source: str = field(default="", compare=False)
    """Where it was read (for messages)."""
    note: str = field(default="", compare=False)
    """How it was read when that is not the model's own file (``plan`` prints it)."""

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def layer_linear(self) -> int:
        """Matmul weights of one decoder layer (q, k, v, o, gate, up, down)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    def linear_params(self, lm_head: bool) -> int:
        """Matmul weights: layers plus the LM head (none when tied: it is the embedding) or
        the 1-row score head."""
        head = (0 if self.tie else self.vocab) if lm_head else 1
        return self.layers * self.layer_linear + head * self.hidden

    def other_params(self) -> int:
        """Embeddings and norms."""
        return self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    def params(self, head: Head) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Names and shapes of the parameters of a transformers Llama of this shape with
        ``head``, in ``named_parameters()`` order (a tied LM head is not listed twice)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            attn = [("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))]
            for name, shape in attn:
                out.append((f"{p}self_attn.{name}.weight", shape))
                if self.attention_bias:
                    out.append((f"{p}self_attn.{name}.bias", (shape[0],)))
            for name, shape in [("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))]:
                out.append((f"{p}mlp.{name}.weight", shape))
                if self.mlp_bias:
                    out.append((f"{p}mlp.{name}.bias", (shape[0],)))
            out += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
        out.append(("model.norm.weight", (h,)))
        if head == "causal":
            if not self.tie:
                out.append(("lm_head.weight", (self.vocab, h)))
        else:
            out.append(("score.weight", (1, h)))
        return tuple(out)


def shape_from_config(c: dict, where: str) -> Shape:
    """A :class:`Shape` from a config.json dict; ``where`` names it in errors. Keys transformers'
    ``LlamaConfig`` fills when absent are filled the same way (kv heads = heads, untied); the
    sizes themselves must be there."""
    if c.get("model_type", "llama") != "llama":
        raise ShapeError(f"{where}: a {c.get('model_type')!r} model; torchxla_rlhf trains Llama models")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(c.get(k), int)]
    if missing:
        raise ShapeError(f"{where}: config.json has no integer {', '.join(missing)}")
    heads = c["num_attention_heads"]
    return Shape(c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                 heads, c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or 0,
                 tie=bool(c.get("tie_word_embeddings", False)),
                 dtype=c.get("dtype") or c.get("torch_dtype"),
                 max_positions=c.get("max_position_embeddings"),
                 attention_bias=bool(c.get("attention_bias", False)),
                 mlp_bias=bool(c.get("mlp_bias", False)), source=where)


def read_shape(model_cfg: Any, key: str = "model", timeout_s: float = 20.0,
               shipped_fallback: bool = False) -> Shape:
    """The shape of ``ModelConfig`` ``model_cfg`` (at config key ``key``), from its config.json:
    ``tiny``; a local directory; a ``gs://`` (fsspec) directory; a hub name (``revision``,
    ``HF_TOKEN``; the local HF cache first). A remote read gives up after ``timeout_s``.
    ``shipped_fallback`` (``plan``, which loads no weights): a hub model the hub cannot answer
    for is read from its shipped config.json, if there is one; a run's start-up and
    ``--check`` leave it off, since the run needs the hub for the weights anyway."""
    name = model_cfg.name_or_path
    where = f"{key}.name_or_path={name!r}"
    if name == "tiny":
        t = model_cfg.tiny
        return Shape(t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                     t.num_attention_heads, t.num_key_value_heads,
                     max_positions=t.max_position_embeddings, source=where)
    if "://" in name:
        url = name.rstrip("/") + "/config.json"
        return shape_from_config(_remote(lambda: _read_url(url, where), timeout_s, where), where)
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        if not os.path.isfile(path):
            raise ShapeError(f"{where}: the directory has no config.json")
        return shape_from_config(_read_json(path, where), where)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise NoSuchModel(f"{where}: no such model directory", key)
    return _hub_shape(name, model_cfg.revision, where, timeout_s, shipped_fallback)


SHIPPED_MODEL_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
"""``ORG--NAME.json``: the ``config.json`` of the hub models the shipped configs name."""

_hub_answers: dict[tuple[str, str | None], Any] = {}
"""(name, revision) -> config dict or the RemoteError the hub gave: one wait per model per
process (the policy and its reference are the same hub model)."""


def shipped_model_config(name: str) -> str | None:
    """The path of the shipped copy of hub model ``name``'s config.json, or None."""
    path = os.path.join(SHIPPED_MODEL_CONFIGS, name.replace("/", "--") + ".json")
    return path if "/" in name and os.path.isfile(path) else None


def _hub_shape(name: str, revision: str | None, where: str, timeout_s: float,
               shipped_fallback: bool) -> Shape:
    """A hub model's shape: the hub (its cache first); when it cannot answer, the shipped copy
    of its config.json (the default revision's only) with a note saying so."""
    from torchxla_rlhf.errors import RemoteError

    key = (name, revision)
    if key not in _hub_answers:
        try:
            _hub_answers[key] = _read_hub(name, revision, where, timeout_s)
        except RemoteError as e:
            _hub_answers[key] = e
    answer = _hub_answers[key]
    if not isinstance(answer, RemoteError):
        return shape_from_config(answer, where)
    shipped = shipped_model_config(name) if shipped_fallback and revision in (None, "main") else None
    if shipped is None:
        raise answer
    shape = shape_from_config(_read_json(shipped, where), where)
    why = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
    return replace(shape, note=f"{name}: shape from the shipped copy of its config.json; "
                               f"the hub was not reached{why}")


def _read_json(path: str, where: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ShapeError(f"{where}: cannot read {path} ({e})") from None


def _read_url(url: str, where: str) -> dict:
    import fsspec

    from torchxla_rlhf.errors import RemoteError

    try:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ShapeError(f"{where}: {url} does not exist") from None
    except ValueError as e:
        raise ShapeError(f"{where}: {url} is not JSON ({e})") from None
    except (OSError, ImportError) as e:
        raise RemoteError(f"{where}: cannot read {url} ({type(e).__name__}: {e})") from None


def _remote(fn, timeout_s: float, where: str):
    """``fn()`` in a daemon thread, given up after ``timeout_s`` (the hub client and gcsfs
    retry an unreachable host for a minute; a daemon thread does not hold the exit)."""
    from torchxla_rlhf.errors import RemoteError

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"read {where}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RemoteError(f"{where}: no answer within {timeout_s:g} s (remote_timeout_s); "
                          "check the network and credentials")
    if "error" in out:
        raise out["error"]
    return out["value"]


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is on, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _read_hub(name: str, revision: str | None, where: str, timeout_s: float) -> dict:
    from huggingface_hub import hf_hub_download

    from torchxla_rlhf.remote import hub_error

    def download(local_only: bool) -> str:
        try:
            return hf_hub_download(name, "config.json", revision=revision, local_files_only=local_only,
                                   token=os.environ.get("HF_TOKEN") or None)
        except Exception as e:  # noqa: BLE001 - every hub failure becomes one line naming the model
            raise hub_error(name, e) from None

    try:
        path = download(local_only=True)
    except UserError:
        if hub_offline():
            raise  # HF_HUB_OFFLINE: the cache was the only answer; no wait for a network call
        path = _remote(lambda: download(local_only=False), timeout_s, where)
    return _read_json(path, where)
