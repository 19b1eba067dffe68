"""Tokenizers: the Tulu chat template, a tiny byte-level LLaMA-like tokenizer, and loading.

LLaMA-family SentencePiece tokenizers are loaded with the LEGACY SentencePiece behaviour by
default (see :func:`set_sentencepiece_legacy`): the dummy-prefix ``▁`` starts every stretch of
text between special tokens, so ``<s><|user|>`` is ``[1, 529 ▁<, ...]`` and ``</s>\n<|user|>``
is ``[2, 29871 ▁, 13, ...]``. That is what the paper's JAX code computed and what Tulu 2 was
fine-tuned on; transformers 5 defaults to the non-legacy behaviour (``▁`` only at the start of
the whole text), which gives other ids and shifts multi-turn loss masks by one.

The tiny tokenizer stands in for LLaMA-2's in tests and tiny configs. It keeps LLaMA's special
ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2), so every place that hard-codes "pad 0, bos 1, eos 2"
(EasyLM's ``--tokenizer_pad_token_id=0``) behaves the same on both, and maps each of the 256
bytes to one token (ids 3..258): any unicode text round-trips through encode/decode, and one
character of ASCII text is one token, which makes hand-worked test expectations easy.

Nothing here touches torch_xla; this module is safe to import anywhere.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from torchxla_rlhf.configs.loader import ConfigError

__all__ = [
    "TULU_CHAT_TEMPLATE",
    "TINY_VOCAB_SIZE",
    "build_tiny_tokenizer",
    "is_sentencepiece_bpe",
    "load_tokenizer",
    "save_tokenizer_files",
    "sentencepiece_backend_spec",
    "with_sentencepiece_legacy",
]

# Tulu 2 chat format as a jinja template: renders exactly the text the trainers tokenize
# (`torchxla_rlhf.data.chat`), BOS included, so `apply_chat_template(messages, tokenize=True)`
# (which encodes with add_special_tokens=False, as vLLM's chat path does) gives the training ids:
#   - without add_generation_prompt: `format_messages` (contents stripped, whole text stripped);
#   - with it: `format_prompt` with BOS (every turn keeps its "\n", then "<|assistant|>\n").
# The text is built in a namespace variable so the whole-text strip can be applied at the end.
# Render with tokenize=False and encode with add_special_tokens=True and you get two BOS, as
# with every HF template that writes bos_token.
TULU_CHAT_TEMPLATE = (
    "{%- set ns = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.text = ns.text + '<|system|>\n' + (message['content'] | trim) + '\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set ns.text = ns.text + '<|user|>\n' + (message['content'] | trim) + '\n' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set ns.text = ns.text + '<|assistant|>\n' + (message['content'] | trim) + eos_token + '\n' -%}"
    "{%- else -%}"
    "{{- raise_exception('Tulu chat format: unknown role ' + message['role'] + "
    "' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- bos_token + ns.text + '<|assistant|>\n' -}}"
    "{%- else -%}"
    "{{- bos_token + (ns.text | trim) -}}"
    "{%- endif -%}"
)

# <unk>, <s>, </s> then the 256 bytes.
TINY_VOCAB_SIZE = 3 + 256
_TINY_SPECIALS = ("<unk>", "<s>", "</s>")

# A hub id is "name" or "owner/name" made of [A-Za-z0-9_.-]; anything else (absolute/relative
# paths, "~", several slashes) can only be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (the ByteLevel alphabet).

    Printable latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + k).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer with LLaMA's special ids, built locally (no download).

    Vocabulary (259 entries; a model may have a larger embedding):
      ``<unk>`` = 0 (also the pad token, as LLaMA-2 with ``tokenizer_pad_token_id=0``),
      ``<s>`` = 1 (bos), ``</s>`` = 2 (eos), byte ``b`` = 3 + b.

    A BPE model with the ByteLevel alphabet and no merges, so every byte is exactly one token
    and ``decode(encode(text)) == text`` for any unicode text. Special tokens written in the
    text (``"<s>"``, ``"</s>"``) are matched as single tokens, like LLaMA's, which is how the
    Tulu format puts eos after each assistant turn. The post-processor prepends ``<s>`` when
    ``add_special_tokens=True`` (``add_bos_token``), and survives ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained`` because it lives in ``tokenizer.json``. Offsets mapping is
    supported (fast tokenizer); a multi-byte character's tokens all carry that character's span.
    """
    byte_chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    for b in range(256):
        vocab[byte_chars[b]] = len(_TINY_SPECIALS) + b
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # No regex split and no prefix space: the text is cut into bytes as is.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in _TINY_SPECIALS]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        chat_template=TULU_CHAT_TEMPLATE,
    )
    return tok


