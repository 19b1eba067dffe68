"""Token-for-token fidelity with LLaMA-2's real SentencePiece tokenizer.

The paper's JAX code and Tulu 2's fine-tuning used the LEGACY SentencePiece behaviour: each
stretch of text between special tokens gets its own dummy-prefix "▁". The two vectors below
were produced by the JAX code's own Tulu function with this tokenizer (loss mask from
position 1, as its loss reads it). Every case runs on the tokenizer as the trainers load it and
on a saved checkpoint's tokenizer loaded with plain ``AutoTokenizer.from_pretrained`` (what
open-instruct, vLLM and RewardBench do).

General cases are checked against an independent definition of the legacy behaviour: split the
text at special tokens and encode each stretch with SentencePiece itself (``sentencepiece``
package; transformers 4.46's ``LlamaTokenizerFast(legacy=True)`` gives the same ids on these
texts).
"""

import json
import os
import re

import pytest
import torch
import transformers

from torchxla_rlhf.checkpoint import save_hf_checkpoint
from torchxla_rlhf.data.chat import format_messages, format_prompt, tokenize_preference_side
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data.prompts import PromptDataset
from torchxla_rlhf.data.tokenizers import TULU_CHAT_TEMPLATE, is_sentencepiece_bpe, load_tokenizer, with_sentencepiece_legacy

from helpers import LLAMA2_MISSING, LLAMA2_TOKENIZER_DIR, A, S, U, has_llama2_tokenizer

pytestmark = pytest.mark.skipif(not has_llama2_tokenizer(), reason=LLAMA2_MISSING)


CHAT_1 = [U("Hello there"), A("Hi!")]
IDS_1 = [1, 529, 29989, 1792, 29989, 29958, 13, 10994, 727, 13, 29966, 29989, 465, 22137, 29989, 29958, 13,
         18567, 29991, 2]
LOSS_TOKENS_1 = 3  # "Hi", "!", "</s>"
CHAT_2 = [S("Be brief."), U("2+2?"), A("4"), U("And 3+3?"), A(" 6 ")]
IDS_2 = [1, 529, 29989, 5205, 29989, 29958, 13, 3629, 11473, 29889, 13, 29966, 29989, 1792, 29989, 29958, 13,
         29906, 29974, 29906, 29973, 13, 29966, 29989, 465, 22137, 29989, 29958, 13, 29946, 2, 29871, 13, 29966,
         29989, 1792, 29989, 29958, 13, 2855, 29871, 29941, 29974, 29941, 29973, 13, 29966, 29989, 465, 22137,
         29989, 29958, 13, 29953, 2]
LOSS_TOKENS_2 = 2  # "6", "</s>"

# Conversations for the comparison with SentencePiece: several turns, system turns, unicode
# (accents, CJK, emoji through byte fallback), runs of spaces and code indentation (where the
# BPE merge order matters), tabs, a literal special token inside a message.
CONVERSATIONS = [
    [U("Hello there"), A("Hi!"), U("How are you?"), A("Fine, thanks."), U("Bye"), A("Bye!")],
    [S("You are terse."), U("Name a colour."), A("Red."), U("Another?"), A("Blue.")],
    [U("héllo wörld 日本語 🙂 naïve – “quotes”"), A("Ça va? 😀 Größe: ½")],
    [U("Fix:\n```python\ndef f(x):\n    return  x\n```"), A("def f(x):\n\treturn x  # two  spaces")],
    [U("a  hi   there"), A("x\n\n  y"), U("say </s> and <s> literally"), A("ok </s> done")],
    [S("Sys"), U("1234567 3.14 $100"), A("e\u0301 combining")],
]


def _sp_legacy_ids(sp, text: str) -> list[int]:
    """Legacy SentencePiece tokenization (transformers 4's slow LlamaTokenizer, legacy=True):
    cut at special tokens, encode every other stretch on its own (dummy prefix included)."""
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    out = []
    for part in re.split(r"(<unk>|<s>|</s>)", text):
        if part in special:
            out.append(special[part])
        elif part:
            out.extend(sp.encode(part))
    return out


def _tiny_llama_32k() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def loaded():
    """The tokenizer as the trainers load it (``tokenizer=$LLAMA2_TOKENIZER_DIR``)."""
    return load_tokenizer(LLAMA2_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def checkpoint_dir(loaded, tmp_path_factory):
    """A real checkpoint (random 32000-token Llama) written by the project's exporter."""
    out = str(tmp_path_factory.mktemp("llama2_ckpt") / "final")
    save_hf_checkpoint(_tiny_llama_32k(), loaded, out, save_dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def hub_style_dir(checkpoint_dir, tmp_path_factory):
    """A directory laid out like the hub's meta-llama/Llama-2-7b-hf tokenizer: transformers 4's
    tokenizer.json (the same merges and normalizer as ours) with a tokenizer_config.json that
    names LlamaTokenizer and "legacy": false, so transformers 5 rebuilds it non-legacy."""
    d = tmp_path_factory.mktemp("hub_style")
    spec = json.load(open(os.path.join(checkpoint_dir, "tokenizer.json")))
    spec["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "padding_side": "right", "model_max_length": 4096,
    }))
    assert transformers.AutoTokenizer.from_pretrained(d)("<s><|user|>", add_special_tokens=False).input_ids[:2] == [1, 29966]
    return str(d)


