"""Host rewards (math exact-match, format, user functions) and the RLVR prompt reader."""

import json
import sys
import textwrap
from fractions import Fraction

import pytest

from torchxla_rlhf.data import DataError, DatasetConfig
from torchxla_rlhf.data.rlvr import build_rlvr_prompts
from torchxla_rlhf.rewards import (
    RewardFunctionError,
    call_reward_function,
    final_answer,
    format_reward,
    math_exact_match,
    normalize_answer,
    resolve_verifier,
)
from torchxla_rlhf.tokenizers import load_tokenizer


def test_final_answer_forms():
    assert final_answer("so the answer is \\boxed{\\frac{1}{2}} done") == ("\\frac{1}{2}", True)
    assert final_answer("x \\boxed{a{b}c} then \\boxed{7}") == ("7", True)  # the last, balanced
    assert final_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == ("72", True)
    assert final_answer("I think 3 then 41.") == ("41", False)  # the last number
    assert final_answer("no digits here") == (None, False)


def test_normalize_answer_numbers_and_text():
    for a, b in [("1,000", "1000"), ("$42.0", "42"), ("042", "42"), ("84/2", "42"),
                 ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{6}", "1/2"), ("50%", "50"), ("7.", 7)]:
        assert normalize_answer(a) == normalize_answer(b), (a, b)
    assert normalize_answer("42") == Fraction(42)
    assert normalize_answer("x + 1") == "x+1"
    assert normalize_answer("41") != normalize_answer("42")


def test_math_exact_match_and_format():
    completions = ["... #### 1,234", "so \\boxed{12}", "the answer: 5", "nothing", "#### 8"]
    records = [{"ground_truth": "1234"}, {"ground_truth": ["11", "12"]}, {"ground_truth": 5},
               {"ground_truth": "3"}, {"ground_truth": "Some steps.\n#### 8"}]
    assert math_exact_match(completions, records) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert format_reward(completions, records) == [1.0, 1.0, 0.0, 0.0, 1.0]


def _user_module(tmp_path, monkeypatch, body):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)


def test_user_function_by_name_and_its_errors(tmp_path, monkeypatch):
    _user_module(tmp_path, monkeypatch, """
        def length(completions, records):
            return [len(c) for c in completions]

        def picky(completions, records):
            for r in records:
                if r["ground_truth"] == "bad":
                    raise KeyError("no verifier for this one")
            return [1.0] * len(completions)

        def short(completions, records):
            return [1.0]
        """)
    fn = resolve_verifier("my_rewards:length")
    assert call_reward_function("my_rewards:length", fn, ["ab", "c"], [{}, {}]) == [2.0, 1.0]
    picky = resolve_verifier("my_rewards:picky")
    records = [{"ground_truth": "ok", "origin": "d.jsonl:1"},
               {"ground_truth": "bad", "origin": "d.jsonl:2"}]
    with pytest.raises(RewardFunctionError, match=r"failed on record d\.jsonl:2: KeyError"):
        call_reward_function("my_rewards:picky", picky, ["a", "b"], records)
    with pytest.raises(RewardFunctionError, match="returned 1 values for 2"):
        call_reward_function("my_rewards:short", resolve_verifier("my_rewards:short"),
                             ["a", "b"], records)
    with pytest.raises(RewardFunctionError, match="unknown reward function 'exact'"):
        resolve_verifier("exact")
    with pytest.raises(RewardFunctionError, match="has no function 'missing'"):
        resolve_verifier("my_rewards:missing")
    with pytest.raises(RewardFunctionError, match="cannot import module 'no_such_mod'"):
        resolve_verifier("no_such_mod:f")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_rlvr_reader_keeps_fields_and_names_a_missing_ground_truth(tmp_path):
    tok = load_tokenizer("tiny", 0)
    good = [{"messages": [{"role": "user", "content": "Say 3."}], "ground_truth": "3",
             "dataset": "gsm8k"}] * 3
    path = _write(tmp_path / "ok.jsonl", good)
    ds = build_rlvr_prompts(DatasetConfig(path=path, seq_length=32, batch_size=1), tok,
                            add_bos=True, require_ground_truth=True)
    assert ds.fields[0] == {"ground_truth": "3", "dataset": "gsm8k"}
    assert ds.texts[0].endswith("<|assistant|>\n")

    bad = good[:1] + [{"messages": [{"role": "user", "content": "Say 4."}], "dataset": "gsm8k"}]
    path = _write(tmp_path / "bad.jsonl", bad)
    cfg = DatasetConfig(path=path, seq_length=32, batch_size=1)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no 'ground_truth'"):
        build_rlvr_prompts(cfg, tok, add_bos=True, require_ground_truth=True)
    # Without a verifiable reward (a reward model, a user function) it is not required.
    assert len(build_rlvr_prompts(cfg, tok, add_bos=True, require_ground_truth=False)) == 2


def test_shipped_rlvr_task_is_reproducible_and_verifiable(tmp_path):
    import os

    from torchxla_rlhf.data.synthetic import write_tiny_task

    from helpers import REPO

    paths = write_tiny_task(str(tmp_path))
    for name in ("rlvr_train", "rlvr_eval"):
        with open(paths[name]) as f, open(os.path.join(REPO, "data", "tiny", f"{name}.jsonl")) as g:
            assert f.read() == g.read(), name
    records = [json.loads(line) for line in open(paths["rlvr_train"])]
    assert len(records) == 500 and {r["dataset"] for r in records} == {"tiny_say_number"}
    prompts = [r["messages"][-1]["content"] for r in records]
    # The right answer scores 1 and the prompt alone (it holds the number) scores 1 too:
    # the task is "repeat the number", verified by the math exact-match.
    assert math_exact_match([r["ground_truth"] for r in records], records) == [1.0] * 500
    assert math_exact_match(prompts, records) == [1.0] * 500
    assert sum(math_exact_match(["0"] * 500, records)) < 100
