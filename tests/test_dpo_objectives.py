"""The DPO trainer's objectives (loss_type): a reference-free objective loads no reference
model; the length-normalized ones train without recompiling. (The formulas themselves are
checked against open-instruct in test_grpo_math.py.)"""

import numpy as np
import pytest

from torchxla_rlhf.preflight import memory_plan
from torchxla_rlhf.configs.dpo import DPOConfig

from helpers import read_metrics, tiny_config


def tiny_cfg(out, *overrides):
    return tiny_config(DPOConfig, "dpo", out, *overrides)


@pytest.mark.parametrize("loss_type", ["simpo", "dpo_norm"])
def test_objective_trains_without_recompiling(tmp_path, loss_type):
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    out = str(tmp_path / "run")
    cfg = tiny_cfg(out, "total_steps=2", "eval_dataset=null", f"loss_type={loss_type}",
                   "beta=2.0" if loss_type == "simpo" else "beta=0.1")
    trainer = DPOTrainer(cfg)
    assert (trainer.reference is None) == (loss_type == "simpo")
    trainer.train()
    trainer.close()
    assert trainer.compiles_after_first_step == 0
    metrics = read_metrics(out)
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_reference_free_config_and_plan(tmp_path):
    cfg = tiny_cfg(str(tmp_path / "r"), "loss_type=simpo")
    assert not cfg.needs_reference
    terms = [t.name for t in memory_plan.plan(cfg, 1).persistent]
    assert not any("reference" in t for t in terms)
    assert any("reference" in t.name for t in memory_plan.plan(
        tiny_cfg(str(tmp_path / "d"), "loss_type=dpo_norm"), 1).persistent)
    assert tiny_cfg(str(tmp_path / "i"), "use_ipo=true").objective == "ipo"
    with pytest.raises(Exception, match="reference-free"):
        tiny_cfg(str(tmp_path / "p"), "loss_type=simpo", "precalculate_reference_logps=true")
    with pytest.raises(Exception, match="contradicts"):
        tiny_cfg(str(tmp_path / "c"), "loss_type=simpo", "use_ipo=true")
