"""The Tulu chat format, loss masks and prompt extraction (docs/data.md).

Messages are ``{"role": "system" | "user" | "assistant", "content": str}``. A conversation
renders as::

    system:     "<|system|>\\n"    + content.strip() + "\\n"
    user:       "<|user|>\\n"      + content.strip() + "\\n"
    assistant:  "<|assistant|>\\n" + content.strip() + eos_text + "\\n"

concatenated, ``.strip()``-ed as a whole, then ``bos_text`` prepended, then tokenized with
``add_special_tokens=False`` (the bos/eos are in the text) and truncated to ``seq_length``.

Loss mask (preference data): 1 on the tokens of the LAST assistant message only, its content
and its eos; the ``<|assistant|>\\n`` header and everything before are 0. It is computed from
character offsets, not by tokenizing pieces separately: real BPE/sentencepiece tokenizers may
merge across the header/content boundary, so prefix token counts can be off by one. A token
whose span straddles the boundary counts as response.

Token ids with LLaMA-2's SentencePiece tokenizer depend on its dummy-prefix rule: loaded by
:func:`torchxla_rlhf.data.tokenizers.load_tokenizer` it has the legacy rule of the paper's JAX code
and Tulu 2 (a "▁" after every special token, so ``<s><|user|>`` starts ``[1, 529]`` and a
``</s>`` closing an earlier turn is followed by ``[29871, 13]``); the whole text is tokenized
in one call, as the JAX code did, so those ids and the masks match it token for token.

Every error is a :class:`DataError` whose message starts with the record's origin
(``file.jsonl:17`` or ``allenai/...[split]:17``) and names the field and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchxla_rlhf.errors import UserError

__all__ = [
    "ROLES",
    "DataError",
    "TokenizedSide",
    "format_messages",
    "format_messages_with_boundary",
    "format_prompt",
    "validate_messages",
    "prompt_messages_from_record",
    "tokenize_preference_side",
    "tokenize_preference_sides",
    "special_texts",
]

ROLES = ("system", "user", "assistant")
_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
ASSISTANT_HEADER = _HEADERS["assistant"]


class DataError(UserError, ValueError):
    """A bad record. The message names its origin (file:line or split:index), the field and
    what was expected."""


@dataclass(frozen=True)
class TokenizedSide:
    """One side (chosen or rejected) of a preference pair, unpadded.

    Attributes:
      input_ids: int64 ``[n]``, ``n <= seq_length`` (bos first, eos of the last turn last,
        unless truncated).
      loss_mask: int64 ``[n]``, 1 on the last assistant message's content tokens and its eos.
      truncated: the untruncated tokenization was longer than ``seq_length``.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    truncated: bool


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def validate_messages(messages: Any, origin: str, field: str) -> list[Mapping[str, Any]]:
    """Check ``messages`` is a non-empty list of ``{"role", "content": str}`` with known roles.

    Returns the list unchanged; raises :class:`DataError` naming ``origin`` and the exact field
    (e.g. ``chosen[2].role``).
    """
    if not isinstance(messages, list):
        raise DataError(f"{origin}: field '{field}' must be a list of messages, got {_type_name(messages)}")
    if not messages:
        raise DataError(f"{origin}: field '{field}' is an empty conversation (expected at least one message)")
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise DataError(
                f"{origin}: field '{where}' must be a message object "
                f'{{"role": ..., "content": ...}}, got {_type_name(m)}'
            )
        if "role" not in m:
            raise DataError(f"{origin}: field '{where}' has no 'role' (expected one of {', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise DataError(
                f"{origin}: field '{where}.role' is {m['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if "content" not in m:
            raise DataError(f"{origin}: field '{where}' has no 'content' (expected a string)")
        if not isinstance(m["content"], str):
            raise DataError(
                f"{origin}: field '{where}.content' must be a string, got {_type_name(m['content'])}"
            )
    return messages


def _render_turns(messages: Sequence[Mapping[str, Any]], eos_text: str, origin: str, field: str) -> tuple[str, int]:
    """Concatenate turns (not stripped). Returns (text, char offset of the last assistant
    message's content start, or -1 if there is no assistant turn)."""
    parts: list[str] = []
    pos = 0
    last_assistant_start = -1
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in _HEADERS:
            raise DataError(f"{origin}: field '{field}[{i}].role' is {role!r}; expected one of {', '.join(ROLES)}")
        content = m["content"].strip()
        header = _HEADERS[role]
        if role == "assistant":
            last_assistant_start = pos + len(header)
            piece = header + content + eos_text + "\n"
        else:
            piece = header + content + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), last_assistant_start