# ---------------------------------------------------------------------------------------------
# LLaMA-family SentencePiece tokenizers: the legacy / non-legacy dummy prefix.
#
# SentencePiece puts a dummy-prefix "▁" before the text it encodes. The tokenizers LLaMA-2 and
# Tulu 2 were trained with (and the paper's JAX code, transformers 4's LlamaTokenizerFast from the
# hub's tokenizer.json) cut the text at special tokens first and give EVERY stretch its own
# prefix ("legacy"): normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, special
# tokens matched on the raw text. transformers 5 defaults to "non-legacy": a Metaspace
# pre-tokenizer that prefixes only the start of the whole text. The two differ after every
# special token: `<s><|user|>` is [1, 529 ▁<] legacy, [1, 29966 <] non-legacy; `</s>\n` is
# [2, 29871 ▁, 13] legacy, [2, 13] non-legacy (one token shorter per turn, shifting loss masks).

_SP_SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol
_LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": _SP_SPACE},
        {"type": "Replace", "pattern": {"String": " "}, "content": _SP_SPACE},
    ],
}
_NON_LEGACY_PRE_TOKENIZER = {"type": "Metaspace", "replacement": _SP_SPACE, "prepend_scheme": "first", "split": False}
# LLaMA's decoder (the same in both behaviours): "▁" -> " ", <0xNN> pieces -> bytes, and the
# dummy prefix of the first piece dropped.
_SP_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": _SP_SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ],
}
# SentencePiece piece types (sentencepiece_model.proto): 2 unknown, 3 control, 4 user-defined.
_SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 2, 3, 4
_SP_MODEL_BPE = 2


def _flatten(component: dict | None) -> list[dict]:
    """The members of a tokenizers normalizer/pre-tokenizer spec (a Sequence's list, or itself)."""
    if not component:
        return []
    for key in ("normalizers", "pretokenizers"):
        if component.get("type") == "Sequence" and key in component:
            return [m for c in component[key] for m in _flatten(c)]
    return [component]


def _is_sp_space_normalizer(n: dict) -> bool:
    """A normalizer step SentencePiece's escaping produces: Prepend("▁") or Replace(" ", "▁")."""
    if n.get("type") == "Prepend":
        return n.get("prepend") == _SP_SPACE
    return n.get("type") == "Replace" and n.get("pattern") == {"String": " "} and n.get("content") == _SP_SPACE


