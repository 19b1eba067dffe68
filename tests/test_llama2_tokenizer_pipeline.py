"""The tiny DPO -> reward -> PPO pipeline with LLaMA-2's real tokenizer (configs/tiny_llama2):
a random tiny Llama with the 32000-token vocabulary, a few steps each (XLA:CPU)."""

import json
import os

import numpy as np
import pytest
import transformers

from helpers import LLAMA2_MISSING, LLAMA2_TOKENIZER_DIR, REPO, has_llama2_tokenizer, read_metrics

# "Hi" "!" "</s>" after the Tulu header: the paper's JAX code's ids (tests/test_tokenizers_llama2.py)
CHAT = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
IDS = [1, 529, 29989, 1792, 29989, 29958, 13, 10994, 727, 13, 29966, 29989, 465, 22137, 29989, 29958, 13,
       18567, 29991, 2]


@pytest.mark.slow
@pytest.mark.skipif(not has_llama2_tokenizer(), reason=LLAMA2_MISSING)
def test_tiny_pipeline_with_the_llama2_tokenizer(tmp_path):
    from torchxla_rlhf.__main__ import run_pipeline

    data = f"{REPO}/data/tiny"
    quick = ["total_steps=2", "logger.progress_bar=false", "save_model_freq=0", "logger.log_freq=1"]
    pairs = [*quick, "eval_dataset=null", f"train_dataset.path={data}/preference_train.jsonl",
             f"tokenizer={LLAMA2_TOKENIZER_DIR}", "train_dataset.batch_size=4"]
    overrides = (
        [f"dpo.{o}" for o in [*pairs, "optimizer.accumulate_gradient_steps=1"]]
        + [f"reward.{o}" for o in pairs]
        + [f"ppo.{o}" for o in [*quick, f"train_dataset.path={data}/prompts.jsonl", "train_dataset.batch_size=4",
                                "mini_batch_size=4", "max_continuation_len=8"]]
    )
    results = run_pipeline(os.path.join(REPO, "configs", "tiny_llama2"), str(tmp_path), overrides)
    assert set(results) == {"dpo", "reward", "ppo"}
    for stage in ("dpo", "reward", "ppo"):
        rows = read_metrics(os.path.join(tmp_path, stage))
        assert [r["step"] for r in rows if "loss" in r or "env/reward_mean" in r][-1] == 2, stage
        assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)), stage
    for path in ("dpo/final", "reward/final", "ppo/final", "ppo/final-value"):
        final = os.path.join(tmp_path, path)
        assert json.load(open(os.path.join(final, "config.json")))["vocab_size"] == 32000, path
        tok = transformers.AutoTokenizer.from_pretrained(final)
        assert tok.apply_chat_template(CHAT, tokenize=True, return_dict=False) == IDS, path