@pytest.fixture(scope="module", params=["loaded", "hub_style", "checkpoint_auto", "checkpoint_load_tokenizer"])
def tok(request, loaded, checkpoint_dir, hub_style_dir):
    """Every way the project's runs and downstream tools get the tokenizer."""
    if request.param == "loaded":
        return loaded
    if request.param == "hub_style":
        return load_tokenizer(hub_style_dir)  # whatever transformers' default: the paper's ids
    if request.param == "checkpoint_auto":
        return transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
    return load_tokenizer(checkpoint_dir)  # PPO's default: the policy checkpoint's tokenizer


def _expected_mask(n: int, loss_tokens: int) -> list[int]:
    return [0] * (n - loss_tokens) + [1] * loss_tokens


@pytest.mark.parametrize("chat,ids,loss_tokens", [(CHAT_1, IDS_1, LOSS_TOKENS_1), (CHAT_2, IDS_2, LOSS_TOKENS_2)])
def test_jax_vectors(tok, chat, ids, loss_tokens):
    side = tokenize_preference_side(tok, chat, seq_length=512, origin="vector")
    assert side.input_ids.tolist() == ids
    assert side.loss_mask.tolist() == _expected_mask(len(ids), loss_tokens)
    assert not side.truncated
    # the chat template renders the same text, BOS included, and tokenize=True gives the ids
    assert tok.apply_chat_template(chat, tokenize=False) == format_messages(chat, "<s>", "</s>")
    assert tok.apply_chat_template(chat, tokenize=True, return_dict=False) == ids


def test_multi_turn_keeps_prefix_after_eos(tok):
    """After the </s> closing an earlier turn comes "▁" "\\n" (29871, 13): the JAX code's
    sequences, one token longer per earlier turn than transformers 5's default."""
    ids = tokenize_preference_side(tok, CONVERSATIONS[0], 512, "multi").input_ids.tolist()
    eos_at = [i for i, t in enumerate(ids) if t == 2]
    assert len(eos_at) == 3 and eos_at[-1] == len(ids) - 1
    for i in eos_at[:-1]:
        assert ids[i + 1 : i + 4] == [29871, 13, 29966]


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_matches_sentencepiece_legacy(tok, k):
    spm = pytest.importorskip("sentencepiece", reason="the SentencePiece reference needs the sentencepiece package")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(LLAMA2_TOKENIZER_DIR, "tokenizer.model"))
    chat = CONVERSATIONS[k]
    text = format_messages(chat, "<s>", "</s>")
    side = tokenize_preference_side(tok, chat, 4096, "conv")
    assert side.input_ids.tolist() == _sp_legacy_ids(sp, text)
    # the loss tokens are exactly the last answer and its eos (decoding adds the dummy-prefix
    # space after a special token written inside an answer, so compare those by count)
    response = side.input_ids[side.loss_mask == 1].tolist()
    answer = chat[-1]["content"].strip()
    if "</s>" in answer:
        assert len(response) == len(_sp_legacy_ids(sp, answer + "</s>"))
    else:
        assert tok.decode(response) == answer + "</s>"
    prompt = format_prompt(chat[:-1], "<s>", "</s>", add_bos=True)
    assert tok(prompt, add_special_tokens=False).input_ids == _sp_legacy_ids(sp, prompt)


def test_space_runs_follow_sentencepiece_merge_order(tok):
    """Merges ranked by piece score, as SentencePiece and the hub's tokenizer.json apply them
    (transformers 5's own conversion of tokenizer.model ranks them by id and gives
    [263, 259, 2918] and [259, 2457] here)."""
    assert tok("a  hi", add_special_tokens=False).input_ids == [263, 29871, 7251]
    assert tok("x\n    return", add_special_tokens=False).input_ids == [921, 13, 1678, 736]


def test_unicode_round_trip_and_mask(tok):
    chat = CONVERSATIONS[2]
    side = tokenize_preference_side(tok, chat, 4096, "unicode")
    text = format_messages(chat, "<s>", "</s>")
    assert tok.decode(side.input_ids.tolist()) == text.replace("<s>", "<s> ", 1)  # "▁<" after <s>
    assert tok.decode(side.input_ids.tolist(), skip_special_tokens=True) == text[len("<s>"):].replace("</s>", "")
    assert 243 in side.input_ids  # the emoji's bytes via byte fallback (<0xF0>)


