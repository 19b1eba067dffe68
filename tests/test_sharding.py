import pytest
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from torchxla_rlhf.configs.sections import TinyModelConfig
from torchxla_rlhf.models.llama import tiny_llama_config
from torchxla_rlhf.models import sharding
from torchxla_rlhf.models.sharding import ShardingError, match_specs

from helpers import run_with_devices


def _tiny_config(**kw):
    return tiny_llama_config(TinyModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64),
                             **kw)


def _shapes(model):
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_every_llama_parameter_gets_the_megatron_spec():
    model = LlamaForCausalLM(_tiny_config())
    specs = match_specs(_shapes(model), sharding.rules_for(model), axis_sizes={"dp": 1, "fsdp": 2, "mp": 2})
    assert specs["model.embed_tokens.weight"] == ("fsdp", "mp")
    assert specs["model.layers.0.self_attn.q_proj.weight"] == ("mp", "fsdp")
    assert specs["model.layers.1.self_attn.k_proj.weight"] == ("mp", "fsdp")
    assert specs["model.layers.1.self_attn.o_proj.weight"] == ("fsdp", "mp")
    assert specs["model.layers.0.mlp.up_proj.weight"] == ("mp", "fsdp")
    assert specs["model.layers.0.mlp.down_proj.weight"] == ("fsdp", "mp")
    assert specs["model.layers.0.input_layernorm.weight"] == (None,)
    assert specs["model.norm.weight"] == (None,)
    assert specs["lm_head.weight"] == ("mp", "fsdp")
    assert len(specs) == len(list(model.parameters()))


def test_sequence_classifier_rules_cover_score_head():
    model = LlamaForSequenceClassification(_tiny_config(num_labels=1))
    specs = match_specs(_shapes(model), sharding.rules_for(model), axis_sizes={"fsdp": 2})
    assert specs["score.weight"] == (None, None)
    assert "lm_head.weight" not in specs


def test_rule_matching_nothing_is_an_error():
    model = LlamaForSequenceClassification(_tiny_config(num_labels=1))
    # Causal-LM rules on a classifier: the lm_head rule matches nothing, score matches no rule.
    with pytest.raises(ShardingError, match="score.weight"):
        match_specs(_shapes(model), sharding.CAUSAL_LM_RULES)
    rules = sharding.SEQUENCE_CLASSIFIER_RULES + ((r"^lm_head\.weight$", ("mp", "fsdp")),)
    with pytest.raises(ShardingError, match=r"match no parameter"):
        match_specs(_shapes(model), rules)


def test_large_weight_left_replicated_is_an_error():
    rules = ((r"^w$", (None, None)),)
    with pytest.raises(ShardingError, match="replicated"):
        match_specs([("w", (2048, 1024))], rules, axis_sizes={"fsdp": 4})
    # A single device: nothing to shard over, so no error.
    match_specs([("w", (2048, 1024))], rules, axis_sizes={"fsdp": 1})


def test_rank_and_divisibility_errors():
    with pytest.raises(ShardingError, match="rank"):
        match_specs([("w", (4, 4))], ((r"^w$", ("fsdp",)),))
    with pytest.raises(ShardingError, match="not divisible"):
        match_specs([("w", (6, 4))], ((r"^w$", ("fsdp", None)),), axis_sizes={"fsdp": 4})


@pytest.mark.multiprocess
def test_sharded_tiny_llama_matches_single_device():
    """Forward and one AdamW update on a (1,2,2) mesh equal the unsharded run."""
    code = """
    import json, torch
    from torchxla_rlhf import runtime
    from torchxla_rlhf.models import llama
    from torchxla_rlhf.algos import optim
    from torchxla_rlhf.configs.sections import ModelConfig, OptimizerConfig
    runtime.init()
    ids = torch.randint(3, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids); mask[1, 18:] = 0
    results = {}
    for mesh_dim in ("1,4,1", "2,1,2"):
        mesh = runtime.make_mesh(mesh_dim)
        model = llama.load_causal_lm(ModelConfig(compute_dtype="float32"), mesh)
        opt = optim.AdamW(model.parameters(), OptimizerConfig(lr=1e-2, warmup_ratio=0.0),
                          optim.Schedule.linear(1e-2, 0.0, 0.0, 10))
        def step(b):
            logits = llama.causal_lm_logits(model, b["ids"], b["mask"])
            loss = (logits.float().logsumexp(-1) * b["mask"]).sum() / b["mask"].sum()
            loss.backward()
            return loss.detach(), opt.step()
        b = runtime.batch_to_device({"ids": ids, "mask": mask}, mesh)
        loss, m = runtime.compile(step)(b)
        after = llama.causal_lm_logits(model, b["ids"], b["mask"])
        results[mesh_dim] = [loss.item(), m["gradient_norm"].item(), after.float().abs().sum().item()]
    print(json.dumps(results))
    """
    res = run_with_devices(code, 4)
    ref = res["1,4,1"]
    for key in ("2,1,2",):
        assert res[key] == pytest.approx(ref, rel=1e-4), (key, res)


def test_mesh_that_does_not_fit_is_an_error():
    from torchxla_rlhf.runtime import MeshError, parse_mesh_dim

    assert parse_mesh_dim("-1,16,16", 512) == (2, 16, 16)
    assert parse_mesh_dim("1,-1,4", 8) == (1, 2, 4)
    with pytest.raises(MeshError, match="does not fit 8 device"):
        parse_mesh_dim("-1,3,1", 8)
    with pytest.raises(MeshError, match="uses 4 device"):
        parse_mesh_dim("1,2,2", 8)
    with pytest.raises(MeshError, match="at most one"):
        parse_mesh_dim("-1,-1,2", 8)
    with pytest.raises(MeshError, match="three comma-separated"):
        parse_mesh_dim("a,b", 8)
