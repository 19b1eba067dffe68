"""``python -m torchxla_rlhf plan`` for users, and the trainer registry it reads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from torchxla_rlhf.__main__ import main as cli
from torchxla_rlhf.configs.loader import ConfigError, load_config
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.configs.grpo import GRPOConfig
from torchxla_rlhf.configs.ppo import PPOConfig
from torchxla_rlhf.configs.reward import RewardConfig
from torchxla_rlhf.configs.sft import SFTConfig
from torchxla_rlhf.trainers import registry

from helpers import REPO

LLAMA2_13B_DIR = os.path.join(REPO, "bench", "shapes", "llama-2-13b")
AS_13B = [f"{k}.name_or_path={LLAMA2_13B_DIR}" for k in ("model", "reward_model")]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m torchxla_rlhf plan: error: ")
    return lines[0]


def test_bare_shipped_name_and_tpu_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["plan", "--config", "ppo_13b.yaml", "--tpu", "v3-256", *AS_13B]) == 0
    out = capsys.readouterr().out
    assert out.startswith("v3-256: 256 device(s) on 32 host(s), 16 GiB per device")
    assert "memory plan: ppo, mesh dp=1 fsdp=64 mp=4" in out and "FITS" in out
    # The seed's PPO mesh on a v3-128 fits; with twice the rollout rows per device it does
    # not, and the meshes that do are said plainly.
    assert cli(["plan", "--config", "ppo_13b.yaml", "--tpu", "v3-128", "mesh_dim=1,32,4", *AS_13B]) == 0
    assert "FITS" in capsys.readouterr().out
    assert cli(["plan", "--config", "ppo_13b.yaml", "--tpu", "v3-128", "mesh_dim=1,16,8",
                "train_dataset.batch_size=1024", *AS_13B]) == 1
    out = capsys.readouterr().out
    assert "of 16.00 GiB: DOES NOT FIT" in out and "meshes on 128 devices that pass every check" in out


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty HF cache, as on a machine that never downloaded the models."""
    from torchxla_rlhf.preflight import shapes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(shapes, "_hub_answers", {})


@pytest.mark.parametrize("config", ["dpo_13b.yaml", "reward_13b.yaml", "ppo_13b.yaml", "grpo_13b.yaml"])
def test_every_13b_config_plans_offline_from_another_directory(config, tmp_path, monkeypatch, capsys,
                                                               offline_hub):
    """The shipped 13B configs as they are, from a directory that is not the repository, with
    no hub: the policy's shape comes from the shipped copy of its config.json (said so), PPO's
    reward model (the reward stage's output, not there yet) from the reward stage's model."""
    monkeypatch.chdir(tmp_path)
    assert cli(["plan", "--config", config, "--tpu", "v3-256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("v3-256: 256 device(s) on 32 host(s), 16 GiB per device")
    assert ("note: allenai/tulu-2-13b: shape from the shipped copy of its config.json; the hub "
            "was not reached (HF_HUB_OFFLINE is set)") in out
    assert "FITS" in out and "DOES NOT FIT" not in out
    stage_note = ("note: reward_model.name_or_path='outputs/reward_13b/final' does not exist yet: "
                  "reward_13b.yaml exports it; planned with the shape of that stage's model "
                  "'allenai/tulu-2-13b'")
    assert (stage_note in out) == (config == "ppo_13b.yaml")


def test_stage_output_takes_the_producing_stage_model_shape(tmp_path, monkeypatch, capsys):
    """A configs folder of its own: the RM stage's model is a local 2-layer Llama, so the PPO
    plan's reward (and value) model is that shape; an existing directory is read as it is."""
    import json

    from torchxla_rlhf.preflight.stages import read_plan_shapes

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)))
    folder = tmp_path / "cfgs"
    folder.mkdir()
    (folder / "rm.yaml").write_text(f"trainer: reward\noutput_dir: {tmp_path}/out/rm\n"
                                    f"model: {{name_or_path: {base}}}\n"
                                    "train_dataset: {path: pairs.jsonl}\n")
    (folder / "ppo.yaml").write_text(f"trainer: ppo\nmodel: {{name_or_path: {LLAMA2_13B_DIR}}}\n"
                                     f"reward_model: {{name_or_path: {tmp_path}/out/rm/final/}}\n"
                                     "mini_batch_size: 8\ntrain_dataset: {path: prompts.jsonl}\n")
    cfg = registry.load(str(folder / "ppo.yaml"))
    shapes, notes = read_plan_shapes(cfg, str(folder / "ppo.yaml"))
    assert shapes["model"].hidden == 5120 and shapes["reward_model"].hidden == 64
    assert len(notes) == 1 and "rm.yaml exports it" in notes[0] and str(base) in notes[0]
    (tmp_path / "out" / "rm" / "final").mkdir(parents=True)
    with pytest.raises(Exception, match="the directory has no config.json"):
        read_plan_shapes(cfg, str(folder / "ppo.yaml"))


