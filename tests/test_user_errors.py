"""User errors, the library side: data report, output_dir ownership, remote probes, cache keys,
the error boundary. (The command-line cases are in test_cli_errors.py.)"""

import dataclasses
import json
import os
import time
import uuid

import fsspec
import numpy as np
import pytest

from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data import DataError, PreferenceDataset, PromptDataset
from torchxla_rlhf.data.report import DataReport
from torchxla_rlhf.errors import (
    EXIT_PREEMPTED, EXIT_USER_ERROR, OutputDirError, Preempted, RemoteError, call_with_timeout,
    one_line, run_guarded,
)
from torchxla_rlhf.run_dir import check_output_dir, config_differences
from torchxla_rlhf.data.tokenizers import build_tiny_tokenizer, tokenizer_fingerprint


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def mem_file(records) -> str:
    path = f"memory://errs-{uuid.uuid4().hex}/set.jsonl"
    with fsspec.open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# -- data report -------------------------------------------------------------------------


def test_report_counts_percentiles_and_suggestion():
    r = DataReport("train", 10, kept=3, truncated_kept=1,
                   dropped={"no_loss_token": 1, "truncated": 0, "malformed": 1},
                   lengths=np.array([4, 6, 8, 12, 30]))
    assert r.read == 5 and r.dropped_fraction == pytest.approx(0.4)
    assert r.length_to_keep(0.95) == 30 and r.length_to_keep(0.6) == 8 and r.length_to_keep(0.2) == 4
    text = "\n".join(r.lines())
    assert "read 5, kept 3 (1 truncated to seq_length=10)" in text
    assert "malformed 1, no_loss_token 1" in text and "p50 8" in text
    row = dict(zip(DataReport.COLUMNS, r.row()))
    assert row["kept"] == 3 and row["dropped_no_loss_token"] == 1 and row["seq_length_for_95pct"] == 30
    r.check(0.5)  # 40 % dropped: fine
    with pytest.raises(DataError, match=r"40% of the records were dropped .*seq_length=30 would keep 95 %"):
        r.check(0.3)


def test_preference_build_reports_and_refuses_mostly_dropped(tok):
    long_prompt = "x" * 60
    path = mem_file([{"chosen": [U("hi"), A("yo")], "rejected": [U("hi"), A("no")]}]
                    + [{"chosen": [U(long_prompt), A("a")], "rejected": [U(long_prompt), A("b")]}] * 3)
    with pytest.raises(DataError) as e:
        PreferenceDataset.build(DatasetConfig(path=path, seq_length=40), tok)
    msg = str(e.value)
    assert path in msg and "75% of the records were dropped" in msg and "no_loss_token 3" in msg
    assert "seq_length=" in msg and "would keep 95 %" in msg
    ds = PreferenceDataset.build(DatasetConfig(path=path, seq_length=40, max_dropped_fraction=0.8), tok,
                                 name="train_dataset")
    assert ds.report.kept == 1 and ds.report.dropped["no_loss_token"] == 3
    assert ds.report.name == "train_dataset" and ds.report.length_to_keep(1.0) > 60


def test_prompt_build_reports_truncated_kept(tok, caplog):
    path = mem_file([{"messages": [U("short")]}, {"messages": [U("y" * 80)]}])
    with caplog.at_level("INFO"):
        ds = PromptDataset.build(DatasetConfig(path=path, seq_length=40), tok, add_bos=True)
    assert ds.report.truncated_kept == 1 and ds.report.kept == 2
    assert any("kept their last 40 tokens" in r.getMessage() for r in caplog.records)
    assert any("read 2, kept 2 (1 truncated" in r.getMessage() for r in caplog.records)
    # The sample tables log what the model saw: the kept end, marked as cut, not the record.
    from torchxla_rlhf.data.prompts import TRUNCATED_MARK

    assert not ds.texts[0].startswith(TRUNCATED_MARK)
    seen = ds.texts[1]
    assert seen.startswith(TRUNCATED_MARK) and "y" * 80 not in seen
    shown = seen[len(TRUNCATED_MARK):]
    assert tok(shown, add_special_tokens=False)["input_ids"] == ds.prompts.sequence(1).tolist()


def test_max_dropped_fraction_is_validated():
    with pytest.raises(ValueError, match="max_dropped_fraction"):
        DatasetConfig(path="x.jsonl", max_dropped_fraction=1.5).validate()


# -- output_dir ownership ------------------------------------------------------------------


def _write_run(d, kind, cfg):
    os.makedirs(d, exist_ok=True)
    import yaml

    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(f"# resolved {kind}\n" + yaml.safe_dump(cfg))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write("{}\n")
    os.makedirs(os.path.join(d, "final"), exist_ok=True)  # it left a checkpoint