def is_sentencepiece_bpe(spec: dict) -> bool:
    """True for a ``tokenizer.json`` spec of a LLaMA-family SentencePiece tokenizer.

    That is: a byte-fallback BPE whose only text processing is SentencePiece's "▁" escaping,
    either as the legacy normalizer or as a Metaspace pre-tokenizer (LLaMA-1/2, Tulu 2, Mistral).
    Anything else (byte-level BPE like LLaMA-3, Unigram, normalizers with other steps) is left
    alone, because the legacy switch would mean something else, or nothing, there.
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    normalizers = _flatten(spec.get("normalizer"))
    pre = _flatten(spec.get("pre_tokenizer"))
    if not all(_is_sp_space_normalizer(n) for n in normalizers):
        return False
    if not all(p.get("type") == "Metaspace" and p.get("replacement") == _SP_SPACE for p in pre):
        return False
    return bool(normalizers) or bool(pre)


def sentencepiece_backend_spec(spec: dict, legacy: bool) -> dict:
    """A copy of a SentencePiece-BPE ``tokenizer.json`` spec with the chosen dummy-prefix rule.

    ``legacy=True``: the normalizer transformers 4 wrote for LLaMA (Prepend "▁", spaces to "▁"),
    no pre-tokenizer, and every added token matched on the raw text (``normalized: false``), so
    the text between two special tokens is encoded as SentencePiece encodes a fresh string.
    ``legacy=False``: transformers 5's Metaspace, "▁" only at the start of the whole text.
    Vocabulary, merges, added tokens, post-processor and decoder are kept.
    """
    out = dict(spec)  # shallow: the (large) model part is shared, never modified
    if legacy:
        out["normalizer"] = copy.deepcopy(_LEGACY_NORMALIZER)
        out["pre_tokenizer"] = None
        out["added_tokens"] = [{**added, "normalized": False} for added in spec.get("added_tokens", [])]
    else:
        out["normalizer"] = None
        out["pre_tokenizer"] = dict(_NON_LEGACY_PRE_TOKENIZER)
    return out


def _sentencepiece_proto(path: str) -> Any:
    """The parsed SentencePiece ``ModelProto`` of ``path`` (needs ``protobuf`` only)."""
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    except ImportError as e:
        raise ImportError(
            f"tokenizer: reading the SentencePiece model '{path}' needs the 'protobuf' package "
            "(pip install protobuf), or give a directory with a converted tokenizer.json"
        ) from e
    proto = model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _spec_from_sentencepiece_proto(proto: Any, legacy: bool) -> dict:
    """The ``tokenizer.json`` spec transformers 4 built from a LLaMA ``tokenizer.model``.

    Why not transformers 5's own conversion: it regenerates the BPE merges ranked by piece id
    instead of by piece score, which changes the ids of runs of spaces (``"a  hi"`` gives
    ``[263, 259, 2918]`` instead of SentencePiece's ``[263, 29871, 7251]``), and it drops
    ``add_bos_token``. Here the merges are ranked by the score of the merged piece, as
    SentencePiece's BPE applies them and as the hub's LLaMA-2 ``tokenizer.json`` has them.
    """
    from transformers.tokenization_utils_base import generate_merges

    scores = {p.piece: p.score for p in proto.pieces}
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    added = [
        {"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": p.type != _SP_USER_DEFINED}
        for i, p in enumerate(proto.pieces)
        if p.type in (_SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": _SP_DECODER,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": proto.pieces[proto.trainer_spec.unk_id].piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in generate_merges(vocab, scores)],
        },
    }
    return sentencepiece_backend_spec(spec, legacy)


def _bare_sentencepiece_bpe(directory: str) -> Any | None:
    """The proto of ``directory/tokenizer.model`` when the directory has no ``tokenizer.json``
    and the model is a byte-fallback BPE (LLaMA's kind); None otherwise."""
    model_file = os.path.join(directory, "tokenizer.model")
    if not os.path.isdir(directory) or os.path.exists(os.path.join(directory, "tokenizer.json")):
        return None
    if not os.path.isfile(model_file):
        return None
    proto = _sentencepiece_proto(model_file)
    if proto.trainer_spec.model_type != _SP_MODEL_BPE or not proto.trainer_spec.byte_fallback:
        return None
    return proto


def _wrap_backend(
    backend: Tokenizer, name_or_path: str, bos_token: str | None, **settings: Any
) -> transformers.PreTrainedTokenizerFast:
    """``backend`` as a plain ``PreTrainedTokenizerFast`` that adds BOS with
    ``add_special_tokens=True``; ``settings``: its other special tokens, ``add_eos_token``,
    padding side, length limit, chat template.

    A plain fast tokenizer, not ``LlamaTokenizer``: transformers 5 rebuilds a LlamaTokenizer's
    pre-tokenizer from its own defaults on every load, so the saved behaviour would not survive
    ``AutoTokenizer.from_pretrained``; a plain one loads ``tokenizer.json`` verbatim (in
    transformers 4 and 5 alike). BOS is always added, as every LLaMA-2-family tokenizer does
    (``add_bos_token`` defaults to true there; open-instruct and RewardBench rely on it);
    transformers 5 loses that flag when it converts a bare ``tokenizer.model``.
    """
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=name_or_path,
        bos_token=bos_token,
        add_bos_token=bos_token is not None,
        clean_up_tokenization_spaces=False,
        **settings,
    )


def _settings_of(tok: Any) -> dict[str, Any]:
    """The settings of a loaded tokenizer that :func:`_wrap_backend` carries over (EOS is
    added only where ``tok`` added it)."""
    eos_id = tok.eos_token_id
    probe = tok.encode("a", add_special_tokens=True)
    return dict(
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
        pad_token=tok.pad_token,
        add_eos_token=bool(probe) and eos_id is not None and probe[-1] == eos_id,
        padding_side=tok.padding_side,
        model_max_length=tok.model_max_length,
        chat_template=getattr(tok, "chat_template", None),
    )


def _rule_spec(backend: Tokenizer) -> dict:
    """The parts of ``backend``'s spec that :func:`is_sentencepiece_bpe` and
    :func:`sentencepiece_backend_spec` look at, read without serializing the vocabulary."""
    model = backend.model
    return {
        "model": {"type": type(model).__name__, "byte_fallback": bool(getattr(model, "byte_fallback", False))},
        "normalizer": json.loads(backend.normalizer.__getstate__()) if backend.normalizer else None,
        "pre_tokenizer": json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer else None,
        "added_tokens": [{"normalized": t.normalized} for t in backend.get_added_tokens_decoder().values()],
    }


def with_sentencepiece_legacy(
    tok: transformers.PreTrainedTokenizerBase, legacy: bool
) -> transformers.PreTrainedTokenizerBase:
    """``tok`` with the chosen dummy-prefix rule when it is a LLaMA-family SentencePiece
    tokenizer (:func:`is_sentencepiece_bpe`); any other tokenizer is returned unchanged.

    Returns a plain ``PreTrainedTokenizerFast`` that adds BOS (see :func:`_wrap_backend`), so
    what the trainers tokenize with is what a checkpoint's ``tokenizer.json`` reproduces; one
    that already is such a tokenizer with the rule (a checkpoint of ours) is returned as is.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok
    rule = _rule_spec(backend)
    if not is_sentencepiece_bpe(rule):
        return tok
    adds_bos = tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id]
    if sentencepiece_backend_spec(rule, legacy) == rule and type(tok) is transformers.PreTrainedTokenizerFast and adds_bos:
        return tok
    spec = sentencepiece_backend_spec(json.loads(backend.to_str()), legacy)
    return _wrap_backend(Tokenizer.from_str(json.dumps(spec)), tok.name_or_path, tok.bos_token, **_settings_of(tok))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
"""Files one of which a local tokenizer directory holds (fast, SentencePiece, BPE/WordPiece)."""


def _looks_like_local_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id ("name" or "owner/name"), so it must be a path."""
    return name.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(name)


def _from_pretrained(name_or_path: str, token: str | None, sentencepiece_legacy: bool) -> transformers.PreTrainedTokenizerBase:
    """``AutoTokenizer`` on a local directory or hub id (then :func:`with_sentencepiece_legacy`),
    or the transformers-4 conversion of a directory that holds only a LLaMA ``tokenizer.model``."""
    expanded = os.path.expanduser(name_or_path)
    if not os.path.exists(expanded) and _looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"tokenizer: '{name_or_path}' is not an existing local path and not a hub id "
            "(expected 'tiny', a directory with tokenizer files, or 'owner/name')"
        )
    if os.path.isdir(expanded) and not any(os.path.exists(os.path.join(expanded, f))
                                           for f in TOKENIZER_FILES):
        present = sorted(os.listdir(expanded))
        raise FileNotFoundError(
            f"tokenizer: directory '{name_or_path}' holds no tokenizer files (expected one of "
            f"{', '.join(TOKENIZER_FILES)}; it holds {', '.join(present[:6]) or 'nothing'}"
            f"{', ...' if len(present) > 6 else ''}); set tokenizer to the directory or hub id "
            "of the model's tokenizer")
    proto = _bare_sentencepiece_bpe(expanded)
    if proto is not None:
        piece = {i: p.piece for i, p in enumerate(proto.pieces)}
        ids = proto.trainer_spec
        backend = Tokenizer.from_str(json.dumps(_spec_from_sentencepiece_proto(proto, sentencepiece_legacy)))
        return _wrap_backend(
            backend, expanded, piece.get(ids.bos_id), eos_token=piece.get(ids.eos_id),
            unk_token=piece.get(ids.unk_id), padding_side="right",
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            expanded if os.path.exists(expanded) else name_or_path,
            token=token or os.environ.get("HF_TOKEN"),
            trust_remote_code=False,
        )
    except OSError as e:  # the message from transformers never contains the token
        raise OSError(f"tokenizer: could not load '{name_or_path}': {e}") from e
    except ValueError as e:  # files transformers cannot build a tokenizer from
        raise OSError(f"tokenizer: could not load '{name_or_path}': "
                      f"{' '.join(str(e).split())}") from e
    return with_sentencepiece_legacy(tok, sentencepiece_legacy)


