"""End-to-end reward-model training on the tiny task (XLA:CPU)."""

import json
import os

import numpy as np
import pytest
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.configs.reward import RewardConfig

from helpers import REPO, read_metrics, run_with_devices, tiny_config

TINY = os.path.join(REPO, "configs", "tiny", "reward.yaml")


def tiny_cfg(out, *overrides):
    return tiny_config(RewardConfig, "reward", out, *overrides)


@pytest.mark.slow
def test_reward_model_learns_and_exports_as_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from torchxla_rlhf.trainers.reward import RewardTrainer

    out = str(tmp_path / "rm")
    trainer = RewardTrainer(tiny_cfg(out, "total_steps=60", "eval_freq=60", "save_model_freq=0"))
    result = trainer.train()
    trainer.close()
    assert trainer.compiles_after_first_step == 0
    evals = [m for m in read_metrics(out) if "eval/accuracy" in m]
    assert [e["step"] for e in evals] == [0, 60]
    assert result["eval/accuracy"] >= 0.9, evals

    final = os.path.join(out, "final")
    saved = json.load(open(os.path.join(final, "config.json")))
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert saved["num_labels"] == 1 if "num_labels" in saved else len(saved["id2label"]) == 1
    assert saved["pad_token_id"] == 0 and saved["eos_token_id"] == 2
    hf = AutoModelForSequenceClassification.from_pretrained(final)
    assert hf.score.bias is None and not hasattr(hf, "lm_head")

    # HF's pooling (rightmost non-pad token) and ours (last real token) agree on right-padded
    # held-out pairs: score them both ways.
    batch = runtime.batch_to_device(next(trainer.data.eval_batches()), trainer.ctx.mesh)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # chosen rows, then rejected
    with torch.no_grad():
        ours = runtime.to_cpu(llama.sequence_classifier_scores(trainer.model, ids, mask))
        theirs = hf(input_ids=runtime.to_cpu(ids), attention_mask=runtime.to_cpu(mask)).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_reward_from_causal_lm_and_from_reward_checkpoints(tmp_path):
    """A causal-LM start keeps the backbone and draws a fresh head; a reward-model start keeps
    its head. Also exercises the margin loss."""
    from torchxla_rlhf import checkpoint
    from torchxla_rlhf.data.tokenizers import build_tiny_tokenizer
    from torchxla_rlhf.trainers.reward import RewardTrainer

    mesh = runtime.make_mesh("1,1,1")
    lm = llama.load_causal_lm(llama.ModelConfig(compute_dtype="float32"), mesh)
    lm_dir = str(tmp_path / "lm")
    checkpoint.save_hf_checkpoint(lm, build_tiny_tokenizer(), lm_dir, save_dtype=torch.float32)

    out = str(tmp_path / "rm")
    trainer = RewardTrainer(tiny_cfg(out, f"model.name_or_path={lm_dir}", "tokenizer=tiny",
                                     "total_steps=2", "eval_dataset=null", "use_margin=true",
                                     "save_model_freq=0"))
    embed = runtime.to_cpu(trainer.model.model.embed_tokens.weight)
    torch.testing.assert_close(embed, runtime.to_cpu(lm.model.embed_tokens.weight))
    head = runtime.to_cpu(trainer.model.score.weight)
    std = float(head.std())
    assert head.shape == (1, 64) and 0.005 < std < 0.05  # normal(0, initializer_range=0.02)
    trainer.train()
    trainer.close()
    assert all(np.isfinite(m["loss"]) for m in read_metrics(out))

    rm = llama.load_sequence_classifier(
        llama.ModelConfig(name_or_path=os.path.join(out, "final"), compute_dtype="float32"), mesh)
    trained_head = runtime.to_cpu(trainer.model.score.weight)
    torch.testing.assert_close(runtime.to_cpu(rm.score.weight), trained_head)


@pytest.mark.multiprocess
def test_reward_mesh_1_2_2_matches_single_device(tmp_path):
    overrides = ["total_steps=3", "eval_dataset=null", "save_model_freq=0"]
    code = f"""
    import json, os
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.configs.reward import RewardConfig
    from torchxla_rlhf.reward import main
    out = {str(tmp_path / 'mesh')!r}
    main(load_config(RewardConfig, {TINY!r}, {[f"output_dir={tmp_path / 'mesh'}", "mesh_dim=1,2,2",
        "logger.progress_bar=false", "logger.log_freq=1", *overrides]!r}))
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    print(json.dumps([[r["loss"], r["gradient_norm"], r["accuracy"]] for r in rows]))
    """
    sharded = run_with_devices(code, 4)
    from torchxla_rlhf.reward import main

    out = str(tmp_path / "single")
    main(tiny_cfg(out, *overrides))
    single = [[r["loss"], r["gradient_norm"], r["accuracy"]] for r in read_metrics(out)]
    np.testing.assert_allclose(sharded, single, rtol=2e-4, atol=1e-5)