def test_v4_and_v5p_are_one_device_per_chip(capsys):
    assert cli(["plan", "--config", "dpo_13b.yaml", "--tpu", "v4-64", "mesh_dim=-1,4,8", AS_13B[0]]) == 0
    assert "v4-64: 32 device(s) on 8 host(s), 32 GiB per device" in capsys.readouterr().out
    assert cli(["plan", "--config", "dpo_13b.yaml", "--tpu", "v5p-32", "mesh_dim=-1,2,8", AS_13B[0]]) == 0
    assert "v5p-32: 16 device(s) on 4 host(s), 95 GiB per device" in capsys.readouterr().out


def test_without_device_memory_it_says_how_to_get_a_verdict(capsys):
    assert cli(["plan", "--config", "tiny/dpo.yaml", "--devices", "4"]) == 0
    out = capsys.readouterr().out
    assert "fits: unknown device memory" in out and "--tpu v3-128|v3-256|v4-64|v5p-32" in out


def test_a_config_with_only_base_and_overrides_plans_its_trainer(capsys):
    """configs/tiny_llama2/dpo.yaml sets no DPO-only key; it declares its trainer through its
    base (trainer: dpo), and plans a DPO run."""
    assert cli(["plan", "--config", "tiny_llama2/dpo.yaml", "--devices", "4"]) == 0
    assert "memory plan: dpo," in capsys.readouterr().out
    assert registry.kind_of_file(os.path.join(REPO, "configs", "tiny_llama2", "reward.yaml")) == "reward"


