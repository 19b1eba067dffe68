"""Tracker: metrics.jsonl, log_freq, tables, wandb modes, non-main processes, step closures."""

from __future__ import annotations

import json
import math
import os
import uuid

import fsspec
import pytest
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.configs.sections import LoggingConfig
from torchxla_rlhf.tracking import Tracker


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_metrics_jsonl_and_table(tmp_path):
    out = str(tmp_path / "run")
    tracker = Tracker(LoggingConfig(progress_bar=True), out, {"lr": 1e-6}, True, total_steps=3)
    tracker.log(1, {"loss": torch.tensor(0.5), "lr": 1e-6, "n": 3})
    # the line is on disk before close (crash-safe)
    assert read_jsonl(os.path.join(out, "metrics.jsonl")) == [
        {"step": 1, "loss": 0.5, "lr": 1e-6, "n": 3.0}
    ]
    tracker.log(2, {"loss": torch.tensor([float("nan")])})
    tracker.log_table(2, "samples", ["prompt", "response", "reward"],
                      [["a", "b", torch.tensor(1.5)], ["c", "d", -2.0]])
    tracker.log_table(3, "samples", ["prompt", "response", "reward"], [["e", "f", 0.25]])
    assert tracker._bar.n == 2
    tracker.close()
    tracker.close()  # idempotent

    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 2 and rows[1]["step"] == 2 and math.isnan(rows[1]["loss"])
    assert isinstance(rows[0]["n"], float)
    assert read_jsonl(os.path.join(out, "samples.jsonl")) == [
        {"step": 2, "prompt": "a", "response": "b", "reward": 1.5},
        {"step": 2, "prompt": "c", "response": "d", "reward": -2.0},
        {"step": 3, "prompt": "e", "response": "f", "reward": 0.25},
    ]
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "samples.jsonl"]  # disabled: no wandb dir


def test_bad_input_errors(tmp_path):
    tracker = Tracker(LoggingConfig(progress_bar=False), str(tmp_path), {}, True, total_steps=2)
    with pytest.raises(ValueError, match="'loss': expected a scalar, got a tensor of shape \\[2\\]"):
        tracker.log(1, {"loss": torch.zeros(2)})
    with pytest.raises(TypeError, match="'name': expected a float"):
        tracker.log(1, {"name": "abc"})
    with pytest.raises(ValueError, match="'step' is reserved"):
        tracker.log(1, {"step": 1.0})
    with pytest.raises(ValueError, match="row 1 has 1 value"):
        tracker.log_table(1, "t", ["a", "b"], [[1, 2], [3]])
    tracker.close()
    assert not os.path.exists(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="log_freq=0"):
        LoggingConfig(log_freq=0)
    with pytest.raises(ValueError, match="wandb_mode='on'"):
        LoggingConfig(wandb_mode="on")


def test_non_main_process_writes_nothing(tmp_path):
    out = tmp_path / "run"
    tracker = Tracker(LoggingConfig(wandb_mode="offline"), str(out), {"a": 1}, False, total_steps=2)
    tracker.log(1, {"loss": torch.tensor(1.0)})
    tracker.log_table(1, "samples", ["x"], [[1]])
    tracker.close()
    assert tracker._run is None and tracker._bar is None
    assert not out.exists()


