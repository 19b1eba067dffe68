"""``sampling.gather_weights: generation_layout``: the rollout reads a tensor-parallel copy of
the policy, so the decode loop moves activations, not weights.

The HLO test reads the optimized per-device decode module of an 8-layer proxy on an 8-device
XLA:CPU mesh (dp=1, fsdp=4, mp=2; tp=8) with ``tools.xla_dump.loop_collectives``: no
collective in the ``While`` body may have a weight's size, and its collective bytes per
iteration and device must be within 2x of tensor parallelism's lower bound (two all-reduces
of ``[rows per group, hidden]`` per layer). ``per_layer`` must fail the same check (negative
control). The proxy runs in float32: XLA:CPU has no bf16 dot, so under bf16 autocast its
all-reduces carry float32 anyway (seen: the same bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_with_devices
from tools import xla_dump
from torchxla_rlhf.configs.sections import SamplingConfig

MESH = (1, 4, 2)
SPEC = dict(mesh="1,4,2", hidden=256, heads=8, kv_heads=8, layers=8, intermediate=688,
            vocab=320, train=False, compute_dtype="float32",
            decode={"batch": 8, "prompt": 16, "new": 4})
N = 8
H, L, B, V, I = SPEC["hidden"], SPEC["layers"], SPEC["decode"]["batch"], SPEC["vocab"], SPEC["intermediate"]
WEIGHT_NUMELS = {H * H, H * I, V * H}
"""Element counts of the proxy's matrices (q/k/v/o, gate/up/down, embedding and LM head)."""


