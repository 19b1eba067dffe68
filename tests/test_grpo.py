"""GRPO / RLOO end to end on the tiny verifiable task (XLA:CPU): config errors, learning,
the compile guard, HF export, and exact resume after SIGTERM."""

import json
import os

import numpy as np
import pytest
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.configs.loader import load_config
from torchxla_rlhf.configs.grpo import GRPOConfig
from torchxla_rlhf.errors import UserError

from helpers import REPO, read_metrics, sigterm_during_second_update

TINY = os.path.join(REPO, "configs", "tiny")


def grpo_cfg(out, *overrides, name="grpo"):
    return load_config(GRPOConfig, os.path.join(TINY, f"{name}.yaml"), [
        f"output_dir={out}", "logger.progress_bar=false", "logger.log_freq=1",
        f"train_dataset.path={REPO}/data/tiny/rlvr_train.jsonl",
        f"eval_dataset.path={REPO}/data/tiny/rlvr_eval.jsonl", *overrides])


def test_config_errors_are_one_line(tmp_path):
    out = str(tmp_path / "r")
    with pytest.raises(UserError, match="a group needs at least 2"):
        grpo_cfg(out, "rollouts_per_prompt=1")
    with pytest.raises(UserError, match="must be a multiple of rollouts_per_prompt=16"):
        grpo_cfg(out, "mini_batch_size=8")
    with pytest.raises(UserError, match="no reward configured"):
        grpo_cfg(out, "rewards.verifier=null")


def test_unknown_reward_function_and_missing_ground_truth(tmp_path):
    from torchxla_rlhf.algos.verifiers import RewardFunctionError
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    with pytest.raises(RewardFunctionError, match="unknown reward function 'exact_match'"):
        GRPOTrainer(grpo_cfg(str(tmp_path / "a"), "rewards.verifier=exact_match"))
    data = tmp_path / "no_truth.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Say 1."}]}) + "\n"
                            for _ in range(8)))
    from torchxla_rlhf.data import DataError

    with pytest.raises(DataError, match=r"no_truth\.jsonl:1: no 'ground_truth'"):
        GRPOTrainer(grpo_cfg(str(tmp_path / "b"), f"train_dataset.path={data}"))


def test_mixed_data_is_checked_per_record_before_training(tmp_path):
    """by_dataset: a dataset without a verifier, or a ground truth its verifier cannot read,
    is a one-line data error naming file and line, before any weights load."""
    from torchxla_rlhf.data import DataError
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    lines = open(os.path.join(REPO, "data", "tiny", "rlvr_mixed.jsonl")).read().splitlines()
    mixed = ["rewards.verifier=by_dataset", "eval_dataset=null", "train_dataset.seq_length=64"]
    for n, (record, msg) in enumerate([
            ({"dataset": "code", "ground_truth": "1"}, "no verifier for dataset 'code'"),
            ({"dataset": "MATH", "ground_truth": {"answer": "8"}}, "the math verifier expects"),
            ({"dataset": "ifeval", "ground_truth": '{"func_name": "be_nice"}'},
             "unknown ifeval constraint 'be_nice'")]):
        bad = tmp_path / f"bad{n}.jsonl"
        bad.write_text("\n".join(lines[:4] + [json.dumps({
            "messages": [{"role": "user", "content": "Hi"}], **record})] + lines[4:]) + "\n")
        with pytest.raises(DataError, match=rf"^{tmp_path}/bad{n}\.jsonl:5: {msg}") as err:
            GRPOTrainer(grpo_cfg(str(tmp_path / f"r{n}"), f"train_dataset.path={bad}", *mixed))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="rewards.verifiers=x'.*verifiers: entry 'x' is not 'dataset=verifier'"):
        grpo_cfg(str(tmp_path / "c"), *mixed, "rewards.verifiers=x")


@pytest.mark.slow
def test_mixed_rlvr_file_scores_each_record_with_its_own_verifier(tmp_path):
    """open-instruct's RLVR schema with GSM8K, MATH and ifeval records: each goes through its
    own verifier, and the per-verifier health metrics show all three scored."""
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    out = str(tmp_path / "mixed")
    trainer = GRPOTrainer(grpo_cfg(
        out, f"train_dataset.path={REPO}/data/tiny/rlvr_mixed.jsonl", "train_dataset.seq_length=64",
        "eval_dataset=null", "rewards.verifier=by_dataset", "total_steps=3", "save_model_freq=0"))
    trainer.train()
    trainer.close()
    rows = [m for m in read_metrics(out) if "reward/mean" in m]
    assert len(rows) == 3
    for name in ("gsm8k", "math", "ifeval"):
        counts = [r.get(f"rewards/{name}/count", 0) for r in rows]
        assert sum(counts) > 0, (name, rows[-1])
        for r in rows:
            if f"rewards/{name}/count" in r:
                shares = [r[f"rewards/{name}/frac_{k}"] for k in ("one", "zero", "error")]
                assert sum(shares) == pytest.approx(1.0) and r[f"time/verifier/{name}_s"] >= 0
    # A random tiny policy's two tokens break no constraint of some ifeval records.
    assert any(r.get("rewards/ifeval/frac_one", 0) > 0 for r in rows)