def test_output_dir_ownership(tmp_path):
    cfg = {"beta": 0.1, "total_steps": 10, "logger": {"log_freq": 1}, "model": {"name_or_path": "a"}}
    empty = tmp_path / "fresh"
    check_output_dir(str(empty), "DPOConfig", cfg, resume=False, overwrite=False)  # absent: fine
    d = str(tmp_path / "rm")
    _write_run(d, "RewardConfig", {"use_margin": False})
    before = {n: open(os.path.join(d, n)).read() for n in os.listdir(d) if n != "final"}
    with pytest.raises(OutputDirError, match=r"holds a RewardConfig run .*this is a DPOConfig run"):
        check_output_dir(d, "DPOConfig", cfg, resume=False, overwrite=False)
    with pytest.raises(OutputDirError, match="RewardConfig"):  # resume does not make it ours
        check_output_dir(d, "DPOConfig", cfg, resume=True, overwrite=False)
    check_output_dir(d, "DPOConfig", cfg, resume=False, overwrite=True)  # explicit overwrite
    assert {n: open(os.path.join(d, n)).read() for n in os.listdir(d) if n != "final"} == before

    same = str(tmp_path / "dpo")
    _write_run(same, "DPOConfig", cfg)
    longer = {**cfg, "total_steps": 20, "logger": {"log_freq": 5}}
    check_output_dir(same, "DPOConfig", longer, resume=False, overwrite=False)  # resume-safe keys
    other = {**cfg, "model": {"name_or_path": "b"}}
    with pytest.raises(OutputDirError, match=r"model.name_or_path: 'a' -> 'b'.*resume_from=auto"):
        check_output_dir(same, "DPOConfig", other, resume=False, overwrite=False)
    with pytest.raises(OutputDirError, match=r"model.name_or_path was 'a' .* has 'b'"):
        check_output_dir(same, "DPOConfig", other, resume=True, overwrite=False)  # not the same run
    assert check_output_dir(same, "DPOConfig", {**cfg, "beta": 0.2}, resume=True,
                            overwrite=False) == "resume"  # a may-change key

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty .*notes.txt"):
        check_output_dir(str(foreign), "DPOConfig", cfg, resume=False, overwrite=False)
    cache_only = tmp_path / "cache"
    cache_only.mkdir()
    (cache_only / "reference_logps_train.npz").write_bytes(b"x")
    check_output_dir(str(cache_only), "DPOConfig", cfg, resume=False, overwrite=False)


def test_config_differences_ignores_resume_safe_keys():
    a = {"x": 1, "logger": {"wandb_mode": "offline"}, "resume_from": None, "optimizer": {"lr": 1e-6}}
    b = {"x": 1, "logger": {"wandb_mode": "online"}, "resume_from": "auto", "optimizer": {"lr": 2e-6}}
    assert config_differences(a, b) == ["optimizer.lr: 1e-06 -> 2e-06"]


# -- remote probes and the boundary ---------------------------------------------------------


def test_call_with_timeout_fails_fast_naming_the_url():
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=r"output_dir=gs://b/x: no answer within 0.2 s"):
        call_with_timeout(lambda: time.sleep(5), 0.2, "output_dir=gs://b/x")
    assert time.perf_counter() - t0 < 2
    with pytest.raises(RemoteError, match=r"k=u: ConnectionError: dns"):
        call_with_timeout(lambda: (_ for _ in ()).throw(ConnectionError("dns")), 1, "k=u")
    assert call_with_timeout(lambda: 3, 1, "k") == 3


def test_iter_urls_finds_remote_paths_only():
    from torchxla_rlhf.configs.dpo import DPOConfig
    from torchxla_rlhf.remote import check_remote_paths, iter_urls

    cfg = DPOConfig(output_dir="gs://bucket/run")
    cfg.train_dataset = dataclasses.replace(cfg.train_dataset, path="memory://x/y.jsonl")
    cfg.model = dataclasses.replace(cfg.model, name_or_path="s3://b/m")
    assert sorted(iter_urls(cfg)) == [("model.name_or_path", "s3://b/m"), ("output_dir", "gs://bucket/run")]
    local = DPOConfig(output_dir="memory://run")
    check_remote_paths(local, 1.0)  # nothing remote: nothing probed


def test_hub_errors_name_the_model(monkeypatch, tmp_path):
    from torchxla_rlhf.models.llama import resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RemoteError, match=r"model 'nobody/no-such-model' on the HF hub: HF_HUB_OFFLINE"):
        resolve_model_dir("nobody/no-such-model")


def test_run_guarded_exit_codes(capsys):
    def bad():
        raise DataError("data.jsonl:3: field 'chosen' is missing")

    with pytest.raises(SystemExit) as e:
        run_guarded(bad, "prog", debug=False)
    assert e.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "prog: error: data.jsonl:3: field 'chosen' is missing" in err and "Traceback" not in err
    with pytest.raises(DataError):
        run_guarded(bad, "prog", debug=True)

    def preempted():
        raise Preempted(7, "out/checkpoint-latest")

    with pytest.raises(SystemExit) as e:
        run_guarded(preempted, "prog", debug=False)
    assert e.value.code == EXIT_PREEMPTED
    assert "preempted at step 7" in capsys.readouterr().err

    def bug():
        raise ZeroDivisionError("a bug, not the user's")

    with pytest.raises(ZeroDivisionError):  # bugs keep their traceback
        run_guarded(bug, "prog", debug=False)


def test_one_line_names_the_path():
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == "No such file or directory: /x/y"


# -- cache keys ----------------------------------------------------------------------------


def test_weights_fingerprint_changes_with_the_weights(tmp_path):
    from torchxla_rlhf.models.llama import ModelConfig, weights_fingerprint

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    cfg = ModelConfig(name_or_path=str(d))
    first = weights_fingerprint(cfg)
    assert weights_fingerprint(cfg) == first
    data = bytearray((d / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1  # one changed byte at a sampled offset
    (d / "model.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(cfg) != first
    assert weights_fingerprint(ModelConfig()) != weights_fingerprint(
        ModelConfig(tiny=dataclasses.replace(ModelConfig().tiny, seed=1)))


def test_tokenizer_fingerprint_sees_special_ids(tok):
    a = tokenizer_fingerprint(tok)
    other = build_tiny_tokenizer()
    assert tokenizer_fingerprint(other) == a
    other.pad_token_id = 2
    assert tokenizer_fingerprint(other) != a