@pytest.mark.parametrize("args,match", [
    (["--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["--config", "tiny/dpo.yaml", "mesh_dim=1,2"], "mesh_dim='1,2': expected 3 axes"),
    (["--config", "tiny/dpo.yaml", "--tpu", "v9-64"], "--tpu 'v9-64'"),
    (["--config", "tiny/dpo.yaml"], "mesh_dim='1,-1,1' has a -1 axis: pass --tpu TYPE or --devices N"),
    (["--config", "tiny/dpo.yaml", "--tpu", "v3-8", "mesh_dim=1,2,2"], "uses 4 device"),
    (["--config", "tiny/dpo.yaml", "--devices", "4", "trainer=grpc"], "unknown trainer 'grpc'"),
    (["--config", "ppo_13b.yaml", "--tpu", "v3-256", "reward_model.name_or_path=outputs/nowhere/final"],
     "reward_model.name_or_path='outputs/nowhere/final': no such model directory (to plan before it "
     "exists, e.g. the output of an earlier stage, set reward_model.name_or_path to a model of the "
     "same shape)"),
])
def test_every_error_is_one_line_with_exit_2(args, match, capsys):
    extra = [AS_13B[0]] if "ppo_13b.yaml" in args else []
    assert cli(["plan", *args, *extra]) == 2
    assert match in _err_line(capsys)


def test_option_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["plan", "--devices", "4"])
    assert e.value.code == 2
    assert "the following arguments are required: --config" in _err_line(capsys)


def test_a_file_that_declares_no_trainer(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("mesh_dim: '1,2,2'\nbeta: 0.2\nmodel: {name_or_path: tiny}\ntrain_dataset: {path: pairs.jsonl}\n")
    assert cli(["plan", "--config", str(path), "--devices", "4"]) == 2
    assert "declares no trainer: add a top-level 'trainer: KIND'" in _err_line(capsys)
    assert cli(["plan", "--config", str(path), "--devices", "4", "trainer=dpo"]) == 0


def test_a_trainer_refuses_a_file_for_another():
    with pytest.raises(ConfigError, match="trainer: this file is a 'ppo' config, this command trains 'dpo'"):
        load_config(DPOConfig, os.path.join(REPO, "configs", "tiny", "ppo.yaml"))


def test_plan_imports_neither_torch_nor_torch_xla(tmp_path):
    code = ("import sys; from torchxla_rlhf.__main__ import main; "
            "rc = main(['plan', '--config', 'tiny/ppo.yaml', '--devices', '4', "
            "'model.name_or_path=tiny', 'reward_model.name_or_path=tiny']); "
            "assert rc == 0, rc; "
            "bad = [m for m in ('torch', 'torch_xla', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- registry


def test_every_trainer_declares_itself():
    assert list(registry.TRAINERS) == ["sft", "dpo", "reward", "ppo", "grpo"]
    for kind, spec in registry.TRAINERS.items():
        assert spec.kind == kind == spec.config().trainer
        module, _, cls = spec.trainer.partition(":")
        assert module == f"torchxla_rlhf.trainers.{kind}" and cls.endswith("Trainer")
        cfg = spec.config()
        assert cfg.model_roles() and cfg.batches() and cfg.sequence_length()[1] > 0
        assert registry.spec_for(cfg) is spec


def test_each_shipped_config_declares_its_trainer():
    import glob

    for path in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True):
        kind = os.path.basename(path).split("_")[0].split(".")[0]
        assert registry.kind_of_file(path) == kind, path
        assert type(registry.load(path)) is {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig,
                                             "grpo": GRPOConfig, "sft": SFTConfig}[kind]


def test_roles_follow_the_config():
    data = "train_dataset.path=x.jsonl"
    ppo = PPOConfig()
    assert [r.key for r in ppo.model_roles()] == ["model", "model", "reward_model", "reward_model"]
    ppo = load_config(PPOConfig, None, [data, "mini_batch_size=8", "value_model.name_or_path=tiny"])
    assert ppo.model_roles()[-1].key == "value_model"
    dpo = load_config(DPOConfig, None, [data, "precalculate_reference_logps=true"])
    assert [r.resident for r in dpo.model_roles()] == [True, False]
    dpo = load_config(DPOConfig, None, [data, "train_dataset.batch_size=8"])
    assert [b.rows for b in dpo.batches()] == [16]


def test_no_trainer_kind_switch_and_one_mesh_parse_outside_their_homes():
    """Trainer kinds are known by trainers/ and the registry only; ``mesh_dim`` is parsed by
    preflight/mesh.py only."""
    import re

    package = os.path.join(REPO, "torchxla_rlhf")
    kind_switch = re.compile(r"isinstance\([^)]*(DPO|PPO|Reward)Config")
    parsers = []
    for root, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, package)
            with open(path) as f:
                text = f.read()
            if not rel.startswith("trainers" + os.sep):
                assert not kind_switch.search(text), rel
            if re.search(r"def parse_mesh_dim|mesh_dim\)?\.split\(", text):
                parsers.append(rel)
    assert parsers == [os.path.join("preflight", "mesh.py")]


def test_train_runs_the_trainer_the_file_names(tmp_path, capsys):
    """``python -m torchxla_rlhf train --config FILE``: the declared trainer's command line
    (here its --help and its errors; the runs themselves are the trainers' tests)."""
    with pytest.raises(SystemExit) as e:
        cli(["train", "--config", "tiny_llama2/reward.yaml", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "use_margin: bool" in out and "use_ipo: bool" not in out
    path = tmp_path / "mine.yaml"
    path.write_text("beta: 0.2\n")
    assert cli(["train", "--config", str(path)]) == 2
    assert "declares no trainer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["train", "--config=tiny/dpo.yaml", "beta=-1"])
    assert e.value.code == 2 and "beta: must be > 0" in capsys.readouterr().err