def weight_elements() -> set[int]:
    """A weight's element count, whole or split any way the 8 devices can split it."""
    return {n // k for n in WEIGHT_NUMELS for k in (1, 2, 4, 8)}


def tp_lower_bound(tp: int, dtype_bytes: int = 4) -> int:
    """Two all-reduces of [rows per group, hidden] per layer, bytes per device."""
    return 2 * L * (B // (N // tp)) * H * dtype_bytes


def check_decode_loop(hlo: str, tp: int) -> list[str]:
    """What is wrong with a decode module for the generation layout (empty: nothing)."""
    loops = xla_dump.loop_collectives(hlo, N)
    problems = []
    weights = xla_dump.weight_sized(loops.inside, weight_elements())
    if weights:
        problems.append(f"{len(weights)} weight-sized collectives in the While body, e.g. "
                        f"{weights[0]}")
    if loops.bytes_per_iteration > 2 * tp_lower_bound(tp):
        problems.append(f"{loops.bytes_per_iteration} collective bytes per iteration and device "
                        f"> 2 x the tensor-parallel bound {tp_lower_bound(tp)}")
    return problems


def decode_hlo(policy: str, dump_dir: str, tp: int = 0) -> str:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(N), PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_dump_to={dump_dir}")
    spec = json.dumps({**SPEC, "gather_weights": policy, "generation_tp": tp})
    proc = subprocess.run([sys.executable, "-m", "tools.memory_probe", spec], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return xla_dump.optimized_hlo(dump_dir, "generation_decode_loop")


@pytest.mark.multiprocess
def test_decode_loop_moves_activations_not_weights(tmp_path):
    layout = decode_hlo("generation_layout", str(tmp_path / "layout"), tp=8)
    assert check_decode_loop(layout, 8) == [], xla_dump.loop_collectives(layout, N).table()
    # Negative control: the same check on per_layer fails on both counts.
    per_layer = decode_hlo("per_layer", str(tmp_path / "per_layer"))
    problems = check_decode_loop(per_layer, 8)
    assert len(problems) == 2, problems
    assert (xla_dump.loop_collectives(per_layer, N).bytes_per_iteration
            > 20 * xla_dump.loop_collectives(layout, N).bytes_per_iteration)


_AGREE = r"""
import json, torch, transformers
from torchxla_rlhf import runtime
from torchxla_rlhf.models import sharding
from torchxla_rlhf.generation import Generator, SamplingConfig
from tests.test_generation import left_padded
mesh = runtime.make_mesh("1,4,2")
dev = runtime.device()
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=688,
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    max_position_embeddings=128, tie_word_embeddings=False)
cfg._attn_implementation = "eager"
model = transformers.LlamaForCausalLM(cfg).to(dev)
sharding.shard_model(model, mesh)
ids, mask = left_padded([6, 2, 5, 7, 8, 3, 4, 8], 8, seed=4)
ids, mask = ids.to(dev), mask.to(dev)
runtime.sync()
out = {"compiles": {}, "captures": {}}

def logps(seq, gen=None):
    # Log-probs of every token under the model, in the generation layout's copy or not.
    import contextlib
    ctx = contextlib.nullcontext() if gen is None else gen._weights_in_layout(gen._layout_copy())
    with torch.no_grad(), ctx:
        logits = model(input_ids=seq, attention_mask=(seq != -1).long()).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, seq[:, 1:, None])[..., 0].cpu()

for name, sampling in (("greedy", dict(greedy=True)), ("sampled", dict(temperature=0.7, top_k=50))):
    seqs = {}
    for policy in ("per_layer", "generation_layout"):
        g = Generator(model, SamplingConfig(gather_weights=policy, **sampling), eos_token_id=2,
                      pad_token_id=0, mesh=mesh)
        seqs[policy] = g.generate(ids, mask, 12, seed=3).sequences.cpu().to(dev)
        c0 = runtime.compile_count()
        again = g.generate(ids, mask, 12, seed=3).sequences.cpu()
        out["compiles"][f"{name}/{policy}"] = runtime.compile_count() - c0
        out["captures"][f"{name}/{policy}"] = g._loop.captures
        assert torch.equal(again, seqs[policy].cpu())
        gens = g
    out[name] = torch.equal(seqs["per_layer"].cpu(), seqs["generation_layout"].cpu())
    out["new"] = int((seqs["per_layer"].cpu()[:, 8:] != 0).sum())
    if name == "greedy":
        a, b = logps(seqs["per_layer"]), logps(seqs["per_layer"], gens)
        out["logp_max_diff"] = float((a - b).abs().max())
# An updated policy reaches the next rollout's copy, with no new trace.
with torch.no_grad():
    model.lm_head.weight.mul_(-1.0)
runtime.sync()
flipped = gens.generate(ids, mask, 12, seed=3).sequences.cpu()
ref = Generator(model, SamplingConfig(temperature=0.7, top_k=50), eos_token_id=2, pad_token_id=0,
                mesh=mesh).generate(ids, mask, 12, seed=3).sequences.cpu()
out["updated"] = torch.equal(flipped, ref) and not torch.equal(flipped, seqs["generation_layout"].cpu())
out["updated_captures"] = gens._loop.captures
print(json.dumps(out))
"""


@pytest.mark.multiprocess
def test_layout_matches_per_layer_and_compiles_once():
    """8 devices, 8 layers, kv-heads 4 (not a multiple of tp=8: the cache and attention
    replicate them over tp): greedy and sampled tokens bit-identical to per_layer's, the
    tokens' log-probs under the copy equal to float tolerance, nothing compiled or traced on
    a second rollout, and a weight update reaches the next rollout."""
    r = run_with_devices(_AGREE, N, timeout=900)
    assert r["greedy"] and r["sampled"], r
    assert r["new"] > 0, r
    assert r["logp_max_diff"] < 1e-4, r
    assert r["compiles"]["greedy/generation_layout"] == 0, r
    assert r["compiles"]["sampled/generation_layout"] == 0, r
    assert set(r["captures"].values()) == {1}, r
    assert r["updated"] and r["updated_captures"] == 1, r


# ----------------------------------------------------------------------------------------
# Fast: config, the planner's figures, the HLO reader
# ----------------------------------------------------------------------------------------


def test_bad_values_are_one_line_errors_naming_the_key():
    with pytest.raises(ValueError, match="gather_weights"):
        SamplingConfig(gather_weights="layout")
    with pytest.raises(ValueError, match="generation_tp"):
        SamplingConfig(generation_tp=-1)
    from torchxla_rlhf import runtime

    class M:  # the mesh's sizes only: the check runs before torch_xla is touched
        dp, fsdp, mp = 1, 4, 2

    assert runtime.generation_tp_choices(M) == [2, 4, 8]
    with pytest.raises(runtime.MeshError, match=r"sampling.generation_tp=3: .*\[2, 4, 8\]"):
        runtime.generation_mesh(M, 3)


def test_planner_counts_the_layout_and_auto_needs_known_memory():
    from tests.test_memory_plan import _cfg  # the shipped 13B configs, as Llama-2 13B
    from torchxla_rlhf.preflight import memory_plan
    from torchxla_rlhf.configs.ppo import PPOConfig
    from torchxla_rlhf.preflight.mesh import Mesh
    from torchxla_rlhf.preflight.shapes import Shape

    shape = Shape(vocab=32000, hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40)
    mesh = Mesh(1, 64, 4)
    # The figure: TP over 16 devices, 512 rows: ~26 MB per device per token.
    b = memory_plan.per_token_collective_bytes(shape, mesh, "generation_layout", 512,
                                               "float32", "bfloat16", tp=16)
    assert b["weights"] == 0 and 26e6 < b["activations"] < 28e6
    per_layer = memory_plan.per_token_collective_bytes(shape, mesh, "per_layer", 512,
                                                       "float32", "bfloat16")
    assert per_layer["weights"] > 200 * b["activations"]
    assert memory_plan.generation_copy_bytes(shape, 16, "bfloat16", "bfloat16") == \
        pytest.approx(shape.linear_params(True) * 2 / 16 + shape.other_params() * 2 / 16)
    cfg = _cfg(PPOConfig, "ppo_13b.yaml")
    assert cfg.sampling.gather_weights == "auto"
    assert memory_plan.resolve_sampling(cfg, 256, None).gather_weights == "per_layer"
    chosen = memory_plan.resolve_sampling(cfg, 256, 16 * memory_plan.GIB)
    assert (chosen.gather_weights, chosen.generation_tp) == ("generation_layout", 4)
    p = memory_plan.plan(cfg, 256, 16 * memory_plan.GIB)
    assert p.fits and p.phases["rollout prefill"][0].name == "weights copy (generation layout)"
    lines = memory_plan.rollout_policies(cfg, 256, 16 * memory_plan.GIB)
    assert [ln.split()[1] for ln in lines] == ["per_layer", "hoisted", "generation_layout"]
    assert lines[2].endswith("<- auto")
    # hoisted does not hoist on a TPU (the compiler keeps the gathers in the loop): XLA:TPU
    # holds what per_layer holds; on XLA:CPU it holds every layer and does not fit.
    assert lines[1].split("peak")[1] == lines[0].split("peak")[1]
    cpu = memory_plan.plan(_cfg(PPOConfig, "ppo_13b.yaml", "sampling.gather_weights=hoisted"), 256,
                           16 * memory_plan.GIB, compiler="xla_cpu")
    assert cpu.fits is False


def test_loop_collectives_reads_every_kind_with_its_bytes():
    hlo = ("%add (a: f32[], b: f32[]) -> f32[] {\n  ROOT %s = f32[] add(%a, %b)\n}\n\n"
           "%body (t: (s64[])) -> (s64[]) {\n"
           "  %ar = bf16[8,256]{1,0} all-reduce(%x), channel_id=1, replica_groups=[1,8]<=[8], "
           "use_global_device_ids=true, to_apply=%add\n"
           "  %ag = f32[256,128]{1,0} all-gather(%w), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, "
           "dimensions={0}\n"
           "  %cp = s32[8,5]{1,0} collective-permute(%y), channel_id=3, source_target_pairs={{0,1},{1,0}}\n"
           "}\n\n%cond (t: (s64[])) -> pred[] {\n  ROOT %c = pred[] constant(true)\n}\n\n"
           "ENTRY %main (p: f32[2]) -> f32[2] {\n"
           "  %a2a = (f32[1,40]{1,0}, f32[1,40]{1,0}) all-to-all(%p, %q), channel_id=4, "
           "replica_groups={{0,1}}\n"
           "  %w = (s64[]) while(%t), condition=%cond, body=%body\n}\n")
    loops = xla_dump.loop_collectives(hlo, 8)
    assert [(t.kind, t.bytes) for t in loops.inside] == [
        ("all-reduce", 8 * 256 * 2), ("all-gather", 256 * 128 * 4), ("collective-permute", 160)]
    assert [(t.kind, t.bytes) for t in loops.outside] == [("all-to-all", 320)]
    assert loops.inside[0].groups == (tuple(range(8)),)
    assert [t.kind for t in xla_dump.weight_sized(loops.inside, {256 * 128})] == ["all-gather"]
    assert "while body (per iteration): 3 collectives" in loops.table()