def format_messages_with_boundary(
    messages: Sequence[Mapping[str, Any]], bos_text: str, eos_text: str, origin: str = "messages", field: str = "messages"
) -> tuple[str, int]:
    """:func:`format_messages` plus the char offset in the returned text where the LAST
    assistant message's content starts (its eos when the content is empty); -1 if none.

    The whole text is only stripped of trailing whitespace in practice (it starts with a
    ``<|`` header), so the offset is ``len(bos_text)`` + its offset in the concatenation.
    """
    if len(messages) == 0:
        raise DataError(f"{origin}: field '{field}' is an empty conversation (expected at least one message)")
    raw, boundary = _render_turns(messages, eos_text, origin, field)
    # raw starts with a "<|...|>" header, so strip() only removes trailing whitespace and the
    # boundary offset just shifts by the bos text.
    if boundary >= 0:
        boundary += len(bos_text)
    return bos_text + raw.strip(), boundary


def format_messages(
    messages: Sequence[Mapping[str, Any]], bos_text: str, eos_text: str, origin: str = "messages"
) -> str:
    """Render a conversation in the Tulu format: turns concatenated, stripped, bos prepended.

    >>> format_messages([{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "Yo"}], "<s>", "</s>")
    '<s><|user|>\\nHi\\n<|assistant|>\\nYo</s>'
    """
    return format_messages_with_boundary(messages, bos_text, eos_text, origin)[0]


def format_prompt(
    messages: Sequence[Mapping[str, Any]],
    bos_text: str,
    eos_text: str,
    add_bos: bool = True,
    origin: str = "messages",
) -> str:
    """PPO prompt: the turns up to and including the LAST user turn, each rendered as in
    :func:`format_messages` (with its trailing newline, no strip), then ``"<|assistant|>\\n"``;
    ``bos_text`` in front when ``add_bos`` (as the JAX code of the paper's time; docs/data.md).

    >>> format_prompt([{"role": "user", "content": "Hi"}], "<s>", "</s>")
    '<s><|user|>\\nHi\\n<|assistant|>\\n'
    """
    validate_messages(list(messages), origin, "messages")
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    if last_user < 0:
        raise DataError(f"{origin}: field 'messages' has no user turn (a prompt needs at least one)")
    text, _ = _render_turns(messages[: last_user + 1], eos_text, origin, "messages")
    return (bos_text if add_bos else "") + text + ASSISTANT_HEADER


def _drop_trailing_assistant(messages: list, origin: str, field: str) -> list:
    validate_messages(messages, origin, field)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{origin}: field '{field}' has no user turn (a prompt needs at least one)")
    return messages


