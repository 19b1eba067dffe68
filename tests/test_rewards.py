"""Host rewards (verifiers, per-record routing and its health metrics, format, user functions)
and the RLVR prompt reader."""

import json
import sys
import textwrap
from fractions import Fraction

import pytest

from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data import DataError
from torchxla_rlhf.data.rlvr import build_rlvr_prompts
from torchxla_rlhf.algos.verifiers import (
    BUILTIN_VERIFIERS,
    RewardFunctionError,
    Verifiers,
    call_reward_function,
    final_answer,
    format_reward,
    parse_verifier_map,
    resolve_verifier,
    validate_records,
)
from torchxla_rlhf.algos.verifiers.answers import gsm8k_truths, parse_number
from torchxla_rlhf.algos.verifiers.ifeval import CONSTRAINTS, ifeval_score, parse_constraint
from torchxla_rlhf.data.tokenizers import load_tokenizer


def test_final_answer_forms():
    assert final_answer("so the answer is \\boxed{\\frac{1}{2}} done") == ("\\frac{1}{2}", True)
    assert final_answer("x \\boxed{a{b}c} then \\boxed{7}") == ("7", True)  # the last, balanced
    assert final_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == ("72", True)
    assert final_answer("I think 3 then 41.") == ("41", False)  # the last number
    assert final_answer("no digits here") == (None, False)


