"""User errors from the command line: every user error is one line and exit 2, nothing another
run wrote is touched, a preempted run exits 75, and the data report is printed.

Most cases go through ``cli_main`` in this process (they fail before any training, in
seconds); the two that need a fresh interpreter (logging set-up, a real SIGTERM) run one.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO
from torchxla_rlhf.errors import EXIT_PREEMPTED, EXIT_USER_ERROR

DATA = f"{REPO}/data/tiny"
CONFIGS = f"{REPO}/configs/tiny"


def dpo_cli(argv):
    from torchxla_rlhf.configs.loader import cli_main
    from torchxla_rlhf.configs.dpo import DPOConfig
    from torchxla_rlhf.dpo import main

    return cli_main(DPOConfig, main, argv=argv, prog="dpo")


def reward_cli(argv):
    from torchxla_rlhf.configs.loader import cli_main
    from torchxla_rlhf.configs.reward import RewardConfig
    from torchxla_rlhf.reward import main

    return cli_main(RewardConfig, main, argv=argv, prog="reward")


def tiny_args(out, *extra):
    return ["--config", f"{CONFIGS}/dpo.yaml", f"output_dir={out}", "logger.progress_bar=false",
            f"train_dataset.path={DATA}/preference_train.jsonl",
            f"eval_dataset.path={DATA}/preference_eval.jsonl", *extra]


def fails(cli, argv, capsys, *needles):
    """Run, expect exit 2 with one error line containing every needle and no traceback."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == EXIT_USER_ERROR, err
    assert "Traceback" not in err, err
    # One message: a line, or for the start-up checks a line and one line per failed check.
    line = err[err.index(": error: "):].split("\n(--debug")[0]
    for needle in needles:
        assert needle in line, (needle, err)
    return line


def snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def test_data_errors_name_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": [{"role": "user", "content": "x"},
                                          {"role": "assistant", "content": "y"}]}) + "\n")
    fails(dpo_cli, tiny_args(tmp_path / "o", f"train_dataset.path={bad}"), capsys,
          f"{bad}:1", "rejected")
    fails(dpo_cli, tiny_args(tmp_path / "o", f"train_dataset.path={tmp_path}/missing.jsonl"), capsys,
          "missing.jsonl")
    assert not (tmp_path / "o").exists()  # nothing written for a run that never started


def test_mesh_error_is_one_line(tmp_path, capsys):
    fails(dpo_cli, tiny_args(tmp_path / "o", "mesh_dim=3,3,3"), capsys, "mesh_dim='3,3,3'", "1,1,1")


