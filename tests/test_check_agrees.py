"""``--check`` and the run agree: each bad input a run refuses before its first step, the
device-free ``--check`` refuses too, with the same one line, and neither writes anything.

Every case goes through the real entry point (``python -m torchxla_rlhf train``'s ``main``, in
this process: they all fail in seconds, before any weights load). A case the run would accept
would train one step (``total_steps=1``), so a regression fails the test instead of hanging it.
Checkpoints of other runs are stand-ins: the files a resume reads before loading anything
(``_COMPLETE``, ``trainer_state.json``, ``written_by.json``), written by the real functions.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers import REPO
from torchxla_rlhf.__main__ import main
from torchxla_rlhf.errors import EXIT_USER_ERROR

CONFIGS = f"{REPO}/configs/tiny"
DATA = f"{REPO}/data/tiny"


@pytest.fixture(autouse=True)
def root_logging_restored():
    """The entry point configures console logging (``logging.basicConfig(force=True)``) on
    the stderr pytest captures for this test; put the root logger back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def args(kind: str, out, *extra: str) -> list[str]:
    data = {"grpo": ("rlvr_train", "rlvr_eval"), "dpo": ("preference_train", "preference_eval"),
            "reward": ("preference_train", "preference_eval")}[kind]
    return ["train", "--config", f"{CONFIGS}/{kind}.yaml", f"output_dir={out}",
            "logger.progress_bar=false", "total_steps=1", f"train_dataset.path={DATA}/{data[0]}.jsonl",
            f"eval_dataset.path={DATA}/{data[1]}.jsonl", *extra]