def load_tokenizer(
    name_or_path: str, pad_token_id: int | None = 0, token: str | None = None, sentencepiece_legacy: bool = True
) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer as the paper's runs set it up.

    Args:
      name_or_path: ``"tiny"`` for :func:`build_tiny_tokenizer`, a local directory (a saved
        tokenizer, or just LLaMA's ``tokenizer.model``), or a hub id (e.g.
        ``allenai/tulu-2-13b``). Never ``trust_remote_code``.
      pad_token_id: the pad id to force (EasyLM's ``--tokenizer_pad_token_id=0``: LLaMA-2 has
        no pad token and ``<unk>`` = 0 serves); ``None`` keeps the tokenizer's own.
      token: hub token; defaults to ``$HF_TOKEN``. Never logged.
      sentencepiece_legacy: for LLaMA-family SentencePiece tokenizers, the dummy-prefix rule
        (module docstring): True (the paper's and Tulu 2's) whatever transformers' default,
        False for models trained with the non-legacy rule. Other tokenizers ignore it.

    The Tulu chat template is installed when the tokenizer has none.

    Raises:
      FileNotFoundError: a path that does not exist and cannot be a hub id.
      OSError: the hub/local load failed (the message names ``name_or_path``).
      ValueError: ``pad_token_id`` outside the vocabulary.
    """
    if name_or_path == "tiny":
        tok = build_tiny_tokenizer()
    else:
        tok = _from_pretrained(name_or_path, token, sentencepiece_legacy)
    if pad_token_id is not None:
        if not 0 <= pad_token_id < len(tok):
            raise ConfigError(
                f"tokenizer_pad_token_id={pad_token_id} is outside the vocabulary of "
                f"'{name_or_path}' (size {len(tok)})", key="tokenizer_pad_token_id")
        tok.pad_token = tok.convert_ids_to_tokens(pad_token_id)
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = TULU_CHAT_TEMPLATE
    return tok


# transformers 5 writes its fast tokenizer's class as "TokenizersBackend", a name transformers 4
# (vLLM and open-instruct releases pinned below 5) cannot resolve; "PreTrainedTokenizerFast" is
# the same class in 5 and loads tokenizer.json verbatim in both.
_PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer_files(tokenizer: Any, directory: str) -> None:
    """``tokenizer.save_pretrained(directory)``, made loadable by transformers 4 and 5 alike.

    The tokenizer class is written under its portable name, and the chat template is also put
    into ``tokenizer_config.json`` (transformers 4 before 4.50 does not read
    ``chat_template.jinja``). With those, plain ``AutoTokenizer.from_pretrained`` (what
    open-instruct, vLLM and RewardBench call) gives the training ids.
    """
    tokenizer.save_pretrained(directory)
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = _PORTABLE_CLASS.get(config.get("tokenizer_class"), config.get("tokenizer_class"))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        config.setdefault("chat_template", template)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def tokenizer_fingerprint(tok: Any) -> str:
    """A digest of everything that decides token ids: the fast tokenizer's full JSON (vocab,
    merges, normalizer, pre-tokenizer: the legacy/non-legacy SentencePiece behaviour included)
    and the special ids."""
    import hashlib

    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr((tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)).encode())
    return h.hexdigest()