def test_wandb_offline_run_is_created_inside_output_dir(tmp_path):
    out = tmp_path / "run"
    cfg = LoggingConfig(wandb_mode="offline", run_name="t", progress_bar=False)
    with Tracker(cfg, str(out), {"lr": 0.5}, True, total_steps=1) as tracker:
        assert tracker._run.config["lr"] == 0.5
        tracker.log(1, {"loss": 1.0})
        tracker.log_table(1, "samples", ["x"], [["y"]])
    runs = [p for p in os.listdir(out / "wandb") if p.startswith("offline-run-")]
    assert len(runs) == 1
    assert read_jsonl(out / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


def test_memory_fs_output_dir():
    root = f"memory://track-{uuid.uuid4().hex}"
    fs, path = fsspec.core.url_to_fs(root)
    try:
        tracker = Tracker(LoggingConfig(progress_bar=False), root, {}, True, total_steps=2)
        tracker.log(1, {"a": 1.0})
        tracker.log(2, {"a": 2.0})
        tracker.close()
        lines = fs.cat_file(f"{path}/metrics.jsonl").decode().splitlines()
        assert [json.loads(x) for x in lines] == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    finally:
        fs.rm(path, recursive=True)


def test_log_freq_on_device_metrics_via_step_closures(tmp_path):
    dev = runtime.init()
    out = str(tmp_path / "run")
    tracker = Tracker(LoggingConfig(log_freq=3), out, {}, True, total_steps=7)
    assert [s for s in range(1, 8) if tracker.should_log(s)] == [3, 6, 7]
    w = torch.tensor(0.0).to(dev)
    for step in range(1, 8):
        w = w + 1.5  # the "training step": a lazy graph
        tracker.log_device_metrics(step, {"w": w, "w2": w * 2})
        if step == 3:
            # Scheduled, not executed: nothing read or written before the graph runs.
            assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
            syncs = runtime.host_sync_count()
        runtime.sync()
        if step == 4:
            # Step 3's values were copied in the background and written at a later sync.
            runtime.wait()
            assert len(read_jsonl(os.path.join(out, "metrics.jsonl"))) == 1
    runtime.wait()  # a logged step moves the bar when its values arrive
    assert tracker._bar.n == 7
    tracker.close()
    assert read_jsonl(os.path.join(out, "metrics.jsonl")) == [
        {"step": 3, "w": 4.5, "w2": 9.0},
        {"step": 6, "w": 9.0, "w2": 18.0},
        {"step": 7, "w": 10.5, "w2": 21.0},
    ]
    # The values of a logged step are read in one batched transfer on a background thread
    # (no per-metric .item()), no extra graph and no wait in the loop.
    assert runtime.host_sync_count() - syncs <= 3


def test_step_closure_adds_no_graph_execution(tmp_path):
    dev = runtime.init()
    tracker = Tracker(LoggingConfig(progress_bar=False), str(tmp_path), {}, True, total_steps=1)
    x = torch.arange(4.0).to(dev)
    runtime.sync()
    compiles = runtime.compile_count()
    loss = (x * 3.0).sum()
    tracker.log_device_metrics(1, {"loss": loss})
    runtime.sync()  # one graph for the step; the closure's .item() reuses its output
    assert runtime.compile_count() - compiles == 1
    tracker.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 18.0}]


def test_object_store_jsonl_is_buffered_and_rewritten():
    from torchxla_rlhf.tracking import _JsonlFile

    root = f"memory://jsonl-{uuid.uuid4().hex}"
    fs, path = fsspec.core.url_to_fs(root)
    try:
        # appendable=False: behave like gs://, which cannot append
        f = _JsonlFile(f"{root}/m.jsonl", rewrite_every_s=3600, appendable=False)
        f.append({"step": 1})  # first line: the object is written at once
        f.append({"step": 2})  # within rewrite_every_s: buffered
        assert fs.cat_file(f"{path}/m.jsonl").decode() == '{"step": 1}\n'
        f.flush()
        # A resumed run continues the existing object instead of overwriting it.
        g = _JsonlFile(f"{root}/m.jsonl", appendable=False)
        assert g._lines == ['{"step": 1}\n', '{"step": 2}\n']
    finally:
        fs.rm(path, recursive=True)