def prompt_messages_from_record(record: Mapping[str, Any], origin: str) -> list[Mapping[str, Any]]:
    """The prompt turns of a record in any Tulu 2.5 schema (docs/data.md).

    - ``messages`` or ``conversation``: the list, minus a trailing assistant turn;
    - ``chosen`` (and ``rejected``): ``chosen[:-1]`` (``chosen`` must end with an assistant turn);
    - ``instruction``: a string, becomes one user turn.

    The caller renders them with :func:`format_prompt`, which cuts after the last user turn.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{origin}: expected a JSON object, got {_type_name(record)}")
    for field in ("messages", "conversation"):
        if field in record:
            return _drop_trailing_assistant(record[field], origin, field)
    if "chosen" in record:
        chosen = validate_messages(record["chosen"], origin, "chosen")
        if chosen[-1]["role"] != "assistant":
            raise DataError(
                f"{origin}: field 'chosen' must end with an assistant turn, "
                f"but its last message has role {chosen[-1]['role']!r}"
            )
        if not any(m["role"] == "user" for m in chosen[:-1]):
            raise DataError(f"{origin}: field 'chosen' has no user turn before its answer (a prompt needs one)")
        return chosen[:-1]
    if "instruction" in record:
        instruction = record["instruction"]
        if not isinstance(instruction, str):
            raise DataError(f"{origin}: field 'instruction' must be a string, got {_type_name(instruction)}")
        return [{"role": "user", "content": instruction}]
    raise DataError(
        f"{origin}: missing field: expected one of 'messages', 'conversation', 'chosen', 'instruction' "
        f"(record has {sorted(record)})"
    )


def special_texts(tokenizer: Any) -> tuple[str, str]:
    """(bos_text, eos_text) of a tokenizer; bos may be empty, eos is required."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError("tokenizer has no eos_token; the Tulu format needs one after each assistant turn")
    return getattr(tokenizer, "bos_token", None) or "", eos


def _first_token_at_or_after(encoding: Any, char: int) -> int:
    """Index of the first token whose char span ends after ``char`` (so a token straddling the
    boundary counts). ``len(tokens)`` when none does."""
    tok = encoding.char_to_token(char) if char >= 0 else None
    if tok is not None:
        return int(tok)
    # char not covered by any token (e.g. a normaliser dropped it): scan offsets (slower path).
    for i, (_, end) in enumerate(encoding.offsets):
        if end > char:
            return i
    return len(encoding.ids)


def tokenize_preference_sides(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    seq_length: int,
    origins: Sequence[str],
    fields: Sequence[str] | None = None,
    validate: bool = True,
) -> list[tuple[list[int], int, bool, int]]:
    """Batched core of :func:`tokenize_preference_side`.

    Returns per conversation ``(input_ids[:seq_length], response_start, truncated,
    untruncated_length)``: the loss
    mask is 1 on ``[response_start, len(input_ids))``. One call of the fast tokenizer for the
    whole batch (Rust, no per-piece tokenization); offsets come from ``char_to_token``.
    ``validate=False`` skips the message checks for records the caller already validated.
    """
    bos_text, eos_text = special_texts(tokenizer)
    texts: list[str] = []
    boundaries: list[int] = []
    for k, (msgs, origin) in enumerate(zip(conversations, origins)):
        field = fields[k] if fields is not None else "messages"
        if validate:
            validate_messages(msgs, origin, field)
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{origin}: field '{field}' must end with an assistant turn, "
                f"but its last message has role {msgs[-1]['role']!r}"
            )
        text, boundary = format_messages_with_boundary(msgs, bos_text, eos_text, origin, field)
        texts.append(text)
        boundaries.append(boundary)
    if not texts:
        return []
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=False,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    if not getattr(enc, "encodings", None):
        raise TypeError("tokenize_preference_sides needs a fast (Rust) tokenizer for char offsets")
    out = []
    for ids, encoding, boundary in zip(enc["input_ids"], enc.encodings, boundaries):
        start = _first_token_at_or_after(encoding, boundary)
        truncated = len(ids) > seq_length
        out.append((ids[:seq_length], min(start, seq_length), truncated, len(ids)))
    return out


def tokenize_preference_side(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], seq_length: int, origin: str, field: str = "messages"
) -> TokenizedSide:
    """Tokenize one side of a preference pair (unpadded) with its loss mask.

    ``input_ids = tokenizer(bos_text + format(messages), add_special_tokens=False)[:seq_length]``;
    ``loss_mask[t] = 1`` iff token t belongs to the last assistant message (content or eos),
    i.e. its char span ends after the content's first char. The last message must be an
    assistant turn.
    """
    ((ids, start, truncated, _),) = tokenize_preference_sides(tokenizer, [messages], seq_length, [origin], [field])
    input_ids = np.asarray(ids, dtype=np.int64)
    loss_mask = (np.arange(len(ids)) >= start).astype(np.int64)
    return TokenizedSide(input_ids=input_ids, loss_mask=loss_mask, truncated=truncated)