def _curve(out):
    return [m["eval/reward_mean"] for m in read_metrics(out) if "eval/reward_mean" in m]


@pytest.mark.slow
def test_grpo_learns_the_tiny_task_without_recompiling_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    out = str(tmp_path / "grpo")
    trainer = GRPOTrainer(grpo_cfg(out, "logger.log_freq=10", "save_model_freq=0"))
    assert trainer.reference is None  # beta = 0: no reference model at all
    trainer.train()
    trainer.close()
    # Generation, split, score, advantages, micro-step, update, a one-time weight rewrite.
    assert trainer.compiles_first_step <= 10, trainer.compiles_first_step
    assert trainer.compiles_after_first_step == 0
    curve = _curve(out)
    assert curve[0] < 0.1 and curve[-1] > curve[0] + 0.3, curve
    rows = [m for m in read_metrics(out) if "reward/mean" in m]
    for key in ("frac_reward_zero_std", "grpo/loss/policy", "grpo/clip_ratio/region_mean",
                "time/reward_fn_s", "rewards/verifier_mean", "tokens/completion_len_mean"):
        assert key in rows[-1], key
    assert all(np.isfinite(r["grpo/loss/policy"]) for r in rows)
    samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert {"prompt", "completion", "reward"} <= set(samples[0])
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert policy.config.architectures == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path):
    """KL on (reference loaded), two passes per generation (old log-probs kept), GSPO ratio:
    SIGTERM after step 2, resume_from=auto runs steps 3-4 exactly as a straight run."""
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    common = ["total_steps=4", "eval_dataset=null", "save_training_state=true",
              "save_model_freq=0", "beta=0.04", "num_iterations=2", "mini_batch_size=64",
              "importance_sampling_level=sequence", "loss_type=grpo"]
    straight = str(tmp_path / "straight")
    trainer = GRPOTrainer(grpo_cfg(straight, *common))
    assert trainer.reference is not None
    trainer.train()
    trainer.close()
    assert trainer.compiles_after_first_step == 0
    keys = ("grpo/loss/policy", "reward/mean", "grpo/kl", "grpo/ratio_mean")
    expected = [[m[k] for k in keys] for m in read_metrics(straight)]
    final = {k: runtime.to_cpu(v) for k, v in trainer.policy.state_dict().items()}

    out = str(tmp_path / "preempted")
    trainer = GRPOTrainer(grpo_cfg(out, *common))
    sigterm_during_second_update(trainer)
    trainer.train()
    trainer.close()
    assert trainer.preempted_at == 2
    resumed = GRPOTrainer(grpo_cfg(out, *common, "resume_from=auto"))
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    assert [[m[k] for k in keys] for m in read_metrics(out)] == expected
    for k, v in resumed.policy.state_dict().items():
        assert torch.equal(runtime.to_cpu(v), final[k]), k


@pytest.mark.slow
def test_rloo_with_kl_in_reward_learns(tmp_path):
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    out = str(tmp_path / "rloo")
    trainer = GRPOTrainer(grpo_cfg(out, "logger.log_freq=10", "save_model_freq=0", name="grpo_rloo"))
    assert trainer.reference is not None
    trainer.train()
    trainer.close()
    assert trainer.compiles_after_first_step == 0
    curve = _curve(out)
    assert curve[0] < 0.1 and curve[-1] > curve[0] + 0.3, curve
    rows = [m for m in read_metrics(out) if "objective/kl_penalty_mean" in m]
    assert rows and all(np.isfinite(r["objective/kl_penalty_mean"]) for r in rows)


def test_grpo_and_ppo_share_the_rollout_engine_and_neither_inherits_the_other():
    """Both kinds are RolloutTrainers that supply every hook; nothing PPO defines for itself
    (value model, GAE targets, its micro-steps) is reachable from GRPOTrainer."""
    from torchxla_rlhf.trainers.base import Trainer
    from torchxla_rlhf.trainers.grpo import GRPOTrainer
    from torchxla_rlhf.trainers.ppo import PPOTrainer
    from torchxla_rlhf.trainers.rollout import RolloutTrainer

    assert GRPOTrainer.__bases__ == (RolloutTrainer,) and PPOTrainer.__bases__ == (RolloutTrainer,)
    assert not issubclass(GRPOTrainer, PPOTrainer) and not issubclass(PPOTrainer, GRPOTrainer)
    hooks = ("build_prompts", "build_models", "build_optimizers", "_score_chunk",
             "_batch_advantages", "_micro_step", "_update_step", "train_step", "trained_models",
             "check_data")
    for cls in (PPOTrainer, GRPOTrainer):
        for hook in hooks:
            assert hook in vars(cls), (cls.__name__, hook)
    engine = set(dir(RolloutTrainer)) | set(dir(Trainer))
    ppo_own = set(vars(PPOTrainer)) - engine
    assert {"_values", "_targets", "_interleaved_micro", "_standard_micro"} <= ppo_own
    assert not [name for name in ppo_own if hasattr(GRPOTrainer, name)]


