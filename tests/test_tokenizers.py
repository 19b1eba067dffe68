"""The tiny byte-level tokenizer, the Tulu chat template and load_tokenizer (offline)."""

import json
import os

import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from torchxla_rlhf.data.chat import format_messages, format_prompt
from torchxla_rlhf.data.tokenizers import (
    TINY_VOCAB_SIZE,
    TULU_CHAT_TEMPLATE,
    build_tiny_tokenizer,
    is_sentencepiece_bpe,
    load_tokenizer,
    sentencepiece_backend_spec,
    with_sentencepiece_legacy,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_tokenizer().save_pretrained(d)
    return transformers.AutoTokenizer.from_pretrained(d)


def test_special_ids_and_vocab(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) == TINY_VOCAB_SIZE == 259
    # byte b -> id 3 + b: "a" is byte 97.
    assert tok("a", add_special_tokens=False).input_ids == [100]
    assert tok("\n", add_special_tokens=False).input_ids == [13]
    # UTF-8 "é" is bytes C3 A9 -> two tokens.
    assert tok("é", add_special_tokens=False).input_ids == [3 + 0xC3, 3 + 0xA9]


def test_bos_prepended_only_with_special_tokens(tok, reloaded):
    for t in (tok, reloaded):
        assert t("ab").input_ids == [1, 100, 101]
        assert t("ab", add_special_tokens=False).input_ids == [100, 101]
        assert t.pad_token_id == 0 and t.eos_token_id == 2


def test_special_token_text_is_one_token(tok):
    assert tok("<s>x</s>", add_special_tokens=False).input_ids == [1, 3 + ord("x"), 2]


@pytest.mark.parametrize(
    "text",
    ["", "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "héllo 日本語 🎉🚀", "e\u0301 combining",
     "<|user|>\nhi\n<|assistant|>\n", "\x00\x01 control", "ÿþ latin-1"],
)
def test_round_trip(tok, reloaded, text):
    for t in (tok, reloaded):
        ids = t(text, add_special_tokens=False).input_ids
        assert t.decode(ids) == text


def test_offsets_mapping(tok):
    enc = tok("<s>hé</s>", add_special_tokens=False, return_offsets_mapping=True)
    assert enc.input_ids == [1, 3 + ord("h"), 3 + 0xC3, 3 + 0xA9, 2]
    # both bytes of "é" carry its character span
    assert enc.offset_mapping == [(0, 3), (3, 4), (4, 5), (4, 5), (5, 9)]


def test_reloaded_matches_original(tok, reloaded):
    text = "<s><|user|>\nHi ünïcode\n<|assistant|>\nYo</s>"
    assert reloaded(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert reloaded.chat_template == TULU_CHAT_TEMPLATE


def test_chat_template_matches_tulu_format(tok, reloaded):
    """The template renders exactly the training text, BOS included, so tokenize=True (which
    encodes with add_special_tokens=False) gives the training ids."""
    conv = [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": " Hi\n"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": " Ok "},
    ]
    for t in (tok, reloaded):
        rendered = t.apply_chat_template(conv, tokenize=False)
        assert rendered == "<s><|system|>\nSys\n<|user|>\nHi\n<|assistant|>\nYo</s>\n<|user|>\nMore\n<|assistant|>\nOk</s>"
        assert rendered == format_messages(conv, "<s>", "</s>")
        assert t.apply_chat_template(conv, tokenize=True, return_dict=False) == t(rendered, add_special_tokens=False).input_ids
        assert t.apply_chat_template(conv, tokenize=True, return_dict=False)[:2] == [1, 3 + ord("<")]
        gen = t.apply_chat_template(conv[:4], tokenize=False, add_generation_prompt=True)
        assert gen == format_prompt(conv[:4], "<s>", "</s>", add_bos=True)
        assert gen.endswith("<|user|>\nMore\n<|assistant|>\n")
        # a conversation ending with a user turn and no generation prompt: stripped like training
        assert t.apply_chat_template(conv[:2], tokenize=False) == format_messages(conv[:2], "<s>", "</s>")


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_load_tokenizer_tiny_and_pad(tmp_path):
    t = load_tokenizer("tiny")
    assert t.pad_token_id == 0
    t2 = load_tokenizer("tiny", pad_token_id=2)
    assert t2.pad_token_id == 2 and t2.pad_token == "</s>"
    assert load_tokenizer("tiny", pad_token_id=None).pad_token_id == 0  # the tokenizer's own
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_tokenizer("tiny", pad_token_id=259)


def test_load_tokenizer_local_dir_gets_template_and_pad(tmp_path):
    t = build_tiny_tokenizer()
    t.chat_template = None
    t.pad_token = "</s>"
    t.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), pad_token_id=0)
    assert loaded.pad_token_id == 0
    assert loaded.chat_template == TULU_CHAT_TEMPLATE
    assert loaded("x").input_ids == [1, 3 + ord("x")]


