"""Tokenizers: the Tulu chat template, a tiny byte-level LLaMA-like tokenizer, and loading.

The tiny tokenizer stands in for LLaMA-2's in tests and tiny configs. It keeps LLaMA's special
ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2), so every place that hard-codes "pad 0, bos 1, eos 2"
(the seed's ``--tokenizer_pad_token_id=0``) behaves the same on both, and maps each of the 256
bytes to one token (ids 3..258): any unicode text round-trips through encode/decode, and one
character of ASCII text is one token, which makes hand-worked test expectations easy.

Nothing here touches torch_xla; this module is safe to import anywhere.
"""

from __future__ import annotations

import os
import re
from typing import Any

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

__all__ = [
    "TULU_CHAT_TEMPLATE",
    "TINY_VOCAB_SIZE",
    "build_tiny_tokenizer",
    "load_tokenizer",
]

# Tulu 2 chat format as a jinja template (the same text as `torchxla_rlhf.data.chat.format_messages`
# produces before the BOS, for stripped contents): open-instruct's "tulu" template. The last
# assistant turn carries no trailing newline, matching the training format, whose whole text is
# `.strip()`-ed. No BOS in the template: encoding the rendered text with add_special_tokens=True
# adds it (`add_bos_token` behaviour), which is what open-instruct's evaluation relies on.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
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


def _looks_like_local_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id ("name" or "owner/name"), so it must be a path."""
    return name.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(name)


def load_tokenizer(
    name_or_path: str, pad_token_id: int | None = 0, token: str | None = None
) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer as the paper's runs set it up.

    Args:
      name_or_path: ``"tiny"`` for :func:`build_tiny_tokenizer`, a local directory, or a hub id
        (e.g. ``allenai/tulu-2-13b``). Never ``trust_remote_code``.
      pad_token_id: the pad id to force (the seed's ``--tokenizer_pad_token_id=0``: LLaMA-2 has
        no pad token and ``<unk>`` = 0 serves); ``None`` keeps the tokenizer's own.
      token: hub token; defaults to ``$HF_TOKEN``. Never logged.

    The Tulu chat template is installed when the tokenizer has none.

    Raises:
      FileNotFoundError: a path that does not exist and cannot be a hub id.
      OSError: the hub/local load failed (the message names ``name_or_path``).
      ValueError: ``pad_token_id`` outside the vocabulary.
    """
    if name_or_path == "tiny":
        tok = build_tiny_tokenizer()
    else:
        expanded = os.path.expanduser(name_or_path)
        if not os.path.exists(expanded) and _looks_like_local_path(name_or_path):
            raise FileNotFoundError(
                f"tokenizer: '{name_or_path}' is not an existing local path and not a hub id "
                "(expected 'tiny', a directory with tokenizer files, or 'owner/name')"
            )
        try:
            tok = transformers.AutoTokenizer.from_pretrained(
                expanded if os.path.exists(expanded) else name_or_path,
                token=token or os.environ.get("HF_TOKEN"),
                trust_remote_code=False,
            )
        except OSError as e:  # the message from transformers never contains the token
            raise OSError(f"tokenizer: could not load '{name_or_path}': {e}") from e
    if pad_token_id is not None:
        if not 0 <= pad_token_id < len(tok):
            raise ValueError(
                f"tokenizer_pad_token_id={pad_token_id} is outside the vocabulary of "
                f"'{name_or_path}' (size {len(tok)})"
            )
        tok.pad_token = tok.convert_ids_to_tokens(pad_token_id)
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = TULU_CHAT_TEMPLATE
    return tok


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
