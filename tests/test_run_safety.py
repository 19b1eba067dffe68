"""Nothing silently wrong, nothing raced, from the command line: non-finite values, one writer
per output_dir, models checked for their role, honest overwrite and resume, Ctrl-C, and the
failures of a running job (exit 1) told apart from the user's mistakes (exit 2).

The default tier covers what fails before training (in this process, through ``cli_main``);
what trains or needs a fresh interpreter is ``slow``.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import fsspec
import pytest
import yaml

from helpers import REPO
from test_cli_errors import CONFIGS, DATA, dpo_cli, fails, snapshot, tiny_args
from torchxla_rlhf import run_dir
from torchxla_rlhf.errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR,
                                  OutputDirError, RunFailure, failure_during, run_guarded)


def ppo_cli(argv):
    from torchxla_rlhf.configs.loader import cli_main
    from torchxla_rlhf.configs.ppo import PPOConfig
    from torchxla_rlhf.ppo import main

    return cli_main(PPOConfig, main, argv=argv, prog="ppo")


# ---------------------------------------------------------------------------------------------
# Hyperparameters are finite; config and data files that are not text


def test_non_finite_hyperparameters_are_refused_at_start(tmp_path, capsys):
    for text in ("optimizer.lr=.nan", "optimizer.lr=1e400", "beta=inf", "beta=nan",
                 "optimizer.eps=-.inf"):
        key = text.split("=")[0]
        fails(dpo_cli, tiny_args(tmp_path / "o", text), capsys, f"'{key}'", "finite", text)
    ppo = tmp_path / "ppo.yaml"
    ppo.write_text(f"base: {CONFIGS}/ppo.yaml\nlr: .inf\n")
    fails(ppo_cli, ["--config", str(ppo)], capsys, f"{ppo}:2", "'lr'", "finite")
    fails(ppo_cli, ["--config", f"{CONFIGS}/ppo.yaml", "gamma=1.5"], capsys, "gamma", "[0, 1]")
    assert not (tmp_path / "o").exists()


def test_config_that_is_a_directory_or_not_utf8(tmp_path, capsys):
    fails(dpo_cli, ["--config", str(tmp_path)], capsys, str(tmp_path), "is a directory")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"beta: 0.1\n# caf\xe9\n")
    fails(dpo_cli, ["--config", str(bad)], capsys, str(bad), "not UTF-8", "byte offset 15")


def test_data_file_not_utf8_names_line_and_byte_offset(tmp_path, capsys):
    good = open(f"{DATA}/preference_train.jsonl", "rb").read().splitlines(keepends=True)
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(good[0] + b'{"chosen": "caf\xe9"}\n' + b"".join(good[1:200]))
    offset = len(good[0]) + len(b'{"chosen": "caf')
    fails(dpo_cli, tiny_args(tmp_path / "o", f"train_dataset.path={bad}", "eval_dataset=null"),
          capsys, f"{bad}:2", "not UTF-8", f"byte offset {offset}")
    # With skip_malformed the line is skipped and counted like a malformed JSON line.
    from torchxla_rlhf.configs.data import DatasetConfig
    from torchxla_rlhf.data.sources import SourceStats, iter_records

    stats = SourceStats()
    rows = list(iter_records(DatasetConfig(path=str(bad), skip_malformed=True), stats))
    assert len(rows) == 200 and stats["skipped_malformed"] == 1
    assert not (tmp_path / "o").exists()


def test_hub_dataset_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fails(dpo_cli, tiny_args(tmp_path / "o", "train_dataset.path=null",
                             "train_dataset.hf_name=nobody/no-such-pairs", "eval_dataset=null"),
          capsys, "nobody/no-such-pairs", "OFFLINE")


def test_errors_a_config_can_trigger_name_the_key(tmp_path, capsys):
    fails(dpo_cli, tiny_args(tmp_path / "o", "num_epochs=0.0001", "eval_dataset=null"), capsys,
          "num_epochs", "total_steps")
    fails(dpo_cli, tiny_args(tmp_path / "o", "tokenizer_pad_token_id=100000"), capsys,
          "tokenizer_pad_token_id=100000", "outside the vocabulary")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# The error boundary: the user's mistakes exit 2, failures of the run exit 1


def test_run_guarded_tells_failures_from_user_errors(capsys):
    def raising(e):
        def fn():
            raise e
        return fn

    cases = [(FileNotFoundError(2, "No such file or directory", "/x/y"), EXIT_USER_ERROR, "error"),
             (RunFailure("saving checkpoint /o/final failed: disk"), EXIT_FAILURE, "failed"),
             (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted")]
    for exc, code, word in cases:
        with pytest.raises(SystemExit) as e:
            run_guarded(raising(exc), "prog", debug=False)
        err = capsys.readouterr().err
        assert e.value.code == code and f"prog: {word}" in err and "Traceback" not in err, err
        with pytest.raises(type(exc)):  # --debug: the exception itself, with its traceback
            run_guarded(raising(exc), "prog", debug=True)
    with pytest.raises(RunFailure, match=r"saving checkpoint /o/ck failed: No space left on "
                                         r"device: /o/ck/model.safetensors; .*resume_from=auto"):
        with failure_during("saving checkpoint", "/o/ck"):
            raise OSError(errno.ENOSPC, "No space left on device", "/o/ck/model.safetensors")


# ---------------------------------------------------------------------------------------------
# One writer per output_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_the_holder_and_is_released(tmp_path):
    out = str(tmp_path / "run")
    lock = run_dir.acquire_lock(out, takeover_stale=False)
    holder = json.loads(open(f"{out}/run.lock").read())
    assert holder["pid"] == os.getpid() and holder["run_id"] == lock.holder["run_id"]
    with pytest.raises(OutputDirError, match=rf"in use by run {holder['run_id']} \(pid "
                                             rf"{os.getpid()} on host .*started"):
        run_dir.acquire_lock(out, takeover_stale=True)  # a live holder is never taken over
    lock.release()
    assert not os.path.exists(out)  # it created the directory and left nothing in it


def test_stale_lock_is_reported_with_how_to_clear_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("# resolved DPOConfig\n")
    stale = {"host": __import__("socket").gethostname(), "pid": _dead_pid(), "boot_id": "",
             "started": "2026-01-01T00:00:00", "run_id": "deadbeef"}
    (out / "run.lock").write_text(json.dumps(stale))
    with pytest.raises(OutputDirError, match=r"left by run deadbeef .*no longer running; .*"
                                             r"delete .*run.lock"):
        run_dir.acquire_lock(str(out), takeover_stale=False)
    lock = run_dir.acquire_lock(str(out), takeover_stale=True)  # a relaunch with resume_from
    assert json.loads((out / "run.lock").read_text())["run_id"] == lock.holder["run_id"]
    lock.release()
    assert sorted(os.listdir(out)) == ["config.yaml"]  # its own directory is kept


def test_lock_on_an_object_store_has_one_winner():
    """memory:// stands in for gs://: the lock is created with an exclusive-create
    precondition, so of many simultaneous takers exactly one wins."""
    fs = fsspec.filesystem("memory")
    url = "memory://bucket/lock-race"
    if fs.exists(url):
        fs.rm(url, recursive=True)
    won, lost, start = [], [], threading.Barrier(8)

    def take():
        start.wait()
        try:
            won.append(run_dir.acquire_lock(url, takeover_stale=False))
        except OutputDirError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and len(lost) == 7 and all("in use by run" in m for m in lost)
    won[0].release()
    assert not fs.exists(f"{url}/run.lock")


def test_cli_refuses_an_output_dir_in_use(tmp_path, capsys):
    out = tmp_path / "o"
    lock = run_dir.acquire_lock(str(out), takeover_stale=False)
    before = snapshot(out)
    fails(dpo_cli, tiny_args(out), capsys, f"output_dir {out} is in use by run "
          f"{lock.holder['run_id']}", f"pid {os.getpid()}")
    assert snapshot(out) == before
    lock.release()


# ---------------------------------------------------------------------------------------------
# Resume records changes; overwrite and a run without checkpoint start over


def _config(out, *overrides):
    from helpers import tiny_config
    from torchxla_rlhf.configs.dpo import DPOConfig

    return tiny_config(DPOConfig, "dpo", str(out), *overrides)


def test_resume_refuses_data_changes_and_records_the_others(tmp_path):
    from torchxla_rlhf.configs.loader import to_dict

    out = tmp_path / "run"
    first = _config(out)
    assert run_dir.check_output_dir(str(out), "DPOConfig", to_dict(first), False, False) == "new"
    run_dir.record_config(str(out), first, "new", 0)
    (out / "checkpoint-latest").mkdir()
    written = (out / "config.yaml").read_bytes()

    longer = _config(out, "resume_from=auto", "optimizer.lr=1e-4", "total_steps=9")
    assert run_dir.check_output_dir(str(out), "DPOConfig", to_dict(longer), True, False) == "resume"
    run_dir.record_config(str(out), longer, "resume", 4)
    assert (out / "config.yaml").read_bytes() == written  # the run's record is kept
    rows = [json.loads(l) for l in open(out / "config_changes.jsonl")]
    assert rows == [{"from_step": 5, "changes": {"optimizer.lr": [first.optimizer.lr, 1e-4],
                                                  "total_steps": [None, 9]}}]
    # The next resume compares with the values in force now: nothing new to record.
    run_dir.record_config(str(out), longer, "resume", 7)
    assert len(open(out / "config_changes.jsonl").readlines()) == 1

    shorter = _config(out, "resume_from=auto", "train_dataset.seq_length=96")
    with pytest.raises(OutputDirError, match=r"train_dataset.seq_length was 128 .* has 96"):
        run_dir.check_output_dir(str(out), "DPOConfig", to_dict(shorter), True, False)


def test_overwrite_and_a_run_without_checkpoint_start_over(tmp_path):
    from torchxla_rlhf.configs.loader import to_dict

    out = tmp_path / "run"
    cfg = _config(out)
    run_dir.record_config(str(out), cfg, "new", 0)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "reference_logps_train.npz").write_bytes(b"cache")
    other = _config(out, "beta=0.3")
    # No checkpoint: the earlier run failed before its first one; a corrected rerun replaces it.
    assert run_dir.check_output_dir(str(out), "DPOConfig", to_dict(other), False, False) == "replace"
    (out / "final").mkdir()
    with pytest.raises(OutputDirError, match="another config"):
        run_dir.check_output_dir(str(out), "DPOConfig", to_dict(other), False, False)
    assert run_dir.check_output_dir(str(out), "DPOConfig", to_dict(other), False, True) == "replace"
    before = snapshot(out)
    run_dir.record_config(str(out), other, "replace", 0)
    aside = [n for n in os.listdir(out) if n.startswith("replaced-")]
    assert len(aside) == 1
    assert sorted(os.listdir(out)) == sorted([aside[0], "config.yaml", "reference_logps_train.npz"])
    moved = snapshot(out / aside[0])
    assert moved == {k: v for k, v in before.items() if k != "reference_logps_train.npz"}
    assert "beta: 0.3" in (out / "config.yaml").read_text()
    # The same config with overwrite starts over too; a relaunch adding resume_from continues.
    (out / "final").mkdir()
    assert run_dir.check_output_dir(str(out), "DPOConfig", to_dict(other), False, True) == "replace"
    assert run_dir.check_output_dir(str(out), "DPOConfig", to_dict(other), True, True) == "resume"


# ---------------------------------------------------------------------------------------------
# Models checked for their role


def _save_tiny(path, cls_name):
    import transformers

    from torchxla_rlhf.configs.sections import TinyModelConfig
    from torchxla_rlhf.models.llama import tiny_llama_config

    config = tiny_llama_config(TinyModelConfig(), pad_token_id=0)
    if cls_name == "LlamaForSequenceClassification":
        config.num_labels = 1
    getattr(transformers, cls_name)(config).save_pretrained(path)
    return str(path)


def test_models_are_checked_for_their_role(tmp_path, capsys):
    rm = _save_tiny(tmp_path / "rm", "LlamaForSequenceClassification")
    lm = _save_tiny(tmp_path / "lm", "LlamaForCausalLM")
    fails(dpo_cli, tiny_args(tmp_path / "o", f"model.name_or_path={rm}", "tokenizer=tiny",
                             "eval_dataset=null"),
          capsys, rm, "sequence classifier", "cannot be a policy", "LlamaForCausalLM")
    args = ["--config", f"{CONFIGS}/ppo.yaml", f"output_dir={tmp_path}/p", "logger.progress_bar=false",
            f"train_dataset.path={DATA}/prompts.jsonl", f"model.name_or_path={lm}"]
    fails(ppo_cli, [*args, f"reward_model.name_or_path={lm}"], capsys,
          lm, "reward model needs a trained score head", "python -m torchxla_rlhf.reward")
    fails(ppo_cli, [*args, f"reward_model.name_or_path={rm}", f"model.name_or_path={rm}"], capsys,
          "cannot be a policy")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_value_model_from_a_causal_lm_says_so(tmp_path, caplog):
    from torchxla_rlhf import runtime
    from torchxla_rlhf.models import llama
    from torchxla_rlhf.configs.sections import ModelConfig

    lm = _save_tiny(tmp_path / "lm", "LlamaForCausalLM")
    mesh = runtime.make_mesh("1,1,1")
    with caplog.at_level("WARNING", logger="torchxla_rlhf.models.llama"):
        value = llama.load_sequence_classifier(ModelConfig(name_or_path=lm), mesh)
    assert tuple(value.score.weight.shape) == (1, 64)
    assert any("the value model starts from a causal LM: its score head is new" in r.message
               for r in caplog.records), caplog.text


# ---------------------------------------------------------------------------------------------
# Runs (slow): two at once, non-finite stop, Ctrl-C, resume/overwrite, failures mid-run


def _cli_proc(out, *extra, module="torchxla_rlhf.dpo"):
    env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-m", module, *tiny_args(out, *extra)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_runs_into_one_output_dir_exactly_one_runs(tmp_path):
    out = tmp_path / "o"
    procs = [_cli_proc(out, "total_steps=2", "eval_dataset=null", "logger.log_freq=1")
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, EXIT_USER_ERROR], [r[1][-2000:] for r in results]
    loser = next(text for code, text in results if code == EXIT_USER_ERROR)
    assert f"output_dir {out} is in use by run" in loser and "Traceback" not in loser
    assert (out / "final" / "_COMPLETE").exists() and not (out / "run.lock").exists()
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if '"loss"' in l] == [1, 2]


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "o"
    # lr 1e12: step 1 is finite (huge weights), step 2's loss and gradient are not.
    args = ("total_steps=6", "save_model_freq=1", "eval_dataset=null", "optimizer.lr=1e12",
            "optimizer.warmup_ratio=0", "logger.log_freq=3")
    proc = _cli_proc(out, *args)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_FAILURE, text[-3000:]
    line = [l for l in text.splitlines() if ": failed: " in l]
    assert len(line) == 1 and "Traceback" not in text, text[-3000:]
    assert "at step 2" in line[0] and f"last good checkpoint is {out}/checkpoint-latest (step 1)" \
        in line[0], line
    assert not (out / "final").exists()
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-latest" / "model.safetensors")
    assert all(bool(t.float().isfinite().all()) for t in weights.values())
    debug = _cli_proc(tmp_path / "d", *args, "--debug")
    text, _ = debug.communicate(timeout=600)
    assert debug.returncode != 0 and "Traceback" in text and "NonFiniteError" in text


@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_then_stops_a_second_stops_at_once(tmp_path, presses):
    out = tmp_path / "o"
    proc = _cli_proc(out, "total_steps=500", "eval_dataset=null", "save_training_state=true",
                     "logger.log_freq=1")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(open(metrics).readlines()) >= 2):
        time.sleep(0.2)
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    text, _ = proc.communicate(timeout=300)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    if presses == 1:
        assert proc.returncode == EXIT_PREEMPTED, text[-3000:]
        assert "resume_from=auto" in text and (out / "training-state-latest" / "_COMPLETE").exists()
    else:
        assert proc.returncode in (EXIT_INTERRUPTED, EXIT_PREEMPTED), text[-3000:]
    leftovers = [n for n in os.listdir(out) if ".tmp" in n or ".old" in n]
    assert not leftovers and not (out / "run.lock").exists()
    for name in os.listdir(out):  # whatever was published is complete
        if name.startswith(("checkpoint-", "training-state-", "final")):
            assert (out / name / "_COMPLETE").exists()


@pytest.mark.slow
def test_resume_overwrite_and_failures_mid_run(tmp_path, capsys, monkeypatch):
    from torchxla_rlhf.checkpoint import hf_export as checkpoint
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    out = tmp_path / "o"
    base = ("eval_dataset=null", "save_training_state=true", "save_model_freq=1")
    dpo_cli(tiny_args(out, "total_steps=2", *base))
    run1 = snapshot(out)
    run1_lr = yaml.safe_load(run1["config.yaml"])["optimizer"]["lr"]

    # Resuming with another seq_length is refused naming the key and both values.
    fails(dpo_cli, tiny_args(out, "total_steps=3", "resume_from=auto",
                             "train_dataset.seq_length=96", *base),
          capsys, "train_dataset.seq_length was 128", "has 96")
    assert snapshot(out) == run1

    # A full disk during the next save names the path; the previous checkpoint is intact.
    real = checkpoint._DirWriter.write_safetensors

    def full_disk(self, name, tensors):
        raise OSError(errno.ENOSPC, "No space left on device", f"{self.staging}/{name}")

    monkeypatch.setattr(checkpoint._DirWriter, "write_safetensors", full_disk)
    with pytest.raises(SystemExit) as e:
        dpo_cli(tiny_args(out, "total_steps=3", "resume_from=auto", "optimizer.lr=1e-4", *base))
    err = capsys.readouterr().err
    assert e.value.code == EXIT_FAILURE and "Traceback" not in err, err
    assert f"saving a checkpoint in {out} failed: No space left on device: {out}/" in err
    assert "resume_from=auto" in err
    after = snapshot(out)
    published = ("checkpoint-latest/", "final/")
    assert {k: v for k, v in after.items() if k.startswith(published)} == \
        {k: v for k, v in run1.items() if k.startswith(published)}
    monkeypatch.setattr(checkpoint._DirWriter, "write_safetensors", real)

    # Resuming with a new learning rate is recorded per step range, config.yaml kept.
    dpo_cli(tiny_args(out, "total_steps=3", "resume_from=auto", "optimizer.lr=1e-4", *base))
    assert (out / "config.yaml").read_bytes() == run1["config.yaml"]
    changes = [json.loads(l) for l in open(out / "config_changes.jsonl")]
    # final/ holds step 2's training state: the change runs from step 3.
    assert changes == [{"from_step": 3, "changes": {
        "optimizer.lr": [run1_lr, 1e-4], "total_steps": [2, 3]}}]

    # overwrite_output_dir starts over: nothing of the old run can be resumed or appended to.
    dpo_cli(tiny_args(out, "total_steps=1", "overwrite_output_dir=true", "beta=0.2", *base))
    aside = [n for n in os.listdir(out) if n.startswith("replaced-")]
    assert len(aside) == 1 and (out / aside[0] / "checkpoint-latest").exists()
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if '"loss"' in l] == [1]
    assert not (out / "config_changes.jsonl").exists()

    # A run that fails at its first step (exit 1) leaves the directory to a corrected rerun.
    fresh = tmp_path / "f"

    def broken_step(self):
        raise OSError(errno.EIO, "Input/output error", "/dev/xla0")

    monkeypatch.setattr(DPOTrainer, "train_step", broken_step)
    with pytest.raises(SystemExit) as e:
        dpo_cli(tiny_args(fresh, "total_steps=1", "eval_dataset=null"))
    err = capsys.readouterr().err
    assert e.value.code == EXIT_FAILURE and "training failed at step 1" in err and "/dev/xla0" in err
    monkeypatch.undo()
    dpo_cli(tiny_args(fresh, "total_steps=1", "eval_dataset=null", "beta=0.2"))
    assert (fresh / "final" / "_COMPLETE").exists()
