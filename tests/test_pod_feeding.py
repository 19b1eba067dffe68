"""On an 8-device XLA:CPU mesh with mp > 1: per-host feeding through the code path every host
of a pod takes, and a forward/backward with mp not dividing the attention heads."""

import pytest

from helpers import run_with_devices


@pytest.mark.slow
def test_batch_upload_from_addressable_shards_with_mp():
    """batch_to_device builds each global tensor from this host's devices' shards
    (``_global_tensor_from_cpu_shards``; on one host every device is addressable, there is no
    other branch). Rows over (dp, fsdp), replicated over mp; 1-D per-pair values replicated;
    2 pairs = 4 rows over dp*fsdp = 4 (fewer pairs than batch shards, like the seed's DPO)."""
    out = run_with_devices(
        """
        import json, numpy as np, torch
        from torchxla_rlhf import runtime
        mesh = runtime.make_mesh("2,2,2")
        ids = torch.arange(4 * 6).reshape(4, 6)
        batch = {"input_ids": ids, "attention_mask": ids % 2, "margin": torch.tensor([0.5, 1.5]),
                 "index": torch.tensor([7, 3]), "note": "passes through"}
        dev = runtime.batch_to_device(batch, mesh)
        grid = np.asarray(mesh.mesh.device_ids).reshape(2, 2, 2)
        ok_shards = []
        local = zip(runtime.local_device_ordinals(), runtime.local_shard_data(dev["input_ids"]))
        for o, shard in local:
            coords = runtime.device_coords(grid, o)
            want = ids[runtime.shard_slices((4, 6), runtime.batch_spec(2), mesh.sizes, coords)]
            ok_shards.append(bool(torch.equal(shard, want)) and shard.shape == (1, 6))
        print(json.dumps({
            "ordinals": runtime.local_device_ordinals(),
            "shards_ok": ok_shards,
            "ids_ok": bool(torch.equal(runtime.to_cpu(dev["input_ids"]), ids)),
            "mask_ok": bool(torch.equal(runtime.to_cpu(dev["attention_mask"]), ids % 2)),
            "margin": runtime.to_cpu(dev["margin"]).tolist(),
            "margin_shards": [s.tolist() for s in runtime.local_shard_data(dev["margin"])],
            "note": dev["note"],
            "host_rows": runtime.host_rows(4, (2, 2, 2), np.arange(8), runtime.local_device_ordinals()),
        }))
        """,
        num_devices=8,
    )
    assert out["ordinals"] == list(range(8))
    assert out["shards_ok"] == [True] * 8
    assert out["ids_ok"] and out["mask_ok"] and out["note"] == "passes through"
    assert out["margin"] == [0.5, 1.5] and out["margin_shards"] == [[0.5, 1.5]] * 8
    assert out["host_rows"] == [[0, 4]]


@pytest.mark.slow
def test_mp_not_dividing_heads_runs_and_matches_the_unsharded_model():
    """5 heads (and 5 kv heads) of width 8 over mp=4: the projections shard (40 / 4 = 10
    columns, 1.25 heads per device), GSPMD reshards at the head reshape; loss and gradients
    equal the host model's."""
    out = run_with_devices(
        """
        import json, logging, torch
        from transformers import LlamaForCausalLM
        from torchxla_rlhf import runtime
        from torchxla_rlhf.models import llama
        from torchxla_rlhf.algos.losses import sequence_logps
        warnings = []
        logging.getLogger("torchxla_rlhf.models.sharding").addHandler(
            type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
        mesh = runtime.make_mesh("1,2,4")
        tiny = llama.TinyModelConfig(hidden_size=40, intermediate_size=64, num_attention_heads=5,
                                      num_key_value_heads=5)
        cfg = llama.ModelConfig(compute_dtype="float32", tiny=tiny)
        xla_model = llama.load_causal_lm(cfg, mesh)
        host = LlamaForCausalLM(llama.tiny_llama_config(tiny))
        host.config._attn_implementation = "eager"
        host.load_state_dict({n: runtime.to_cpu(p) for n, p in xla_model.named_parameters()})
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 250, (4, 12), generator=g)
        mask = torch.ones_like(ids); mask[1, 9:] = 0
        loss_mask = mask.clone(); loss_mask[:, :4] = 0

        def loss_of(model, ids, mask, loss_mask):
            logits = llama.causal_lm_logits(model, ids, mask)
            return -sequence_logps(logits, ids, loss_mask).mean()

        host_loss = loss_of(host, ids, mask, loss_mask)
        host_loss.backward()
        batch = runtime.batch_to_device({"i": ids, "m": mask, "l": loss_mask}, mesh)
        xla_loss = loss_of(xla_model, batch["i"], batch["m"], batch["l"])
        xla_loss.backward()
        runtime.sync()
        diffs = {}
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                     "model.layers.0.self_attn.o_proj.weight", "model.embed_tokens.weight"):
            a = runtime.to_cpu(dict(xla_model.named_parameters())[name].grad)
            b = dict(host.named_parameters())[name].grad
            diffs[name] = float((a - b).abs().max() / b.abs().max())
        print(json.dumps({"host": float(host_loss), "xla": float(runtime.to_cpu(xla_loss)),
                          "grad_rel_diff": diffs, "warnings": warnings}))
        """,
        num_devices=8,
    )
    assert abs(out["host"] - out["xla"]) < 1e-4 * abs(out["host"])
    assert max(out["grad_rel_diff"].values()) < 1e-4, out["grad_rel_diff"]
    assert any("mp=4 does not divide num_attention_heads=5" in w for w in out["warnings"])
