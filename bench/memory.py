"""Per-device memory: the planner's figure next to what XLA:CPU allocates for the same graphs.

    PYTHONPATH=. python bench/memory.py [--quick]

1. Trainer proxies (DPO, reward model, PPO, GRPO) with the 13B model's ratios (head_dim 128,
   intermediate/hidden 2.7, vocab/hidden 6.25; fp32, checkpointing on) at 2, 4, 8 and 16
   layers and 256-token sequences, on two 8-device meshes with mp > 1, and held-out
   DPO and reward-model proxies at 2048 tokens (2 and 8 layers, mesh 1,4,2). Each is
   compiled by ``tools.memory_probe`` in a subprocess with ``--xla_dump_to``; the
   measured per-device peak is the buffer assignment's "Total bytes used" of the step's
   graph (forward, backward and AdamW in one graph), planned with XLA:CPU's gradient
   all-reduce. The ``train, grads scattered`` row is the same graph's peak with each FSDP
   gradient all-reduce's output counted at 1/fsdp over its live range (what a reduce-scatter
   holds; ``tools.xla_dump.peak_with_scattered_gradients``), planned as for a TPU. For PPO's
   rollout graphs (PPO, GRPO), plus the bytes of the shards that stay resident meanwhile (value model,
   optimizer state, frozen models), read from the tensors' shard shapes. Target: planner
   within +-15 %. Training steps also show the planner's figure with checkpointing off.
2. The 1-layer attention probe (8 heads, hidden 320, mesh 1,2,4, 4 rows per device, seq 512,
   forward + backward + checkpointing): HF eager vs the einsum attention. Target: einsum's
   per-device peak <= eager's / 2.5.
(The planner at the seed's 13B shapes on v3-128, v3-256, v4-64 and v5p-32: ``bench/pod_table.py``.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools import xla_dump  # noqa: E402
from torchxla_rlhf.preflight import memory_plan  # noqa: E402
from torchxla_rlhf.configs.loader import load_config  # noqa: E402
from torchxla_rlhf.configs.dpo import DPOConfig  # noqa: E402
from torchxla_rlhf.configs.grpo import GRPOConfig
from torchxla_rlhf.configs.ppo import PPOConfig
from torchxla_rlhf.configs.reward import RewardConfig

MIB = 1 << 20
KINDS = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig}
ROLLOUT_KINDS = ("ppo", "grpo")


DEPTHS = (2, 4, 8, 16)
MESHES = (("1,4,2", 8), ("1,2,4", 8))


PROXY_SHAPE = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                   intermediate_size=688, vocab_size=1600)
"""Llama-2 13B's ratios at hidden 256: head_dim 128, intermediate/hidden 13824/5120 (= 2.7:
688, divisible by mp 4), vocab/hidden 6.25."""


def shape_overrides(section: str, layers: int, max_positions: int = 1024) -> list[str]:
    """The :data:`PROXY_SHAPE` model at ``layers`` layers, fp32 parameters, checkpointing on."""
    shape = dict(PROXY_SHAPE, num_hidden_layers=layers, max_position_embeddings=max_positions)
    return ([f"{section}.name_or_path=tiny", f"{section}.compute_dtype=float32",
             f"{section}.param_dtype=float32", f"{section}.gradient_checkpointing=true"]
            + [f"{section}.tiny.{k}={v}" for k, v in shape.items()])


LONG = (("dpo", 2), ("dpo", 8), ("reward", 2), ("reward", 8))
"""Held-out proxies (skipped with ``--no-long``): preference pairs at ``LONG_SEQ`` tokens, one row
per device, mesh 1,4,2: the attention scores, which the 256-token proxies hardly exercise,
become the largest transient."""
LONG_SEQ = 2048


def proxy_overrides(kind: str, mesh: str, layers: int, seq: int = 256) -> list[str]:
    out = [f"mesh_dim={mesh}", *shape_overrides("model", layers, max(1024, 2 * seq))]
    if kind == "ppo":
        return out + shape_overrides("reward_model", layers) + [
            "train_dataset.seq_length=128", "max_continuation_len=128", "train_dataset.batch_size=8",
            "mini_batch_size=8", "optimizer.accumulate_gradient_steps=2"]
    if kind == "grpo":  # 2 prompts x 4 completions, a KL term (the frozen reference loaded)
        return out + [
            "train_dataset.seq_length=128", "max_continuation_len=128", "train_dataset.batch_size=2",
            "rollouts_per_prompt=4", "mini_batch_size=8", "optimizer.accumulate_gradient_steps=2",
            "beta=0.04"]
    return out + [f"train_dataset.seq_length={seq}", f"train_dataset.batch_size={max(2, 1024 // seq)}"]


def run_probe(args: list[str], devices: int, dump: str) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_dump_to={dump}")
    proc = subprocess.run([sys.executable, "-m", "tools.memory_probe", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def graph_bytes(dump: str, name: str) -> int:
    """Largest per-device bytes over the dumped modules of graph ``name``."""
    sizes = [b for key, b in xla_dump.peak_bytes_by_module(dump).items() if key.split(".")[1] == name]
    if not sizes:
        raise RuntimeError(f"no module {name!r} in {dump}")
    return max(sizes)


SCATTERED = "train, grads scattered"
"""The training step's row with its gradient all-reduces counted as reduce-scatters."""