def test_numbers_are_exact_and_commas_only_group_thousands():
    for a, b in [("1,000", "1000"), ("$42.0", "42"), ("042", "42"), ("84/2", "42"),
                 ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{6}", "1/2"), ("50%", "50"), ("7.", "7")]:
        assert parse_number(a) == parse_number(b) is not None, (a, b)
    assert parse_number("42") == Fraction(42)
    assert parse_number("3, 5") is None and parse_number("12,5") is None
    assert parse_number("50\\%", percent=False) is None
    assert gsm8k_truths(["7", 8, "steps\n#### 1,234"]) == [7, 8, 1234]


def test_builtin_verifiers_score_and_format():
    gsm8k, math = BUILTIN_VERIFIERS["gsm8k"], BUILTIN_VERIFIERS["math"]
    completions = ["... #### 1,234", "so \\boxed{12}", "the answer: 5", "nothing", "#### 8"]
    truths = ["1234", ["11", "12"], 5, "3", "Some steps.\n#### 8"]
    assert [gsm8k.score(c, t) for c, t in zip(completions, truths)] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert format_reward(completions, [{}] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert math.score("so \\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{3}}{2}", 5) == 1.0
    assert math.score("so \\boxed{3, 5}", "35", 5) == 0.0


def test_ground_truths_are_checked_against_their_verifier():
    """An object ground truth ({"answer": "8"}) used to be accepted and scored every answer 0."""
    with pytest.raises(ValueError, match="the math verifier expects a LaTeX answer string.*got dict"):
        BUILTIN_VERIFIERS["math"].check({"answer": "8"})
    with pytest.raises(ValueError, match="the gsm8k verifier expects a number.*got dict"):
        BUILTIN_VERIFIERS["gsm8k"].check({"answer": "8"})
    with pytest.raises(ValueError, match="got str 'eight'"):
        BUILTIN_VERIFIERS["gsm8k"].check("eight")
    with pytest.raises(ValueError, match="got bool"):
        BUILTIN_VERIFIERS["math"].check(True)
    BUILTIN_VERIFIERS["math"].check(["\\frac{1}{2}", 0.5])


def test_ifeval_constraints_follow_open_instruct():
    def score(text, **spec):
        return ifeval_score(text, json.dumps(spec))

    assert len(CONSTRAINTS) == 25
    assert score("all quiet here", func_name="validate_lowercase", N=None, quantifier=None) == 1.0
    assert score("Not quiet", func_name="validate_lowercase") == 0.0
    assert score("one two three", func_name="validate_word_constraint", N=3, quantifier="at least") == 1.0
    assert score("one two", func_name="validate_word_constraint", N=3, quantifier="at least") == 0.0
    assert score("one two", func_name="validate_word_constraint", N=20, quantifier="around") == 0.0
    assert score("x " * 19, func_name="validate_word_constraint", N=20, quantifier="around") == 1.0
    assert score("A cat and a Dog", func_name="verify_keywords", keyword_list=["cat", "dog"]) == 1.0
    assert score('{"a": 1}', func_name="validate_json_format") == 1.0
    assert score("{'a': 1}", func_name="validate_json_format") == 0.0
    assert score("<think>ok</think>NO LOWER", func_name="validate_uppercase") == 1.0
    assert score("a b\n\nc d", func_name="validate_paragraphs", N=2, first_word="c", i=2) == 1.0
    assert score("hi, there", func_name="validate_no_commas") == 0.0
    assert score("* a\n* b\n- c", func_name="verify_bullet_points", N=3) == 1.0
    assert score("the the cat", func_name="verify_keyword_frequency", word="the", N=2) == 1.0
    assert score("Bye.\nP.S. see you", func_name="verify_postscript", postscript_marker="P.S.") == 1.0
    assert score("This is an English sentence about the weather today.",
                 func_name="validate_response_language", language="en") == 1.0
    assert score("", func_name="validate_lowercase") == 0.0  # an empty answer follows nothing
    assert ifeval_score("ok", {"func_name": "validate_lowercase"}) == 1.0  # an object works too
    for spec, msg in [({"func_name": "validate_lowercase_x"}, "unknown ifeval constraint"),
                      ({"N": 3}, "expects a JSON object with 'func_name'"),
                      ({"func_name": "validate_word_constraint", "N": 3}, r"missing \['quantifier'\]"),
                      ({"func_name": "validate_title", "N": 3}, r"unexpected \['N'\]"),
                      ({"func_name": "verify_bullet_points", "N": "3"}, "N must be a integer"),
                      ({"func_name": "validate_word_constraint", "N": 3, "quantifier": "exactly"},
                       "quantifier must be one of")]:
        with pytest.raises(ValueError, match=msg):
            parse_constraint(json.dumps(spec))
    with pytest.raises(ValueError, match="not JSON"):
        parse_constraint("validate_lowercase")


def test_records_route_by_dataset_with_health_metrics(tmp_path, monkeypatch):
    _user_module(tmp_path, monkeypatch, """
        def half(completions, records):
            return [0.5] * len(completions)
        """)
    v = Verifiers("by_dataset", "custom=my_rewards:half, tiny=gsm8k")
    records = [{"dataset": "gsm8k", "ground_truth": "8", "origin": "f:1"},
               {"dataset": "MATH", "ground_truth": "\\frac{1}{2}", "origin": "f:2"},
               {"dataset": "ifeval", "ground_truth": '{"func_name": "validate_lowercase"}',
                "origin": "f:3"},
               {"dataset": "Custom", "ground_truth": None, "origin": "f:4"},
               {"dataset": "tiny", "ground_truth": "3", "origin": "f:5"},
               {"dataset": "gsm8k", "ground_truth": "9", "origin": "f:6"}]
    for r in records:
        v.check_record(r)
    values, m = v.score(["#### 8", "\\boxed{0.5}", "lower", "x", "3", "#### 8"], records)
    assert values == [1.0, 1.0, 1.0, 0.5, 1.0, 0.0]
    assert m["rewards/gsm8k/count"] == 3 and m["rewards/gsm8k/frac_one"] == pytest.approx(2 / 3)
    assert m["rewards/gsm8k/frac_zero"] == pytest.approx(1 / 3)
    assert m["rewards/math/frac_one"] == 1.0 and m["rewards/ifeval/frac_one"] == 1.0
    assert m["rewards/my_rewards.half/frac_one"] == 0.0 == m["rewards/my_rewards.half/frac_zero"]
    assert all(m[f"time/verifier/{n}_s"] >= 0 for n in ("gsm8k", "math", "ifeval"))
    with pytest.raises(ValueError, match="no verifier for dataset 'other'.*rewards.verifiers"):
        v.check_record({"dataset": "other", "ground_truth": "1"})
    with pytest.raises(ValueError, match="'dataset' is None"):
        v.check_record({"ground_truth": "1"})
    # One verifier for every record, whatever its dataset.
    assert Verifiers("math").spec_for({"dataset": "ifeval"}) == "math"


def test_a_verifier_that_fails_or_times_out_scores_0_and_is_counted(monkeypatch, caplog):
    from torchxla_rlhf.algos.verifiers import mathverify

    v = Verifiers("math")
    real = mathverify._call

    def slow(fn, *args, **kwargs):
        if args and args[0] == "\\boxed{x^2}":
            raise mathverify.VerifierTimeout("math-verify gave up after 5 s")
        if args and args[0] == "\\boxed{y}":
            raise RecursionError("maximum recursion depth exceeded")  # sympy on a deep tree
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(mathverify, "_call", slow)
    records = [{"ground_truth": "x^2", "origin": "f:1"}, {"ground_truth": "x", "origin": "f:2"},
               {"ground_truth": "\\sqrt{2}", "origin": "f:3"}, {"ground_truth": "2", "origin": "f:4"}]
    with caplog.at_level("WARNING"):
        values, m = v.score(["\\boxed{x^2}", "\\boxed{y}", "\\boxed{\\sqrt2}", "\\boxed{3}"], records)
    assert values == [0.0, 0.0, 1.0, 0.0]
    assert m["rewards/math/frac_error"] == 0.5 and m["rewards/math/frac_timeout"] == 0.25
    assert m["rewards/math/frac_one"] == 0.25 and m["rewards/math/frac_zero"] == 0.25
    assert "verifier math failed on record f:1" in caplog.text


def test_math_verify_timeouts_are_real_in_the_main_thread():
    """A comparison math-verify cannot finish in time raises VerifierTimeout (signal.alarm)."""
    import time

    from torchxla_rlhf.algos.verifiers import mathverify

    assert mathverify.timeouts_available()

    def stuck(*args, raise_on_error, timeout_seconds):
        from math_verify.utils import timeout

        return timeout(timeout_seconds)(lambda: time.sleep(5))()

    t0 = time.perf_counter()
    with pytest.raises(mathverify.VerifierTimeout):
        mathverify._call(stuck, timeout_kw="timeout_seconds", timeout_s=1)
    assert time.perf_counter() - t0 < 3


def test_verifier_config_errors():
    assert parse_verifier_map(" a=gsm8k, B=m:f ,") == {"a": "gsm8k", "b": "m:f"}
    for text, msg in [("a", "is not 'dataset=verifier'"), ("a=exact", "expected one of"),
                      ("a=math, A=gsm8k", "named twice")]:
        with pytest.raises(ValueError, match=msg):
            parse_verifier_map(text)
    with pytest.raises(RewardFunctionError, match="rewards.verifiers: cannot import module 'nope'"):
        Verifiers("by_dataset", "x=nope:f")


def test_validate_records_names_the_record():
    class Cfg:
        verifier, verifiers, verifier_timeout_s, verifier_weight = "by_dataset", "", 5, 1.0

    good = {"dataset": "gsm8k", "ground_truth": "8", "origin": "d.jsonl:1"}
    validate_records([good], Cfg)
    with pytest.raises(RewardFunctionError, match=r"^d\.jsonl:2: the math verifier expects"):
        validate_records([good, {"dataset": "MATH", "ground_truth": {"answer": "8"},
                                 "origin": "d.jsonl:2"}], Cfg)


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
    assert call_reward_function("my_rewards:length", fn, ["ab", "c"], [{}, {}]) == ([2.0, 1.0],
                                                                                   [None, None])
    picky = resolve_verifier("my_rewards:picky")
    records = [{"ground_truth": "ok", "origin": "d.jsonl:1"},
               {"ground_truth": "bad", "origin": "d.jsonl:2"}]
    # A record it raises on scores 0 and its error is returned (counted by Verifiers.score)...
    values, errors = call_reward_function("my_rewards:picky", picky, ["a", "b"], records)
    assert values == [1.0, 0.0] and errors[0] is None and isinstance(errors[1], KeyError)
    # ... but a function that raises on every record is broken: it stops the run.
    with pytest.raises(RewardFunctionError, match=r"failed on every record.*d\.jsonl:2: KeyError"):
        call_reward_function("my_rewards:picky", picky, ["b"], records[1:])
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


def test_rlvr_reader_rejects_a_ground_truth_its_verifier_cannot_read(tmp_path):
    tok = load_tokenizer("tiny", 0)
    prompt = [{"role": "user", "content": "Say 8."}]
    records = [{"messages": prompt, "ground_truth": "8", "dataset": "MATH"},
               {"messages": prompt, "ground_truth": {"answer": "8"}, "dataset": "MATH"},
               {"messages": prompt, "ground_truth": "8", "dataset": "gsm8k"}]
    path = _write(tmp_path / "mixed.jsonl", records)
    check = Verifiers("by_dataset").check_record
    with pytest.raises(DataError, match=r"^[^\n]*mixed\.jsonl:2: the math verifier expects a LaTeX "
                                        r"answer string.*got dict \{'answer': '8'\}$"):
        build_rlvr_prompts(DatasetConfig(path=path, seq_length=32, batch_size=1), tok,
                           add_bos=True, require_ground_truth=False, check_record=check)
    ds = build_rlvr_prompts(DatasetConfig(path=path, seq_length=32, batch_size=1,
                                          skip_malformed=True), tok, add_bos=True,
                            require_ground_truth=False, check_record=check)
    assert len(ds) == 2 and ds.stats["skipped_malformed"] == 1


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
    # the task is "repeat the number", verified by the gsm8k verifier (the last number).
    gsm8k = Verifiers("gsm8k")
    assert gsm8k.score([r["ground_truth"] for r in records], records)[0] == [1.0] * 500
    assert gsm8k.score(prompts, records)[0] == [1.0] * 500
    assert sum(gsm8k.score(["0"] * 500, records)[0]) < 100