@pytest.mark.parametrize("bad", ["/no/such/tokenizer/dir", "./missing_tok", "a/b/c"])
def test_load_tokenizer_missing_path(bad):
    assert not os.path.exists(bad)
    with pytest.raises(FileNotFoundError, match="not an existing local path"):
        load_tokenizer(bad)


def _toy_sentencepiece_bpe(legacy_normalizer: bool) -> dict:
    """A 10-piece LLaMA-like tokenizer.json spec (byte-fallback BPE, "▁" escaping), written
    either way transformers writes LLaMA's: legacy normalizer, or non-legacy Metaspace."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁": 4, "<": 5, "▁<": 6, "a": 7, "▁a": 8, ">": 9}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "<"), ("▁", "a")], unk_token="<unk>", byte_fallback=True))
    if legacy_normalizer:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in ("<unk>", "<s>", "</s>")])
    return json.loads(backend.to_str())


@pytest.mark.parametrize("written_legacy", [True, False])
def test_sentencepiece_rule_switch_on_a_toy_llama_spec(written_legacy):
    """The dummy-prefix rule: legacy gives "▁<" after <s> and "▁" "\\n" after </s> (the paper's
    JAX code), non-legacy "<" and "\\n"; whichever way the spec was written."""
    spec = _toy_sentencepiece_bpe(written_legacy)
    before = json.dumps(spec, sort_keys=True)
    assert is_sentencepiece_bpe(spec)
    text = "<s><a</s>\na"
    legacy = Tokenizer.from_str(json.dumps(sentencepiece_backend_spec(spec, True)))
    assert legacy.encode(text, add_special_tokens=False).ids == [1, 6, 7, 2, 4, 3, 7]
    non_legacy = Tokenizer.from_str(json.dumps(sentencepiece_backend_spec(spec, False)))
    assert non_legacy.encode(text, add_special_tokens=False).ids == [1, 5, 7, 2, 3, 7]
    assert non_legacy.encode("<a", add_special_tokens=False).ids == [6, 7]  # "▁" at the very start
    assert json.dumps(spec, sort_keys=True) == before  # the input is not modified
    assert all(not t["normalized"] for t in sentencepiece_backend_spec(spec, True)["added_tokens"])


def test_other_tokenizers_are_not_sentencepiece_bpe():
    tiny = build_tiny_tokenizer()
    assert not is_sentencepiece_bpe(json.loads(tiny.backend_tokenizer.to_str()))
    assert with_sentencepiece_legacy(tiny, True) is tiny
    spec = _toy_sentencepiece_bpe(True)
    spec["normalizer"]["normalizers"].append({"type": "NFKC"})  # a normaliser SentencePiece-BPE LLaMA lacks
    assert not is_sentencepiece_bpe(spec)
    spec = _toy_sentencepiece_bpe(False)
    spec["model"]["byte_fallback"] = False
    assert not is_sentencepiece_bpe(spec)