def weight_elements(mesh: str) -> set[int]:
    """Elements of each proxy weight whole over fsdp and split over mp (what a gradient
    all-reduce over fsdp outputs)."""
    h, i, v = (PROXY_SHAPE[k] for k in ("hidden_size", "intermediate_size", "vocab_size"))
    kv = h // PROXY_SHAPE["num_attention_heads"] * PROXY_SHAPE["num_key_value_heads"]
    mp = int(mesh.split(",")[2])
    return {h * h // mp, kv * h // mp, i * h // mp, v * h // mp}


def measure_proxy(kind: str, mesh: str, devices: int, layers: int, seq: int = 256) -> list[tuple]:
    """``(phase, measured)`` per-device peak bytes of a trainer proxy's phases: the training
    step (``train micro-step``; again as :data:`SCATTERED`, derived from the same buffer live
    ranges) and, for PPO and GRPO, the rollout (its graphs plus the shards that stay resident
    meanwhile)."""
    config = os.path.join(REPO, "configs", "tiny", f"{kind}.yaml")
    overrides = proxy_overrides(kind, mesh, layers, seq)
    with tempfile.TemporaryDirectory() as dump:
        out = run_probe([kind, config, *overrides], devices, dump)
        fsdp = int(mesh.split(",")[1])
        rows = [("train micro-step", graph_bytes(dump, "proxy_train")),
                (SCATTERED, xla_dump.peak_with_scattered_gradients(
                    dump, "proxy_train", devices, fsdp, weight_elements(mesh)))]
        if kind in ROLLOUT_KINDS:
            rollout = max(graph_bytes(dump, "generation_prefill"),
                          graph_bytes(dump, "generation_decode_loop"))
            rows.append(("rollout", rollout + out["outside"]["generation"]))
    return rows


def measured_proxies(args, meshes, depths):
    """``(kind, mesh, devices, layers, [(phase, measured bytes)])`` of every proxy asked for:
    compiled and measured now, or read back from a ``--save`` file (``--replan``)."""
    if args.replan:
        with open(args.replan) as f:
            for line in f:
                r = json.loads(line)
                yield (r["kind"], r["mesh"], r["devices"], r["layers"], r.get("seq", 256),
                       [tuple(x) for x in r["rows"]])
        return
    for kind in args.trainers.split(","):
        for mesh, devices in meshes:
            for layers in depths:
                yield kind, mesh, devices, layers, 256, measure_proxy(kind, mesh, devices, layers)
    if args.long:
        for kind, layers in LONG:
            if kind in args.trainers.split(","):
                yield kind, "1,4,2", 8, layers, LONG_SEQ, measure_proxy(kind, "1,4,2", 8, layers, LONG_SEQ)


def planned(kind: str, mesh: str, devices: int, layers: int, phase: str,
            seq: int = 256) -> tuple[float, float]:
    """The planner's per-device peak of a proxy's phase (persistent state plus the phase), as
    configured (checkpointing on) and with checkpointing off. Gradients as XLA:CPU reduces
    them (all-reduce), or reduce-scattered for the :data:`SCATTERED` row."""
    config = os.path.join(REPO, "configs", "tiny", f"{kind}.yaml")
    gradients = "reduce_scatter" if phase == SCATTERED else "all_reduce"
    phase = "train micro-step" if phase == SCATTERED else phase
    out = []
    for ckpt in ("true", "false"):
        overrides = [o.replace("gradient_checkpointing=true", f"gradient_checkpointing={ckpt}")
                     for o in proxy_overrides(kind, mesh, layers, seq)]
        plan = memory_plan.plan(load_config(KINDS[kind], config, overrides), devices,
                                gradients=gradients, compiler="xla_cpu")
        out.append(sum(t.bytes for t in plan.persistent) + plan.phase_total(phase))
    return out[0], out[1]


def attention_probe(attn: str) -> int:
    spec = dict(mesh="1,2,4", attn_implementation=attn, hidden=320, heads=8, kv_heads=8,
                layers=1, intermediate=640, vocab=320, batch=8, seq=512,
                gradient_checkpointing=True)
    with tempfile.TemporaryDirectory() as dump:
        run_probe([json.dumps(spec)], 8, dump)
        return graph_bytes(dump, "probe_train")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 and 4 layers on one mesh only")
    parser.add_argument("--trainers", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--layers", default=",".join(map(str, DEPTHS)),
                        help="comma-separated proxy depths")
    parser.add_argument("--meshes", default=";".join(m for m, _ in MESHES),
                        help="';'-separated subset of the 8-device meshes")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention probe")
    parser.add_argument("--no-long", dest="long", action="store_false",
                        help=f"skip the held-out {LONG_SEQ}-token proxies")
    parser.add_argument("--save", metavar="FILE",
                        help="also write each proxy's measured peaks to FILE (JSON lines)")
    parser.add_argument("--replan", metavar="FILE",
                        help="print the planner's figures against the peaks a --save run measured "
                             "(no compiling)")
    args = parser.parse_args()
    print("== trainer proxies (13B ratios, hidden 256): planner vs XLA:CPU per-device peak "
          "(target: within +-15 %)")
    meshes = [(m, d) for m, d in MESHES if m in args.meshes.split(";")]
    depths = [int(x) for x in args.layers.split(",")]
    if args.quick:
        meshes, depths, args.long = meshes[:1], [d for d in depths if d <= 4], False
    ok = True
    for kind, mesh, devices, layers, seq, rows in measured_proxies(args, meshes, depths):
        if args.save:
            with open(args.save, "a") as f:
                f.write(json.dumps(dict(kind=kind, mesh=mesh, devices=devices, layers=layers,
                                        seq=seq, rows=rows)) + "\n")
        for phase, measured in rows:
            plan, plan_off = planned(kind, mesh, devices, layers, phase, seq)
            err = plan / measured - 1
            ok &= abs(err) <= 0.15
            off = "" if phase in ("rollout", SCATTERED) else (
                f", checkpointing off {plan_off / MIB:7.1f} MiB "
                f"{plan_off / measured - 1:+.0%}")
            print(f"  {kind:<6} {phase:<21} mesh {mesh} L={layers:<2} S={seq:<4}: measured "
                  f"{measured / MIB:7.1f} MiB, planner {plan / MIB:7.1f} MiB "
                  f"{err:+.0%}{off}",
                  flush=True)
    if args.no_attention:
        print("targets hold" if ok else "TARGETS MISSED")
        return
    print("== 1-layer attention probe (mesh 1,2,4, 8 heads, seq 512, fwd+bwd, checkpointing)")
    eager, einsum = attention_probe("eager"), attention_probe("auto")
    print(f"  eager {eager / MIB:.1f} MiB, einsum {einsum / MIB:.1f} MiB: "
          f"{eager / einsum:.2f}x smaller (target >= 2.5x)")
    ok &= eager / einsum >= 2.5
    print("targets hold" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
