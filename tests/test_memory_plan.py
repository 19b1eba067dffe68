"""The memory planner (memory_plan.py), its ``plan`` command and the start-up check."""

from __future__ import annotations

import dataclasses
import os

import pytest
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from helpers import REPO
from torchxla_rlhf.preflight import memory_plan
from torchxla_rlhf.models import llama
from torchxla_rlhf.__main__ import main as cli
from torchxla_rlhf.configs.loader import load_config
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.configs.ppo import PPOConfig
from torchxla_rlhf.configs.reward import RewardConfig
from torchxla_rlhf.preflight.shapes import read_shape

CONFIGS = os.path.join(REPO, "configs")
GIB = 1 << 30
LLAMA2_13B_DIR = os.path.join(REPO, "bench", "shapes", "llama-2-13b")
"""Llama-2 13B's config.json: the shape of every model of the 13B configs (offline)."""
AS_13B = [f"{k}.name_or_path={LLAMA2_13B_DIR}" for k in ("model", "reward_model")]


def _cfg(cls, name, *overrides):
    """A shipped config; the 13B ones with every model read from Llama-2 13B's config.json."""
    extra = [o for o in AS_13B if cls is PPOConfig or o.startswith("model.")] if "13b" in name else []
    return load_config(cls, os.path.join(CONFIGS, name), [*extra, *overrides])


def _term(p: memory_plan.Plan, name: str) -> float:
    # A term two graphs hold (the rollout's weights and KV cache) is one object in both phases.
    (t,) = {id(t): t for t in p.persistent + [t for ts in p.phases.values() for t in ts]
            if t.name == name}.values()
    return t.bytes


def test_parameter_terms_count_the_real_models_bytes():
    """Parameters, gradients and moments per device equal the HF models' bytes / devices
    (XLA:CPU's layout: no tile padding)."""
    cfg = _cfg(DPOConfig, "tiny/dpo.yaml", "mesh_dim=1,2,2")
    p = memory_plan.plan(cfg, 4, compiler="xla_cpu")
    model = LlamaForCausalLM(llama.tiny_llama_config(cfg.model.tiny))
    fp32 = sum(t.numel() for t in model.parameters()) * 4
    assert _term(p, "model parameters") == pytest.approx(fp32 / 4)
    assert _term(p, "model AdamW moments") == pytest.approx(2 * fp32 / 4)
    assert _term(p, "reference (frozen)") == pytest.approx(fp32 / 4)  # fp32 compute: no cast
    rm_config = llama.tiny_llama_config(cfg.model.tiny)
    rm_config.num_labels = 1  # as llama.load_sequence_classifier builds it
    rm = LlamaForSequenceClassification(rm_config)
    rcfg = _cfg(RewardConfig, "tiny/reward.yaml", "mesh_dim=1,2,2")
    assert _term(memory_plan.plan(rcfg, 4, compiler="xla_cpu"), "model parameters") == pytest.approx(
        sum(t.numel() for t in rm.parameters()) * 4 / 4)


def test_tpu_parameter_shards_are_padded_to_the_tile():
    """XLA:TPU stores each shard in 8 x 128 tiles (16 x 128 in bf16), the less padded way
    round: 13B on 1,16,16 (q/k/v/o shards [320, 320], MLP [864, 320]) pads, on 1,64,4
    ([1280, 80], [3456, 80]) nothing does but the replicated norms."""
    assert memory_plan.tpu_shard_elements((320, 320), 4) == 384 * 320
    assert memory_plan.tpu_shard_elements((864, 320), 4) == 896 * 320
    assert memory_plan.tpu_shard_elements((1280, 80), 4) == 1280 * 80
    assert memory_plan.tpu_shard_elements((1280, 72), 2) == 1280 * 80  # bf16: 16 rows a tile
    assert memory_plan.tpu_shard_elements((5120,), 4) == 5120
    shape = read_shape(llama.ModelConfig(name_or_path=LLAMA2_13B_DIR))
    layer = 4 * (4 * 384 * 320 + 3 * 896 * 320) + 2 * 5120 * 4  # fp32 matrices, two norms
    one, two = (dataclasses.replace(shape, layers=n) for n in (1, 2))
    mesh = memory_plan.Mesh(1, 16, 16)
    assert (memory_plan.tpu_model_bytes(two, mesh, "causal", "float32")
            - memory_plan.tpu_model_bytes(one, mesh, "causal", "float32")) == layer
    even = memory_plan.Mesh(1, 64, 4)
    assert (memory_plan.tpu_model_bytes(two, even, "classifier", "float32")
            - memory_plan.tpu_model_bytes(one, even, "classifier", "float32")) == (
        shape.layer_linear * 4 / 256 + 2 * 5120 * 4)
    tpu = memory_plan.plan(_cfg(DPOConfig, "dpo_13b.yaml"), 256)
    cpu = memory_plan.plan(_cfg(DPOConfig, "dpo_13b.yaml"), 256, compiler="xla_cpu")
    assert 1.08 < _term(tpu, "model parameters") / _term(cpu, "model parameters") < 1.1