def test_truncated_sequence(tok):
    side = tokenize_preference_side(tok, CHAT_1, seq_length=18, origin="trunc")
    assert side.truncated
    assert side.input_ids.tolist() == IDS_1[:18]
    assert side.loss_mask.tolist() == _expected_mask(18, 1)  # only "Hi" survives
    cut = tokenize_preference_side(tok, CHAT_2, seq_length=10, origin="trunc")
    assert cut.truncated and cut.input_ids.tolist() == IDS_2[:10] and cut.loss_mask.sum() == 0


@pytest.mark.parametrize("add_bos", [True, False])
def test_ppo_prompts_with_and_without_bos(tok, tmp_path, add_bos):
    """The prompt is the training sequence up to its last "<|assistant|>\\n": with BOS the same
    ids (so the policy sees what it was trained on), without BOS the "▁<" start stays."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in (CHAT_1, CHAT_2)) + "\n")
    cfg = DatasetConfig(path=str(path), seq_length=64, batch_size=2, shuffle=False)
    data = PromptDataset.build(cfg, tok, add_bos=add_bos)
    batch = data.get([0, 1])
    start = 0 if add_bos else 1
    for row, (ids, loss_tokens) in enumerate([(IDS_1, LOSS_TOKENS_1), (IDS_2, LOSS_TOKENS_2)]):
        expected = ids[start : len(ids) - loss_tokens]
        got = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert got == expected
        assert batch["attention_mask"][row][: 64 - len(expected)].sum() == 0  # left-padded
    if not add_bos:
        assert batch["input_ids"][0][-len(IDS_1) + 1 + LOSS_TOKENS_1] == 529
    gen = tok.apply_chat_template(CHAT_2[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert gen == IDS_2[: len(IDS_2) - LOSS_TOKENS_2]


def test_checkpoint_files_are_portable(checkpoint_dir):
    """A plain fast tokenizer class (transformers 4 and 5 load tokenizer.json verbatim) with the
    legacy normalizer, BOS post-processor and the Tulu template written in."""
    config = json.load(open(os.path.join(checkpoint_dir, "tokenizer_config.json")))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == TULU_CHAT_TEMPLATE
    spec = json.load(open(os.path.join(checkpoint_dir, "tokenizer.json")))
    assert is_sentencepiece_bpe(spec)
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert spec["pre_tokenizer"] is None
    reloaded = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
    assert reloaded("Hi").input_ids == [1, 6324]  # add_special_tokens=True adds BOS
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id, len(reloaded)) == (1, 2, 0, 32000)


def test_non_legacy_option(loaded, tmp_path):
    """tokenizer_legacy: false gives transformers 5's rule (no "▁" after special tokens), and
    a checkpoint keeps it."""
    tok = with_sentencepiece_legacy(loaded, False)
    side = tokenize_preference_side(tok, CHAT_2, 512, "nonlegacy")
    ids = side.input_ids.tolist()
    assert ids[:2] == [1, 29966]
    assert len(ids) == len(IDS_2) - 1 and 29871 not in ids[30:33]
    assert side.loss_mask.tolist() == _expected_mask(len(ids), LOSS_TOKENS_2)
    tok.save_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(format_messages(CHAT_2, "<s>", "</s>"),
                                                                add_special_tokens=False).input_ids == ids
    # and loading a legacy checkpoint with the option switches it (the rule is not sticky)
    assert load_tokenizer(str(tmp_path), sentencepiece_legacy=True)("<s><|user|>", add_special_tokens=False).input_ids[:2] == [1, 529]


def test_missing_protobuf_is_a_clear_error(monkeypatch, tmp_path):
    import transformers.convert_slow_tokenizer as cst

    def no_protobuf(*args, **kwargs):
        raise ImportError("no protobuf")

    (tmp_path / "tokenizer.model").write_bytes(open(os.path.join(LLAMA2_TOKENIZER_DIR, "tokenizer.model"), "rb").read())
    monkeypatch.setattr(cst, "import_protobuf", no_protobuf)
    with pytest.raises(ImportError, match="needs the 'protobuf' package"):
        load_tokenizer(str(tmp_path))


def test_config_key_reaches_the_tokenizer(tmp_path):
    """tokenizer_legacy in the config tree selects the rule the trainers tokenize with."""
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.configs.dpo import DPOConfig
    from torchxla_rlhf.trainers.base import setup_run

    from helpers import REPO

    path = os.path.join(REPO, "configs", "tiny_llama2", "dpo.yaml")
    assert load_config(DPOConfig, path).tokenizer_legacy is True
    assert DPOConfig().tokenizer_legacy is True
    cfg = load_config(DPOConfig, path, [f"output_dir={tmp_path}", f"tokenizer={LLAMA2_TOKENIZER_DIR}",
                                        "tokenizer_legacy=false"])
    tok = setup_run(cfg).tokenizer  # the bare tokenizer.model converted with the non-legacy rule
    assert tok("<s><|user|>", add_special_tokens=False).input_ids[:2] == [1, 29966]
    assert tok("a  hi", add_special_tokens=False).input_ids == [263, 29871, 7251]  # same merges