def test_13b_plan_fits_a_v3_256_and_counts_the_reference_only_with_a_kl():
    from torchxla_rlhf.preflight import memory_plan

    path = os.path.join(REPO, "configs", "grpo_13b.yaml")
    # Llama-2 13B's config.json (offline) as the policy's shape.
    as_13b = f"model.name_or_path={REPO}/bench/shapes/llama-2-13b"
    plan = memory_plan.plan(load_config(GRPOConfig, path, [as_13b]), 256, 16 * 2**30)
    assert plan.fits, memory_plan.format_plan(plan)
    names = [t.name for t in plan.persistent]
    assert not any("reference" in n for n in names) and not any("value" in n for n in names)
    with_kl = memory_plan.plan(load_config(GRPOConfig, path, [as_13b, "beta=0.04"]), 256,
                               16 * 2**30)
    assert any("reference" in t.name for t in with_kl.persistent)


@pytest.mark.multiprocess
def test_mesh_1_2_2_matches_single_device_for_the_first_steps(tmp_path):
    """The tiny GRPO on 4 devices with mesh (1,2,2): the same completions (rewards) and the
    same loss and gradient norm as on one device."""
    from helpers import run_with_devices

    keys = ["reward/mean", "frac_reward_zero_std", "grpo/loss/policy", "grpo/gradient_norm"]
    overrides = ["total_steps=2", "eval_dataset=null", "save_model_freq=0"]
    code = f"""
    import json, os, sys
    sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
    from test_grpo import grpo_cfg, read_metrics
    from torchxla_rlhf.grpo import main
    out = {str(tmp_path / 'mesh')!r}
    main(grpo_cfg(out, "mesh_dim=1,2,2", *{overrides!r}))
    print(json.dumps([[r[k] for k in {keys!r}] for r in read_metrics(out)]))
    """
    sharded = run_with_devices(code, 4)
    from torchxla_rlhf.grpo import main

    out = str(tmp_path / "single")
    main(grpo_cfg(out, *overrides))
    single = [[r[k] for k in keys] for r in read_metrics(out)]
    np.testing.assert_allclose(sharded[:1], single[:1], rtol=2e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    ["advantage=rloo", "beta=0.04", "kl_in=loss", "normalize_advantages=true"],
    ["loss_type=dr_grpo", "scale_rewards=none", "overlong_cache_len=1", "rewards.format_weight=0.5"],
    ["loss_type=bnpo", "scale_rewards=batch", "epsilon_high=0.28", "num_iterations=2",
     "mini_batch_size=64", "optimizer.accumulate_gradient_steps=2"],
    ["rewards.verifier=tiny_user_reward:digits", "missing_eos_penalty=-1.0"],
])
def test_variants_run_without_recompiling(tmp_path, monkeypatch, variant):
    (tmp_path / "tiny_user_reward.py").write_text(
        "def digits(completions, records):\n"
        "    assert all('ground_truth' in r and 'origin' in r for r in records)\n"
        "    return [float(sum(ch.isdigit() for ch in c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    out = str(tmp_path / "run")
    trainer = GRPOTrainer(grpo_cfg(out, "total_steps=3", "eval_dataset=null", "save_model_freq=0",
                                   *variant))
    trainer.train()
    trainer.close()
    assert trainer.compiles_after_first_step == 0
    rows = [m for m in read_metrics(out) if "grpo/loss/policy" in m]
    assert len(rows) == 3
    assert all(np.isfinite(r["grpo/loss/policy"]) and np.isfinite(r["reward/mean"]) for r in rows)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_generation_layout_compiles_nothing_after_the_first_step(tmp_path):
    """sampling.gather_weights=generation_layout on 4 devices (mesh 1,2,2, tp=4): the reshard,
    prefill and decode loop compile in the first step only."""
    from helpers import run_with_devices

    code = f"""
    import json, os, sys
    sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
    from test_grpo import grpo_cfg
    from torchxla_rlhf.trainers.grpo import GRPOTrainer
    t = GRPOTrainer(grpo_cfg({str(tmp_path / 'run')!r}, "mesh_dim=1,2,2", "total_steps=3",
                             "eval_dataset=null", "save_model_freq=0",
                             "sampling.gather_weights=generation_layout"))
    t.train(); t.close()
    print(json.dumps([t.compiles_first_step, t.compiles_after_first_step,
                      t.generator._layout_mesh.tp]))
    """
    first, after, tp = run_with_devices(code, 4)
    assert after == 0 and tp == 4, (first, after, tp)