def test_tpu_splits_are_the_partition_rules():
    """The planner's restatement of how each weight is split (it cannot import sharding.py)
    is the partition rules' own, for every parameter of both heads."""
    from torchxla_rlhf.models.sharding import CAUSAL_LM_RULES, SEQUENCE_CLASSIFIER_RULES, match_specs

    shape = read_shape(llama.ModelConfig(name_or_path=LLAMA2_13B_DIR))
    for head, rules in (("causal", CAUSAL_LM_RULES), ("classifier", SEQUENCE_CLASSIFIER_RULES)):
        specs = match_specs(shape.params(head), rules, axis_sizes={"dp": 1, "fsdp": 16, "mp": 16})
        for name, dims in shape.params(head):
            assert (memory_plan.tpu_split(name) or (None,) * len(dims)) == specs[name], name


def test_frozen_models_in_compute_dtype_unless_kept():
    bf16 = ["model.compute_dtype=bfloat16", "reward_model.compute_dtype=bfloat16"]
    half = memory_plan.plan(_cfg(PPOConfig, "ppo_13b.yaml", *bf16), 256)
    kept = memory_plan.plan(_cfg(PPOConfig, "ppo_13b.yaml", *bf16, "model.frozen_dtype=param"), 256)
    assert _term(half, "reference (frozen)") < 0.55 * _term(kept, "reference (frozen)")


def test_heads_split_as_each_compiler_splits_them():
    """mp dividing the heads splits them; 40 heads on mp=16: XLA:CPU computes all 40 on every
    device, XLA:TPU splits them over 8 of the 16 (5 a device, in its compiled module)."""
    shape = read_shape(llama.ModelConfig(name_or_path=LLAMA2_13B_DIR))
    assert memory_plan.heads_per_device(shape, 8) == 5
    assert memory_plan.heads_per_device(shape, 16) == 40
    assert memory_plan.heads_per_device(shape, 16, "tpu") == 5
    p = memory_plan.plan(_cfg(DPOConfig, "dpo_13b.yaml", "mesh_dim=-1,16,16"), 256)
    assert any("does not divide heads" in n for n in p.notes)


def test_rollout_micro_batch_shrinks_only_the_kv_cache():
    whole = memory_plan.plan(_cfg(PPOConfig, "ppo_13b.yaml"), 256)
    piece = memory_plan.plan(_cfg(PPOConfig, "ppo_13b.yaml", "rollout_micro_batch_size=128"), 256)
    assert _term(piece, "KV cache") == pytest.approx(_term(whole, "KV cache") / 4)
    assert _term(piece, "rollout buffers") == _term(whole, "rollout buffers")


