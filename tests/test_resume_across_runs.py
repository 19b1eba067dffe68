"""Resume from another run's checkpoint, with real checkpoints (slow: each trains the tiny DPO
for a step or two through ``python -m torchxla_rlhf train``).

A checkpoint's ``training_state/written_by.json`` says what wrote it: another kind of trainer
is refused before anything trains, whether or not the checkpoint records it (an older one
fails when its state does not fit, in one line); the same trainer and model from another
directory continue, the other differences recorded in ``config_changes.jsonl``. The
preemption line names the checkpoint the stop saved."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import REPO, read_metrics
from test_check_agrees import args, both_refuse, entry, files, root_logging_restored  # noqa: F401
from torchxla_rlhf.errors import EXIT_PREEMPTED, EXIT_USER_ERROR

COMMON = ["eval_dataset=null", "save_training_state=true", "save_model_freq=0"]


def dpo_args(out, *extra):
    return [a for a in args("dpo", out, *COMMON, *extra) if not a.startswith("eval_dataset.path")]


@pytest.fixture(scope="module")
def dpo_final(tmp_path_factory):
    """A DPO run of 2 steps; its ``final`` holds the training state."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    import logging

    from torchxla_rlhf.__main__ import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = main(dpo_args(out, "total_steps=2"))
    except SystemExit as e:
        code = e.code
    finally:  # the entry point configured console logging: put it back
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code in (0, None)
    return out / "final"


@pytest.mark.slow
def test_checkpoint_records_what_wrote_it(dpo_final):
    with open(dpo_final / "training_state" / "written_by.json") as f:
        meta = json.load(f)
    assert meta["trainer"] == "dpo" and meta["config_class"] == "DPOConfig"
    assert meta["models"] == ["policy (model, causal)"]
    assert meta["config"]["beta"] == 0.1 and meta["config"]["model"]["name_or_path"] == "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["reward", "grpo"])
def test_another_kind_cannot_resume_it(kind, dpo_final, tmp_path, capsys):
    out = tmp_path / "o"
    before = files(dpo_final.parent)
    both_refuse(args(kind, out, f"resume_from={dpo_final}"), capsys,
                f"written by a dpo run, this is a {kind} run", "set model.name_or_path")
    assert not out.exists() and files(dpo_final.parent) == before


@pytest.mark.slow
@pytest.mark.parametrize("kind,needle", [
    ("reward", "does not fit the model"),  # both train "model": its tensors differ
    ("grpo", "holds the state of ['model'], this run trains ['policy']"),
])
def test_a_checkpoint_without_the_record_still_cannot_train_another_kind(kind, needle, dpo_final,
                                                                         tmp_path, capsys):
    """An older checkpoint (no written_by.json), moved out of its run directory (no
    config.yaml beside it): the state's models are compared as it loads, in one line."""
    loose = tmp_path / "loose" / "final"
    shutil.copytree(dpo_final, loose)
    os.remove(loose / "training_state" / "written_by.json")
    out = tmp_path / "o"
    code, _, err = entry(args(kind, out, f"resume_from={loose}"), capsys)
    assert code == EXIT_USER_ERROR and "Traceback" not in err, err
    line = next(l for l in err.splitlines() if ": error: " in l)
    assert f"resume_from={loose}" in line and needle in line, line
    assert not out.exists() or files(out) == []  # nothing trained, nothing written


@pytest.mark.slow
def test_same_kind_from_another_directory_continues_and_records_changes(dpo_final, tmp_path,
                                                                        capsys):
    out = tmp_path / "continued"
    code, _, err = entry(dpo_args(out, "total_steps=3", "beta=0.2",
                                  f"resume_from={dpo_final}"), capsys)
    assert code in (0, None), err
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [3]  # steps 1-2 were A's
    with open(out / "config_changes.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and rows[0]["from_step"] == 3
    changes = rows[0]["changes"]
    assert changes["beta"] == [0.1, 0.2] and changes["total_steps"] == [2, 3]
    assert changes["output_dir"] == [str(dpo_final.parent), str(out)]
    # A model change is refused, naming both.
    both_refuse(dpo_args(tmp_path / "o2", "model.tiny.hidden_size=32", f"resume_from={dpo_final}"),
                capsys, "model.tiny.hidden_size=64", "this config has 32")


@pytest.mark.slow
def test_preemption_on_a_save_step_names_the_checkpoint_it_saved(tmp_path, capsys, monkeypatch):
    from torchxla_rlhf import runtime

    monkeypatch.setattr(runtime, "should_stop", lambda step: step == 2)
    out = tmp_path / "run"
    code, _, err = entry(dpo_args(out, "total_steps=4", "save_model_freq=2"), capsys)
    assert code == EXIT_PREEMPTED, err
    line = next(l for l in err.splitlines() if "preempted at step 2" in l)
    assert f"saved {out}/checkpoint-latest " in line, line
    assert (out / "checkpoint-latest" / "training_state").is_dir()
    assert not (out / "training-state-latest").exists()