def entry(argv: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``python -m torchxla_rlhf ARGV``."""
    try:
        code = main(argv)  # the usage errors found before a trainer is chosen return
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def both_refuse(argv: list[str], capsys, *needles: str) -> tuple[str, str]:
    """The run exits 2 with one error line holding every needle and no traceback; ``--check``
    exits 2 with a FAIL line holding them. Returns (the run's line, the check's FAIL line)."""
    code, _, err = entry(argv, capsys)
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err, err
    line = next(l for l in err.splitlines() if ": error: " in l)
    code, out, err = entry([*argv, "--check"], capsys)
    assert code == EXIT_USER_ERROR, out + err
    assert "Traceback" not in out + err
    fail = next((l for l in out.splitlines() if ": FAIL: " in l), None)
    assert fail is not None, out
    for needle in needles:
        assert needle in line, (needle, line)
        assert needle in fail, (needle, fail)
    # The same message: the run's line ends with what --check's FAIL line says.
    assert line.endswith(fail.split(": FAIL: ", 1)[1]), (line, fail)
    return line, fail


def files(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


# -- reward functions ---------------------------------------------------------------------


@pytest.fixture
def reward_modules(tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "syntax_error.py").write_text("def score(c, r):\n    return [0.0 for _ in c\n")
    (mods / "fails_at_import.py").write_text("import os\nraise RuntimeError('no GPU here')\n")
    (mods / "returns_nan.py").write_text("def score(c, r):\n    return [float('nan')] * len(c)\n")
    monkeypatch.syspath_prepend(str(mods))
    return mods


@pytest.mark.parametrize("spec,needles", [
    ("no_such_module:score", ["rewards.verifier", "cannot import module 'no_such_module'"]),
    ("syntax_error:score", ["rewards.verifier", "syntax_error.py:2: SyntaxError"]),
    ("fails_at_import:score", ["rewards.verifier", "fails_at_import.py:2: RuntimeError: no GPU here"]),
    ("returns_nan:score", ["reward function returns_nan:score returned nan for record",
                           "rlvr_train.jsonl:1"]),
])
def test_reward_functions(spec, needles, reward_modules, tmp_path, capsys):
    out = tmp_path / "o"
    both_refuse(args("grpo", out, f"rewards.verifier={spec}"), capsys, *needles)
    assert not out.exists()


# -- resume from another run's checkpoint -----------------------------------------------------


def stand_in_checkpoint(path, kind: str, *overrides: str) -> str:
    """A complete checkpoint with a training state, as a ``kind`` run (config ``overrides``)
    leaves it: what a resume reads before loading any tensor."""
    from torchxla_rlhf.checkpoint import COMPLETE_MARKER, write_json
    from torchxla_rlhf.checkpoint.state import STATE_DIR, TRAINER_STATE
    from torchxla_rlhf.run_dir import WRITTEN_BY_FILE, written_by
    from torchxla_rlhf.trainers import registry

    cfg = registry.load(f"{CONFIGS}/{kind}.yaml", [f"output_dir={os.path.dirname(path)}",
                                                   "model.name_or_path=tiny", *overrides])
    os.makedirs(f"{path}/{STATE_DIR}")
    write_json(f"{path}/{STATE_DIR}/{TRAINER_STATE}", {"step": 8, "total_steps": 8, "data": {}})
    write_json(f"{path}/{STATE_DIR}/{WRITTEN_BY_FILE}", written_by(cfg))
    with open(f"{path}/{COMPLETE_MARKER}", "w") as f:
        f.write("1\n")
    return str(path)


@pytest.mark.parametrize("kind,source,needles", [
    # The case: GRPO given a PPO run's final, from another directory.
    ("grpo", "ppo", ["written by a ppo run, this is a grpo run", "model.name_or_path"]),
    ("reward", "dpo", ["written by a dpo run, this is a reward run"]),
    ("dpo", "reward", ["written by a reward run, this is a dpo run"]),
])
def test_resume_from_another_kind_is_refused_before_anything_loads(kind, source, needles,
                                                                  tmp_path, capsys):
    ckpt = stand_in_checkpoint(tmp_path / "other" / "final", source,
                               *(["reward_model.name_or_path=tiny"] if source == "ppo" else []))
    before = files(tmp_path / "other")
    out = tmp_path / "o"
    both_refuse(args(kind, out, f"resume_from={ckpt}"), capsys, f"resume_from={ckpt}", *needles)
    assert not out.exists() and files(tmp_path / "other") == before


def test_resume_from_another_model_names_both(tmp_path, capsys):
    ckpt = stand_in_checkpoint(tmp_path / "other" / "checkpoint-latest", "dpo",
                               "model.tiny.hidden_size=32")
    both_refuse(args("dpo", tmp_path / "o", f"resume_from={ckpt}"), capsys,
                "model.tiny.hidden_size=32", "this config has 64")


def test_resume_from_the_same_kind_elsewhere_passes_the_check_and_records_changes(tmp_path, capsys):
    """Same trainer, same model, other settings: --check passes and says what will be
    recorded (the run itself is the slow test in test_resume_across_runs.py)."""
    ckpt = stand_in_checkpoint(tmp_path / "other" / "final", "dpo", "beta=0.2")
    code, out, err = entry([*args("dpo", tmp_path / "o", f"resume_from={ckpt}"), "--check"], capsys)
    assert code == 0, out + err
    line = next(l for l in out.splitlines() if l.startswith("resume_from: ok: "))
    assert ckpt in line and "other key(s) differ, recorded in config_changes.jsonl" in line


def test_a_weights_only_start_from_another_kinds_checkpoint_is_a_model_path(tmp_path, capsys):
    """GRPO from a DPO run's exported policy: model.name_or_path, not resume_from."""
    from transformers import LlamaForCausalLM

    from torchxla_rlhf.configs.sections import ModelConfig
    from torchxla_rlhf.models.llama import tiny_llama_config

    policy = tmp_path / "dpo" / "final"
    LlamaForCausalLM(tiny_llama_config(ModelConfig().tiny)).save_pretrained(policy)
    code, out, err = entry([*args("grpo", tmp_path / "o", f"model.name_or_path={policy}"),
                            "--check"], capsys)
    assert code == 0, out + err
    assert "resume_from: ok: no resume_from" in out


# -- files and directories ----------------------------------------------------------------------


def test_tokenizer_directory_without_tokenizer_files(tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "config.json").write_text("{}")
    both_refuse(args("dpo", tmp_path / "o", f"tokenizer={tok}"), capsys,
                f"tokenizer: directory '{tok}' holds no tokenizer files", "tokenizer.json",
                "it holds config.json")


@pytest.mark.parametrize("content,needle", [
    (b"", "run.lock is empty, not a lock a run wrote"),
    (b"\x00garbage", "run.lock holds '\\x00garbage', not a lock a run wrote"),
    (b"[1, 2]", "run.lock holds '[1, 2]', not a lock a run wrote"),
    (b'{"pid": 1}', "not a lock a run wrote (JSON with host, pid, run_id)"),
])
def test_lock_content_is_validated(content, needle, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.lock").write_bytes(content)
    line, _ = both_refuse(args("dpo", out), capsys, needle, f"delete {out}/run.lock")
    assert "retry" not in line
    assert (out / "run.lock").read_bytes() == content and files(out) == ["run.lock"]


def test_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "o"
    out.write_text("x")
    both_refuse(args("dpo", out), capsys, f"output_dir {out}: exists and is not a directory")
    assert out.read_text() == "x"


# -- config files -----------------------------------------------------------------------------


@pytest.mark.parametrize("body,needles", [
    ("x: &a [*a]\n", ["bad.yaml:2", "'x': an alias refers to a node that contains it"]),
    ("model: &m\n  <<: *m\n", ["bad.yaml:2", "'model.<<': an alias refers to a node"]),
    ("model:\n  tiny: &t {a: [*t]}\n", ["bad.yaml:3", "'model.tiny.a': an alias"]),
    ("[a, b]: 1\n", ["bad.yaml:2", "a key is a sequence; keys must be plain names"]),
    ("model:\n  ? {a: 1}\n  : 2\n", ["bad.yaml:3", "a key under 'model' is a mapping"]),
])
def test_yaml_that_cannot_be_a_config(body, needles, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS}/dpo.yaml\n{body}")
    for action in ([], ["--check"], ["--print-config"]):
        code, _, err = entry(["train", "--config", str(bad), *action], capsys)
        assert code == EXIT_USER_ERROR and "Traceback" not in err, err
        line = next(l for l in err.splitlines() if ": error: " in l)
        assert all(n in line for n in needles), (needles, line)


def test_yaml_merge_keys_and_aliases_still_work(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(f"base: {CONFIGS}/dpo.yaml\n"
                    f"train_dataset: &d\n  path: {DATA}/preference_train.jsonl\n  seq_length: 96\n"
                    "eval_dataset:\n  <<: *d\n  path: *p\n"
                    .replace("path: *p", f"path: &p {DATA}/preference_eval.jsonl"))
    code, out, err = entry(["train", "--config", str(good), "--print-config"], capsys)
    assert code == 0, err
    assert out.count("seq_length: 96") == 2 and "preference_eval.jsonl" in out


# -- plan's numeric flags -----------------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (["--devices", "-4"], "argument --devices: expected a whole number of devices >= 1, got '-4'"),
    (["--devices", "0"], "argument --devices: expected a whole number of devices >= 1, got '0'"),
    (["--devices", "2.5"], "got '2.5'"),
    (["--hbm-gib", "-5"], "argument --hbm-gib: expected a finite number of GiB > 0, got '-5'"),
    (["--hbm-gib", "nan"], "got 'nan'"),
    (["--hbm-gib", "inf"], "got 'inf'"),
    (["--devices", "1", "--hbm-gib", "0"], "got '0'"),
])
def test_plan_numeric_flags_are_usage_errors(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", f"{CONFIGS}/dpo.yaml", *flags])
    out, err = capsys.readouterr()
    assert e.value.code == EXIT_USER_ERROR and out == "", out
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_plan_with_valid_flags_still_plans(capsys):
    code = main(["plan", "--config", f"{CONFIGS}/dpo.yaml", "--devices", "1", "--hbm-gib", "16"])
    assert code == 0 and "FITS" in capsys.readouterr().out