def test_rollout_gathered_weights_follow_the_decode_policy():
    """XLA:CPU: per_layer holds one layer + the LM head whatever the depth, hoisted every
    layer, so a 13B rollout on 1,64,4 would not fit a v3 core. XLA:TPU gathers one matrix at a
    time with either policy (hoisted does not hoist there): the same bytes."""
    cpu = [memory_plan.plan(_cfg(PPOConfig, "ppo_13b.yaml", f"sampling.gather_weights={g}"), 256,
                            16 * GIB, compiler="xla_cpu") for g in ("per_layer", "hoisted")]
    shape, mesh = read_shape(llama.ModelConfig(name_or_path=LLAMA2_13B_DIR)), cpu[0].mesh
    layer = shape.layer_linear * 4 / mesh.mp  # fp32 parameters, whole over fsdp
    assert "gathered weights" in [t.name for t in cpu[0].phases["rollout"]]
    assert _term(cpu[1], "gathered weights") - _term(cpu[0], "gathered weights") == pytest.approx(
        (shape.layers - 1) * layer)
    assert cpu[1].fits is False
    tpu = [memory_plan.plan(_cfg(PPOConfig, "ppo_13b.yaml", f"sampling.gather_weights={g}"), 256,
                            16 * GIB) for g in ("per_layer", "hoisted")]
    for phase in ("rollout prefill", "rollout decode"):
        assert "gathered weights" in [t.name for t in tpu[0].phases[phase]]
    assert _term(tpu[0], "gathered weights") == _term(tpu[1], "gathered weights")
    assert _term(tpu[0], "gathered weights") == pytest.approx(
        (shape.vocab * shape.hidden + shape.hidden * shape.intermediate) * 2 / mesh.mp)


@pytest.mark.parametrize("config,devices,mesh", [
    ("dpo_13b.yaml", 256, "-1,16,16"), ("dpo_13b.yaml", 128, "-1,16,8"),
    ("reward_13b.yaml", 256, "-1,32,8"), ("reward_13b.yaml", 128, "-1,32,4"),
    ("ppo_13b.yaml", 256, "1,64,4"),
])
def test_seed_13b_runs_fit_on_v3(config, devices, mesh):
    cls = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig}[config.split("_")[0]]
    p = memory_plan.plan(_cfg(cls, config, f"mesh_dim={mesh}"), devices, 16 * GIB)
    assert p.fits, memory_plan.format_plan(p)


def test_a_run_that_does_not_fit_stops_before_loading():
    """The RM at seq 4096 on a v3-128 with mp=64: 32 rows per device, each holding 5 heads'
    [4096, 4096] scores in a layer's backward, and 40 layers of their checkpointed inputs: over
    16 GiB; on -1,32,4 it fits. Through the trainers' own pre-flight hook (16 hosts of 8)."""
    from torchxla_rlhf.preflight.startup import Topology, on_devices

    cfg = _cfg(RewardConfig, "reward_13b.yaml", "mesh_dim=-1,2,64")
    with pytest.raises(memory_plan.DoesNotFit, match="DOES NOT FIT"):
        on_devices(cfg, Topology(128, "test", 16, 8, 16 * GIB))
    cfg = _cfg(RewardConfig, "reward_13b.yaml", "mesh_dim=-1,32,4")
    assert on_devices(cfg, Topology(128, "test", 16, 8, 16 * GIB)).plan.fits
    assert on_devices(cfg, Topology(128, "test", 16, 8, None)).plan.fits is None  # unknown: logged


def test_plan_command(capsys):
    assert cli(["plan", "--config", f"{CONFIGS}/ppo_13b.yaml", "--devices", "256",
                "--hbm-gib", "16", *AS_13B]) == 0
    out = capsys.readouterr().out
    for term in ("policy parameters", "policy AdamW moments", "reference (frozen)", "KV cache",
                 "policy layer recompute + backward", "value kept for the backward",
                 "policy gathered weight", "rollout buffers", "-- rollout prefill",
                 "-- rollout decode", "-- train update", "FITS",
                 "dominant term:"):
        assert term in out, term
    assert cli(["plan", "--config", f"{CONFIGS}/dpo_13b.yaml", "--devices", "256",
                "--hbm-gib", "1", AS_13B[0]]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    # The shipped RM mesh fits a v3-256; the seed's -1,64,8 needs 512 devices.
    assert cli(["plan", "--config", f"{CONFIGS}/reward_13b.yaml", "--devices", "256", "--hbm-gib",
                "16", AS_13B[0]]) == 0
    capsys.readouterr()
    assert cli(["plan", "--config", f"{CONFIGS}/reward_13b.yaml", "--devices", "256",
                "mesh_dim=-1,64,8", AS_13B[0]]) == 2
    assert "mesh_dim" in capsys.readouterr().err