def test_bad_model_paths(tmp_path, capsys, monkeypatch):
    fails(dpo_cli, tiny_args(tmp_path / "o", f"model.name_or_path={tmp_path}/nowhere"), capsys,
          "nowhere")
    model = tmp_path / "corrupt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "vocab_size": 259}))
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    fails(dpo_cli, tiny_args(tmp_path / "o2", f"model.name_or_path={model}"), capsys,
          str(model / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fails(dpo_cli, tiny_args(tmp_path / "o3", "model.name_or_path=nobody/no-such-model"), capsys,
          "nobody/no-such-model", "HF_HUB_OFFLINE")


def test_remote_url_fails_fast(tmp_path, capsys):
    t0 = time.perf_counter()
    fails(dpo_cli, tiny_args(tmp_path / "o", "train_dataset.path=gs://no-such-bucket-xyz/d.jsonl",
                             "remote_timeout_s=3"), capsys, "train_dataset.path=gs://no-such-bucket-xyz/d.jsonl")
    assert time.perf_counter() - t0 < 30


def test_unwritable_output_dir_and_bad_resume(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(dpo_cli, tiny_args(blocker / "run"), capsys, str(blocker), "is a file")
    fails(dpo_cli, tiny_args(tmp_path / "o", f"resume_from={tmp_path}/no-checkpoint"), capsys,
          "no-checkpoint")


def test_override_errors_name_the_override(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dpo_cli(tiny_args(tmp_path / "o", "beta=abc"))
    err = capsys.readouterr().err
    assert e.value.code == EXIT_USER_ERROR and "beta" in err and "Traceback" not in err


def test_mostly_dropped_data_shows_the_report(tmp_path, capsys):
    line = fails(dpo_cli, tiny_args(tmp_path / "o", "train_dataset.seq_length=40",
                                    "eval_dataset=null"), capsys,
                 "train_dataset", "were dropped", "would keep 95 %")
    assert "no_loss_token" in line and "read " in line


@pytest.mark.slow
def test_a_run_never_overwrites_another(tmp_path, capsys):
    """A finished reward-model run's directory survives a DPO run pointed at it, and a typo
    in a data path does not overwrite its config.yaml."""
    rm = tmp_path / "rm"
    reward_cli(["--config", f"{CONFIGS}/reward.yaml", f"output_dir={rm}", "logger.progress_bar=false",
                f"train_dataset.path={DATA}/preference_train.jsonl", "eval_dataset=null",
                "total_steps=2"])
    before = snapshot(rm)
    assert "config.yaml" in before and any(k.startswith("final") for k in before)
    fails(dpo_cli, tiny_args(rm), capsys, "RewardConfig", "DPOConfig", "overwrite_output_dir")
    typo = ["--config", f"{CONFIGS}/reward.yaml", f"output_dir={rm}", f"train_dataset.path={DATA}/typo.jsonl"]
    fails(reward_cli, typo, capsys, "RewardConfig run with another config", "resume_from=auto")
    fails(reward_cli, typo + ["overwrite_output_dir=true"], capsys, "typo.jsonl")
    assert snapshot(rm) == before


@pytest.mark.slow
def test_cli_prints_data_report_and_exits_75_on_sigterm(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchxla_rlhf.dpo", *tiny_args(out, "total_steps=500", "logger.log_freq=1",
                                                                "save_training_state=true")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "train_dataset: read " in output and "kept " in output and "untruncated tokens p50" in output
    assert "preempted at step" in output and "resume_from=auto" in output
    assert (out / "training-state-latest").exists() and not (out / "final").exists()
    report = [json.loads(l) for l in open(out / "data_report.jsonl")]
    assert [r["dataset"] for r in report] == ["train_dataset", "eval_dataset"] and report[0]["kept"] > 0


def pipeline(root, *extra):
    from torchxla_rlhf.__main__ import main

    return main(["pipeline", "--configs", CONFIGS, "--output-root", str(root),
                 "dpo.logger.progress_bar=false", "reward.logger.progress_bar=false",
                 "ppo.logger.progress_bar=false", *extra])


def test_pipeline_checks_every_stage_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the tiny configs' data paths are relative to the repository
    fails(lambda argv: pipeline(tmp_path / "p", "ppo.train_dataset.path=data/tiny/nope.jsonl"), [],
          capsys, "nope.jsonl")
    assert not (tmp_path / "p" / "dpo").exists()  # DPO never started


@pytest.mark.slow
def test_pipeline_stops_on_preemption_and_resumes(tmp_path, monkeypatch):
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    monkeypatch.chdir(REPO)
    root = tmp_path / "p"
    short = ["dpo.total_steps=3", "dpo.save_training_state=true", "dpo.eval_dataset=null", "dpo.logger.log_freq=1",
             "reward.total_steps=2", "reward.eval_dataset=null", "ppo.total_steps=1"]
    original = DPOTrainer.train_step

    def step_then_sigterm(self):
        metrics = original(self)
        if self.step == 1:  # during the 2nd update
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(DPOTrainer, "train_step", step_then_sigterm)
    with pytest.raises(SystemExit) as e:
        pipeline(root, *short)
    assert e.value.code == EXIT_PREEMPTED
    assert (root / "dpo" / "training-state-latest").exists() and not (root / "reward").exists()
    monkeypatch.setattr(DPOTrainer, "train_step", original)
    assert pipeline(root, "--resume", *short) == 0
    for stage in ("dpo", "reward", "ppo"):
        assert (root / stage / "final" / "_COMPLETE").exists(), stage
    rows = [json.loads(l) for l in open(root / "dpo" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # resumed at 3, not redone
