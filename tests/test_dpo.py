"""End-to-end DPO on the tiny model and the shipped tiny data (XLA:CPU)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.configs.dpo import DPOConfig

from helpers import REPO, read_metrics, run_with_devices, sigterm_during_second_update, tiny_config

TINY = os.path.join(REPO, "configs", "tiny", "dpo.yaml")


def tiny_cfg(out, *overrides):
    return tiny_config(DPOConfig, "dpo", out, *overrides)


def test_dpo_trains_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchxla_rlhf.trainers.dpo import DPOTrainer

    out = str(tmp_path / "run")
    cfg = tiny_cfg(out, "total_steps=4", "optimizer.accumulate_gradient_steps=2",
                   "eval_dataset=null", "save_model_freq=2", "save_dtype=float32")
    trainer = DPOTrainer(cfg)
    before = {k: runtime.to_cpu(v).clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    trainer.close()

    # No compilation after the first optimizer step, with accumulation on.
    assert trainer.compiles_after_first_step == 0
    after = {k: runtime.to_cpu(v) for k, v in trainer.policy.state_dict().items()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), "every parameter should move"
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["learning_rate"] == 0.0  # warmup starts at 0 (optax semantics)
    assert metrics[-1]["learning_rate"] > 0.0

    final = os.path.join(out, "final")
    assert os.path.exists(os.path.join(final, "_COMPLETE"))
    assert os.path.isdir(os.path.join(out, "checkpoint-latest"))
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok("hi").input_ids[0] == tok.bos_token_id == 1  # open-instruct relies on add_bos
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    ids = torch.tensor([tok("<|user|>\nhello\n<|assistant|>\n").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ours = trainer.policy(input_ids=ids.to(runtime.device()),
                              attention_mask=mask.to(runtime.device())).logits
    torch.testing.assert_close(runtime.to_cpu(ours), ref, rtol=1e-4, atol=1e-4)
    saved = json.load(open(os.path.join(final, "config.json")))
    assert saved["architectures"] == ["LlamaForCausalLM"]
    assert saved.get("use_cache", True) is True  # downstream generation caches keys/values


@pytest.mark.slow
def test_dpo_learns_the_tiny_preference(tmp_path):
    """Held-out reward accuracy climbs well above chance (0.5) within 60 updates."""
    from torchxla_rlhf.dpo import main

    out = str(tmp_path / "run")
    result = main(tiny_cfg(out, "total_steps=60", "eval_freq=60", "save_model_freq=0",
                           "logger.log_freq=20"))
    evals = [m for m in read_metrics(out) if "eval/reward_accuracy" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert result["eval/reward_accuracy"] >= 0.85, evals
    assert result["eval/loss"] < evals[0]["eval/loss"] - 0.3


@pytest.mark.slow
def test_precalculated_reference_logps_match_and_are_cached(tmp_path):
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    losses = {}
    for mode in ("model", "precalc"):
        out = str(tmp_path / mode)
        extra = ["precalculate_reference_logps=true"] if mode == "precalc" else []
        trainer = DPOTrainer(tiny_cfg(out, "total_steps=3", "eval_dataset=null",
                                      "save_model_freq=0", "train_dataset.shuffle=false", *extra))
        trainer.train()
        trainer.close()
        losses[mode] = [m["loss"] for m in read_metrics(out)]
    np.testing.assert_allclose(losses["precalc"], losses["model"], rtol=1e-5, atol=1e-6)
    cache = tmp_path / "precalc" / "reference_logps_train.npz"
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    # A restart reuses the cache instead of recomputing it.
    trainer = DPOTrainer(tiny_cfg(str(tmp_path / "precalc"), "total_steps=1", "eval_dataset=null",
                                  "save_model_freq=0", "train_dataset.shuffle=false",
                                  "precalculate_reference_logps=true"))
    trainer.close()
    assert cache.stat().st_mtime_ns == stamp
    assert trainer.reference is None


@pytest.mark.multiprocess
def test_mesh_1_2_2_matches_single_device(tmp_path):
    """The tiny DPO on 4 devices with mesh (1,2,2) gives the single-device losses."""
    overrides = ["total_steps=3", "eval_dataset=null", "save_model_freq=0",
                 "optimizer.accumulate_gradient_steps=2"]
    code = f"""
    import json, os
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.configs.dpo import DPOConfig
    from torchxla_rlhf.dpo import main
    out = {str(tmp_path / 'mesh')!r}
    cfg = load_config(DPOConfig, {TINY!r}, {[f"output_dir={tmp_path / 'mesh'}", "mesh_dim=1,2,2",
        "logger.progress_bar=false", "logger.log_freq=1", *overrides]!r})
    main(cfg)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    print(json.dumps([[r["loss"], r["gradient_norm"]] for r in rows]))
    """
    sharded = run_with_devices(code, 4)
    from torchxla_rlhf.dpo import main

    out = str(tmp_path / "single")
    main(tiny_cfg(out, *overrides))
    single = [[r["loss"], r["gradient_norm"]] for r in read_metrics(out)]
    np.testing.assert_allclose(sharded, single, rtol=2e-4, atol=1e-5)


def _cli(*args):
    env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "torchxla_rlhf.dpo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_key_with_suggestion():
    proc = _cli("--config", TINY, "optimizer.lrr=1e-3")
    assert proc.returncode == 2
    assert "optimizer.lrr" in proc.stderr and "optimizer.lr" in proc.stderr


def test_cli_logs_the_projects_info_lines(tmp_path):
    """The entry point configures logging after torch_xla's import (which configures the root
    logger at WARNING first): INFO lines from the project show. The run stops right after the
    data are read (a batch larger than the data set), so no step compiles."""
    proc = _cli("--config", "tiny/dpo.yaml", f"output_dir={tmp_path}", "eval_dataset=null",
                f"train_dataset.path={REPO}/data/tiny/preference_train.jsonl",
                "train_dataset.batch_size=100000")
    assert proc.returncode == 2 and "fewer than one batch of train_dataset.batch_size=100000" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert " INFO torchxla_rlhf.runtime: Mesh dp=1 fsdp=1 mp=1" in proc.stderr, proc.stderr[-3000:]
    # The data report, always printed: what was read, kept and dropped.
    assert " INFO torchxla_rlhf.data.report: train_dataset: read 2000, kept 2000" in proc.stderr


def test_missing_model_checkpoint_is_a_clear_error(tmp_path):
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        DPOTrainer(tiny_cfg(str(tmp_path / "run"), f"model.name_or_path={missing}",
                            "tokenizer=tiny"))


_RESUME = """
import json, sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.trainers.dpo import DPOTrainer
t = DPOTrainer(tiny_config(DPOConfig, "dpo", {out!r}, *{overrides!r}))
start = t.step
t.train(); t.close()
print(json.dumps([start, t.step, t.compiles_after_first_step]))
"""


@pytest.mark.slow
def test_resumed_run_compiles_nothing_after_its_first_step(tmp_path):
    """A preempted run resumed in a new process (as on a pod) compiles nothing after its
    first step: the loaded training state carries the sharding annotations a step's outputs
    carry, so the resumed first step's graphs are every later step's. (In one process the
    graphs the interrupted run compiled would hide a difference.)"""
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    common = ["total_steps=5", "eval_dataset=null", "save_training_state=true",
              "save_model_freq=0"]
    out = str(tmp_path / "run")
    trainer = DPOTrainer(tiny_cfg(out, *common))
    sigterm_during_second_update(trainer)
    trainer.train()
    trainer.close()
    assert trainer.preempted_at == 2
    code = _RESUME.format(tests=os.path.join(REPO, "tests"), out=out,
                          overrides=[*common, "resume_from=auto"])
    assert run_with_devices(code, 1) == [2, 5, 0]


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_exactly(tmp_path):
    """Preemption: SIGTERM during step 2 -> training-state-latest (the state alone), stop.
    resume_from=auto then runs steps 3-4 exactly as an uninterrupted run does."""
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    common = ["total_steps=4", "eval_dataset=null", "save_training_state=true",
              "optimizer.accumulate_gradient_steps=2", "save_dtype=bfloat16"]
    straight = str(tmp_path / "straight")
    trainer = DPOTrainer(tiny_cfg(straight, *common))
    trainer.train()
    trainer.close()
    expected = [m["loss"] for m in read_metrics(straight)]
    final = {k: runtime.to_cpu(v) for k, v in trainer.policy.state_dict().items()}

    out = str(tmp_path / "preempted")
    trainer = DPOTrainer(tiny_cfg(out, *common))
    sigterm_during_second_update(trainer)
    trainer.train()
    trainer.close()
    assert trainer.step == 2 and trainer.preempted_at == 2
    from torchxla_rlhf.checkpoint.state import has_training_state

    # The preemption save is the training state alone (no HF gather).
    assert has_training_state(os.path.join(out, "training-state-latest"))
    assert not os.path.exists(os.path.join(out, "training-state-latest", "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "final"))

    resumed = DPOTrainer(tiny_cfg(out, *common, "resume_from=auto"))
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    losses = [m["loss"] for m in read_metrics(out)]
    assert losses == expected  # steps 1-2 before the preemption, 3-4 after: bit for bit
    for k, v in resumed.policy.state_dict().items():
        assert torch.equal(runtime.to_cpu(v), final[k]), k