def test_wandb_follows_the_environment_unless_the_config_sets_it(tmp_path, monkeypatch, caplog):
    """WANDB_MODE=offline alone gives an offline run directory in output_dir; the start logs
    one line saying where metrics go."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_RUN_GROUP", "g1")
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="torchxla_rlhf.tracking")
    with Tracker(LoggingConfig(progress_bar=False), str(out), {}, True, total_steps=1) as tracker:
        assert tracker._run.settings.mode == "offline"
        assert tracker._run.project == "from-env" and tracker._run.group == "g1"
        tracker.log(1, {"loss": 1.0})
    runs = [p for p in os.listdir(out / "wandb") if p.startswith("offline-run-")]
    assert len(runs) == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics: ")]
    assert len(lines) == 1
    assert f"{out}/metrics.jsonl" in lines[0] and "W&B offline (from $WANDB_MODE)" in lines[0]
    assert f"wandb sync {out}/wandb/{runs[0]}" in lines[0]


def test_wandb_dir_from_the_environment_wins_over_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    with Tracker(LoggingConfig(wandb_mode="offline", progress_bar=False), str(tmp_path / "run"),
                 {}, True, total_steps=1) as tracker:
        tracker.log(1, {"loss": 1.0})
    assert [p for p in os.listdir(tmp_path / "wb" / "wandb") if p.startswith("offline-run-")]
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl"]


def test_wandb_settings_precedence():
    from torchxla_rlhf.tracking import WandbEnvError, wandb_settings

    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "p", "WANDB_ENTITY": "e", "WANDB_RUN_GROUP": "g"}
    s = wandb_settings(LoggingConfig(), env)
    assert (s.mode, s.project, s.entity, s.group, s.mode_from) == ("offline", "p", "e", "g", "$WANDB_MODE")
    s = wandb_settings(LoggingConfig(wandb_mode="disabled", project="mine", group="x"), env)
    assert (s.mode, s.project, s.group, s.ignored_env_mode) == ("disabled", "mine", "x", "offline")
    s = wandb_settings(LoggingConfig(), {})
    assert (s.mode, s.project, s.entity, s.mode_from) == ("disabled", "torchxla_rlhf", None, "default")
    assert wandb_settings(LoggingConfig(), {"WANDB_MODE": "dryrun"}).mode == "offline"
    with pytest.raises(WandbEnvError, match="WANDB_MODE='offlne'"):
        wandb_settings(LoggingConfig(), {"WANDB_MODE": "offlne"})


def test_destination_line_says_where_metrics_go():
    from types import SimpleNamespace

    from torchxla_rlhf.tracking import destination_line, wandb_settings

    off = wandb_settings(LoggingConfig(), {})
    assert destination_line(off, None, "o/metrics.jsonl") == (
        "metrics: o/metrics.jsonl; W&B disabled (WANDB_MODE=offline|online or "
        "logger.wandb_mode turns it on)")
    online = wandb_settings(LoggingConfig(wandb_mode="online"), {"WANDB_MODE": "offline"})
    run = SimpleNamespace(url="https://wandb.ai/e/p/runs/abc")
    line = destination_line(online, run, "o/metrics.jsonl")
    assert line.endswith("W&B online (logger.wandb_mode; WANDB_MODE=offline ignored): "
                         "https://wandb.ai/e/p/runs/abc")


def test_progress_bar_eta_starts_after_the_compiling_step(tmp_path):
    """The bar is named after the trainer, says it is compiling until step 1 is done, and its
    rate (hence its ETA) counts only the steps after the first one."""
    now = [0.0]
    tracker = Tracker(LoggingConfig(log_freq=100), str(tmp_path), {}, True, total_steps=10, name="dpo")
    bar = tracker._bar
    bar._time = lambda: now[0]
    bar.start_t = bar.last_print_t = 0.0
    assert bar.desc == "dpo compiling"
    tracker.log(0, {"eval/loss": 1.0})  # the baseline evaluation, before step 1
    assert bar.desc == "dpo compiling" and bar.n == 0
    now[0] = 80.0  # step 1: the compilation
    tracker.log_device_metrics(1, {})
    assert bar.desc == "dpo" and bar.n == 1
    assert bar.format_dict["elapsed"] == 0.0 and bar.format_dict["rate"] is None  # ETA: ?
    now[0] = 81.0  # step 2 takes one second
    tracker.log_device_metrics(2, {})
    d = bar.format_dict
    rate = d["rate"] or (d["n"] - d["initial"]) / d["elapsed"]
    assert rate == pytest.approx(1.0)  # the naive average would be 2 steps / 81 s
    assert "00:08" in bar.format_meter(**d)  # 8 steps left at 1 s each
    tracker.close()


@pytest.mark.parametrize("appendable", [True, False])
def test_resumed_run_logs_each_step_once(tmp_path, appendable):
    """A run killed after logging steps 1-5 resumes from its step-3 checkpoint: the rows of
    steps 4-5 and the step-3 evaluation (logged again by the resumed run's baseline evaluation)
    are dropped; a line cut short by the crash too."""
    from torchxla_rlhf.tracking import _JsonlFile

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/loss": 1.0}] + [{"step": s, "loss": float(s)} for s in range(1, 6)]
    rows.insert(4, {"step": 3, "eval/loss": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    f = _JsonlFile(str(path), appendable=appendable)
    assert f.keep_until(3) == 4
    f.append({"step": 3, "eval/loss": 0.5})
    f.append({"step": 4, "loss": 4.0})
    f.flush()
    steps = [(r["step"], sorted(r)) for r in map(json.loads, path.read_text().splitlines())]
    assert steps == [(0, ["eval/loss", "step"]), (1, ["loss", "step"]), (2, ["loss", "step"]),
                     (3, ["loss", "step"]), (3, ["eval/loss", "step"]), (4, ["loss", "step"])]
