"""The synthetic tiny task: oracle, shipped files in the Tulu 2.5 schemas, regeneration."""

import json
import pathlib

import pytest

from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data import PreferenceDataset, PromptDataset, format_messages
from torchxla_rlhf.data.synthetic import (
    MAX_PAIR_TOKENS,
    MAX_PROMPT_TOKENS,
    MIN_GAP,
    _render,
    main,
    oracle_score,
)
from torchxla_rlhf.data.tokenizers import build_tiny_tokenizer

TINY = pathlib.Path(__file__).resolve().parents[1] / "data" / "tiny"
FILES = {"preference_train.jsonl": 2000, "preference_eval.jsonl": 200, "prompts.jsonl": 500}


def load(name):
    return [json.loads(line) for line in (TINY / name).read_text().splitlines()]


@pytest.mark.parametrize(
    "text, expected",
    [("Idea crypt.", 3 / 9), ("AEIOU", 1.0), ("rhythm", 0.0), ("", 0.0), ("42 !?", 0.0), ("Ba", 0.5)],
)
def test_oracle_score(text, expected):
    assert oracle_score(text) == pytest.approx(expected)


def test_shipped_files_exist_and_small():
    total = 0
    for name, n in FILES.items():
        assert len(load(name)) == n
        total += (TINY / name).stat().st_size
    assert total < 2_000_000


def _check_messages(msgs):
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
        assert isinstance(m["content"], str) and m["content"] == m["content"].strip() and m["content"]


@pytest.mark.parametrize("name", ["preference_train.jsonl", "preference_eval.jsonl"])
def test_preference_schema_and_oracle_prefers_chosen(name):
    recs = load(name)
    n_system = n_multi = 0
    for r in recs:
        assert set(r) == {"chosen", "rejected", "margin", "source"} and r["source"] == "synthetic"
        c, j = r["chosen"], r["rejected"]
        _check_messages(c)
        _check_messages(j)
        assert c[:-1] == j[:-1] and c[-1]["role"] == j[-1]["role"] == "assistant"
        assert c[-2]["role"] == "user"
        sc, sj = oracle_score(c[-1]["content"]), oracle_score(j[-1]["content"])
        assert sc > sj and sc - sj >= MIN_GAP - 1e-9
        assert r["margin"] == pytest.approx(sc - sj, abs=1e-6)
        n_words = len(c[-1]["content"].split())
        assert 3 <= n_words <= 12
        n_system += c[0]["role"] == "system"
        n_multi += sum(m["role"] == "user" for m in c) > 1
    assert n_system > 0.03 * len(recs) and n_multi > 0.03 * len(recs)


def test_prompt_schema():
    recs = load("prompts.jsonl")
    ids = set()
    for r in recs:
        assert set(r) == {"messages", "source", "id"} and r["source"] == "synthetic"
        _check_messages(r["messages"])
        assert r["messages"][-1]["role"] == "user"
        ids.add(r["id"])
    assert len(ids) == len(recs)
    assert any(len(r["messages"]) > 1 for r in recs)


def test_render_matches_chat_format():
    for r in load("preference_eval.jsonl")[:50]:
        assert _render(r["chosen"]) == format_messages(r["chosen"], "<s>", "</s>")


def test_fits_tiny_lengths_without_truncation():
    tok = build_tiny_tokenizer()
    for name in ("preference_train.jsonl", "preference_eval.jsonl"):
        ds = PreferenceDataset.build(DatasetConfig(path=str(TINY / name), seq_length=MAX_PAIR_TOKENS), tok)
        assert ds.stats["kept"] == FILES[name] and ds.stats["truncated_kept"] == 0
    ps = PromptDataset.build(DatasetConfig(path=str(TINY / "prompts.jsonl"), seq_length=MAX_PROMPT_TOKENS), tok, add_bos=True)
    assert ps.stats["kept"] == 500 and ps.stats["truncated_kept"] == 0


def test_regeneration_is_byte_identical(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "0"])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name
    main(["--out", str(tmp_path / "s1"), "--seed", "1", "--n_train", "20", "--n_eval", "5", "--n_prompts", "5"])
    assert (tmp_path / "s1" / "preference_train.jsonl").read_text() != "".join(
        (TINY / "preference_train.jsonl").read_text().splitlines(keepends=True)[:20]
    )
