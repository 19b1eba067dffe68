"""Every shipped config parses, validates, and says what the seed's commands said."""

import glob
import os

import pytest

from torchxla_rlhf.configs.loader import load_config
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.configs.grpo import GRPOConfig
from torchxla_rlhf.configs.ppo import PPOConfig
from torchxla_rlhf.configs.reward import RewardConfig
from torchxla_rlhf.configs.sft import SFTConfig

from helpers import REPO

KINDS = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig,
         "sft": SFTConfig}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)))
def test_shipped_config_loads(path):
    kind = os.path.basename(path).split("_")[0].split(".")[0]
    cfg = load_config(KINDS[kind], path, ["output_dir=/tmp/x"])
    assert cfg.output_dir == "/tmp/x"


def test_13b_configs_match_the_seed_commands():
    dpo = load_config(DPOConfig, os.path.join(REPO, "configs", "dpo_13b.yaml"))
    assert dpo.mesh_dim == "-1,16,16" and dpo.optimizer.lr == 5e-7 and dpo.optimizer.warmup_ratio == 0.1
    assert dpo.num_epochs == 3 and dpo.train_dataset.seq_length == 4096
    assert dpo.train_dataset.batch_size == 8 and dpo.optimizer.accumulate_gradient_steps == 4
    assert dpo.train_dataset.hf_split == "ultrafeedback_mean_aspects"
    rm = load_config(RewardConfig, os.path.join(REPO, "configs", "reward_13b.yaml"))
    # The seed's -1,64,8 needs 512 devices; the shipped mesh keeps fsdp=64 on a v3-256.
    assert rm.mesh_dim == "1,64,4" and rm.optimizer.lr == 1e-5 and rm.optimizer.end_lr == 1e-6
    assert rm.optimizer.warmup_ratio == 0.03 and rm.train_dataset.batch_size == 32
    assert rm.optimizer.accumulate_gradient_steps == 16 and rm.train_dataset.remove_truncated_samples
    ppo = load_config(PPOConfig, os.path.join(REPO, "configs", "ppo_13b.yaml"))
    assert ppo.mesh_dim == "1,64,4" and ppo.mode == "interleaved" and ppo.lr == 1e-6
    assert ppo.kl_coef == 0.05 and ppo.mini_batch_size == 64 and ppo.train_dataset.batch_size == 512
    assert ppo.max_continuation_len == 1024 and ppo.train_dataset.seq_length == 1024
    assert ppo.save_milestone_freq == 116 and ppo.sampling.top_k == 50
    assert ppo.prompt_add_bos  # EasyLM's tokenizer (--tokenizer.add_bos_token) began prompts with <s>


@pytest.mark.slow
def test_one_command_tiny_pipeline(tmp_path):
    """python -m torchxla_rlhf pipeline: DPO -> reward -> PPO wired together (a few steps)."""
    from torchxla_rlhf.__main__ import run_pipeline

    data = f"{REPO}/data/tiny"
    quick = ["total_steps=2", "logger.progress_bar=false", "save_model_freq=0"]
    overrides = (
        [f"dpo.{o}" for o in quick + ["eval_dataset=null", f"train_dataset.path={data}/preference_train.jsonl"]]
        + [f"reward.{o}" for o in quick + ["eval_dataset=null", f"train_dataset.path={data}/preference_train.jsonl"]]
        + [f"ppo.{o}" for o in quick + [f"train_dataset.path={data}/prompts.jsonl"]]
    )
    results = run_pipeline(os.path.join(REPO, "configs", "tiny"), str(tmp_path), overrides)
    assert set(results) == {"dpo", "reward", "ppo"}
    assert "env/reward_mean" in results["ppo"]
    for path in ("dpo/final", "reward/final", "ppo/final", "ppo/final-value"):
        assert os.path.exists(os.path.join(tmp_path, path, "_COMPLETE")), path


@pytest.mark.slow
def test_pipeline_grpo_stage_starts_from_the_dpo_policy(tmp_path):
    """--stages dpo,grpo: GRPO loads DPO's exported policy and exports its own (a few steps)."""
    from torchxla_rlhf.__main__ import run_pipeline

    data = f"{REPO}/data/tiny"
    quick = ["total_steps=2", "logger.progress_bar=false", "save_model_freq=0"]
    overrides = (
        [f"dpo.{o}" for o in quick + ["eval_dataset=null", f"train_dataset.path={data}/preference_train.jsonl"]]
        + [f"grpo.{o}" for o in quick + ["eval_dataset=null", f"train_dataset.path={data}/rlvr_train.jsonl"]]
    )
    results = run_pipeline(os.path.join(REPO, "configs", "tiny"), str(tmp_path), overrides,
                           stages=("dpo", "grpo"))
    assert set(results) == {"dpo", "grpo"}
    with open(os.path.join(tmp_path, "grpo", "config.yaml")) as f:
        assert f"name_or_path: {tmp_path}/dpo/final" in f.read()
    for path in ("dpo/final", "grpo/final"):
        assert os.path.exists(os.path.join(tmp_path, path, "_COMPLETE")), path


def test_pipeline_overrides_need_a_stage_prefix(tmp_path):
    from torchxla_rlhf.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--configs", os.path.join(REPO, "configs", "tiny"),
              "--output-root", str(tmp_path), "total_steps=2"])
    assert e.value.code == 2
    assert main([]) == 0
