"""Tulu chat format, loss masks and prompt extraction, against hand-worked strings and ids.

With the tiny tokenizer every ASCII character is one token (id = byte + 3), "<s>" is 1 and
"</s>" is 2, so expected ids and masks follow from counting characters.
"""

import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from torchxla_rlhf.data.chat import (
    DataError,
    format_messages,
    format_prompt,
    prompt_messages_from_record,
    tokenize_preference_side,
)
from torchxla_rlhf.data.tokenizers import _bytes_to_unicode, build_tiny_tokenizer

from helpers import A, S, U


def ids_of(text: str) -> list[int]:
    """Hand tokenizer for the tiny vocab: <s> -> 1, </s> -> 2, each other byte b -> b + 3."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("</s>", i):
            out.append(2)
            i += 4
        elif text.startswith("<s>", i):
            out.append(1)
            i += 3
        else:
            out.extend(b + 3 for b in text[i].encode())
            i += 1
    return out


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module", params=["built", "reloaded"])
def any_tok(request, tmp_path_factory):
    t = build_tiny_tokenizer()
    if request.param == "reloaded":
        d = tmp_path_factory.mktemp("tok")
        t.save_pretrained(d)
        t = transformers.AutoTokenizer.from_pretrained(d)
    return t


# ---------------------------------------------------------------- formatting


def test_format_single_turn():
    assert format_messages([U(" Hi "), A("Yo\n")], "<s>", "</s>") == "<s><|user|>\nHi\n<|assistant|>\nYo</s>"


def test_format_multi_turn_with_system():
    msgs = [S("Be nice."), U("A"), A("B"), U("C"), A("D")]
    assert format_messages(msgs, "<s>", "</s>") == (
        "<s><|system|>\nBe nice.\n<|user|>\nA\n<|assistant|>\nB</s>\n<|user|>\nC\n<|assistant|>\nD</s>"
    )


def test_format_ending_with_user_strips_trailing_newline():
    assert format_messages([U("Q")], "", "</s>") == "<|user|>\nQ"


def test_format_prompt():
    msgs = [S("Sys"), U("A"), A("B"), U(" C ")]
    assert format_prompt(msgs, "<s>", "</s>") == (
        "<s><|system|>\nSys\n<|user|>\nA\n<|assistant|>\nB</s>\n<|user|>\nC\n<|assistant|>\n"
    )
    assert format_prompt(msgs, "<s>", "</s>", add_bos=False).startswith("<|system|>")
    # turns after the last user turn are cut
    assert format_prompt([U("A"), A("B")], "<s>", "</s>") == "<s><|user|>\nA\n<|assistant|>\n"


# ---------------------------------------------------------------- loss masks


def test_mask_single_turn(any_tok):
    side = tokenize_preference_side(any_tok, [U("Hi"), A("Yo")], 64, "t:1")
    text = "<s><|user|>\nHi\n<|assistant|>\nYo</s>"
    assert side.input_ids.tolist() == ids_of(text)
    # 1 (<s>) + 9 (<|user|>\n) + 2 (Hi) + 1 (\n) + 14 (<|assistant|>\n) = 27 masked; then Y, o, </s>
    assert len(side.input_ids) == 30
    assert side.loss_mask.tolist() == [0] * 27 + [1] * 3
    assert not side.truncated


def test_mask_last_assistant_only(tok):
    side = tokenize_preference_side(tok, [U("A"), A("B"), U("C"), A("D")], 128, "t:1")
    text = "<s><|user|>\nA\n<|assistant|>\nB</s>\n<|user|>\nC\n<|assistant|>\nD</s>"
    assert side.input_ids.tolist() == ids_of(text)
    n = len(ids_of(text))
    assert side.loss_mask.tolist() == [0] * (n - 2) + [1, 1]  # "D" and its eos; "B</s>" masked


def test_mask_with_system_turn(tok):
    side = tokenize_preference_side(tok, [S("Sys"), U("Hi"), A("Yo")], 128, "t:1")
    # 1 + 11 (<|system|>\n) + 3 + 1 + 9 + 2 + 1 + 14 = 42 masked
    assert side.loss_mask.tolist() == [0] * 42 + [1] * 3


def test_mask_empty_assistant_content_counts_only_eos(tok):
    side = tokenize_preference_side(tok, [U("Hi"), A("   ")], 64, "t:1")
    assert side.input_ids.tolist() == ids_of("<s><|user|>\nHi\n<|assistant|>\n</s>")
    assert side.loss_mask.tolist() == [0] * 27 + [1]


def test_truncation(tok):
    full = tokenize_preference_side(tok, [U("Hi"), A("Yo")], 30, "t:1")
    assert not full.truncated and full.loss_mask.sum() == 3
    cut = tokenize_preference_side(tok, [U("Hi"), A("Yo")], 28, "t:1")
    assert cut.truncated
    assert cut.input_ids.tolist() == ids_of("<s><|user|>\nHi\n<|assistant|>\nY")
    assert cut.loss_mask.tolist() == [0] * 27 + [1]
    gone = tokenize_preference_side(tok, [U("Hi"), A("Yo")], 27, "t:1")
    assert gone.truncated and gone.loss_mask.sum() == 0 and len(gone.input_ids) == 27


def test_mask_multibyte_first_char(tok):
    side = tokenize_preference_side(tok, [U("Hi"), A("éa")], 64, "t:1")
    # é is two byte tokens: both are response
    assert side.input_ids.tolist()[27:] == [3 + 0xC3, 3 + 0xA9, 3 + ord("a"), 2]
    assert side.loss_mask.tolist() == [0] * 27 + [1] * 4


def _merging_tokenizer():
    """Tiny vocab plus one merge "\\n" + "Y" -> a token straddling the header/content boundary."""
    b2u = _bytes_to_unicode()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({b2u[b]: 3 + b for b in range(256)})
    nl, y = b2u[ord("\n")], b2u[ord("Y")]
    vocab[nl + y] = 259
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(nl, y)], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def test_token_straddling_boundary_counts_as_response():
    t = _merging_tokenizer()
    side = tokenize_preference_side(t, [U("Hi"), A("Yo")], 64, "t:1")
    # "...<|assistant|>" then the merged "\nY" token (259), "o", eos
    assert side.input_ids.tolist()[-3:] == [259, 3 + ord("o"), 2]
    assert side.loss_mask.tolist() == [0] * 26 + [1] * 3
    # the merge does not fire elsewhere: "\nH" after <|user|> is two tokens
    assert 259 not in side.input_ids.tolist()[:-3]


def test_mask_matches_offsets_reference_random(tok):
    """Randomised check against the literal rule: token t is response iff its char span ends
    after the start of the last assistant content (offsets_mapping)."""
    rng = np.random.default_rng(0)
    alphabet = list("abc xyz\né€🎉")
    for _ in range(50):
        msgs = []
        if rng.random() < 0.3:
            msgs.append(S("".join(rng.choice(alphabet, 5))))
        for _ in range(int(rng.integers(1, 4))):
            msgs += [U("".join(rng.choice(alphabet, int(rng.integers(1, 8))))),
                     A("".join(rng.choice(alphabet, int(rng.integers(0, 8)))))]
        L = int(rng.integers(20, 120))
        side = tokenize_preference_side(tok, msgs, L, "t:1")
        text = format_messages(msgs, "<s>", "</s>")
        boundary = text.rindex("<|assistant|>\n") + len("<|assistant|>\n")
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ref = [int(end > boundary) for _, end in enc.offset_mapping][:L]
        assert side.input_ids.tolist() == enc.input_ids[:L]
        assert side.loss_mask.tolist() == ref
        assert side.truncated == (len(enc.input_ids) > L)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], r"f\.jsonl:7: field 'messages' is an empty conversation"),
        ("hi", r"f\.jsonl:7: field 'messages' must be a list of messages, got str"),
        ([U("a"), {"role": "bot", "content": "x"}], r"f\.jsonl:7: field 'messages\[1\]\.role' is 'bot'"),
        ([U("a"), {"content": "x"}], r"f\.jsonl:7: field 'messages\[1\]' has no 'role'"),
        ([U("a"), {"role": "assistant"}], r"f\.jsonl:7: field 'messages\[1\]' has no 'content'"),
        ([U("a"), A(3)], r"f\.jsonl:7: field 'messages\[1\]\.content' must be a string, got int"),
        ([U("a"), A(None)], r"must be a string, got null"),
        ([U("a"), "x"], r"field 'messages\[1\]' must be a message object"),
        ([U("a")], r"f\.jsonl:7: field 'messages' must end with an assistant turn, but its last message has role 'user'"),
    ],
)
def test_side_errors(tok, messages, match):
    with pytest.raises(DataError, match=match):
        tokenize_preference_side(tok, messages, 64, "f.jsonl:7")


def test_format_unknown_role_named():
    with pytest.raises(DataError, match="'tool'"):
        format_messages([{"role": "tool", "content": "x"}], "", "</s>", origin="x:1")
    with pytest.raises(DataError, match="empty conversation"):
        format_messages([], "", "</s>", origin="x:1")


# ---------------------------------------------------------------- prompt extraction


def test_prompt_from_messages_drops_trailing_assistant():
    assert prompt_messages_from_record({"messages": [U("a"), A("b")]}, "o") == [U("a")]
    assert prompt_messages_from_record({"messages": [S("s"), U("a")]}, "o") == [S("s"), U("a")]
    assert prompt_messages_from_record({"conversation": [U("a"), A("b"), U("c"), A("d")]}, "o") == [
        U("a"), A("b"), U("c")
    ]


def test_prompt_from_chosen_and_instruction():
    rec = {"chosen": [U("a"), A("good")], "rejected": [U("a"), A("bad")]}
    assert prompt_messages_from_record(rec, "o") == [U("a")]
    assert prompt_messages_from_record({"instruction": "do it"}, "o") == [U("do it")]


@pytest.mark.parametrize(
    "record, match",
    [
        ({"text": "x"}, r"p\.jsonl:3: missing field: expected one of 'messages', 'conversation', 'chosen', 'instruction'"),
        ({"messages": []}, r"p\.jsonl:3: field 'messages' is an empty conversation"),
        ({"messages": [A("x")]}, r"p\.jsonl:3: field 'messages' has no user turn"),
        ({"messages": [{"role": "human", "content": "x"}]}, r"p\.jsonl:3: field 'messages\[0\]\.role' is 'human'"),
        ({"chosen": [U("a"), U("b")]}, r"p\.jsonl:3: field 'chosen' must end with an assistant turn"),
        ({"instruction": 5}, r"p\.jsonl:3: field 'instruction' must be a string, got int"),
        ({"messages": [U(["x"])]}, r"p\.jsonl:3: field 'messages\[0\]\.content' must be a string, got list"),
        ([1, 2], r"p\.jsonl:3: expected a JSON object"),
    ],
)
def test_prompt_record_errors(record, match):
    with pytest.raises(DataError, match=match):
        prompt_messages_from_record(record, "p.jsonl:3")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)
