"""Per-device memory: the planner's figure next to what XLA:CPU allocates for the same graphs.

    PYTHONPATH=. python bench/memory.py [--quick]

1. Trainer proxies (DPO, reward model, PPO) with the 13B model's ratios (head_dim 128,
   intermediate/hidden 2.7, vocab/hidden 6.25, bf16 compute over fp32 parameters,
   checkpointing on), 2 layers and 256-token sequences, on 4- and 8-device meshes. Each is
   compiled by ``torchxla_rlhf.memory_probe`` in a subprocess with ``--xla_dump_to``; the
   measured per-device peak is the buffer assignment's "Total bytes used" of the step's
   graph (forward, backward and AdamW in one graph); for PPO's rollout graphs, plus the bytes
   of the shards that stay resident meanwhile (value model, optimizer state, frozen models),
   read from the tensors' shard shapes. Target: planner within +-25 %.
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

from torchxla_rlhf import memory_plan, xla_dump  # noqa: E402
from torchxla_rlhf.config import load_config  # noqa: E402
from torchxla_rlhf.configs import DPOConfig, PPOConfig, RewardConfig  # noqa: E402

MIB = 1 << 20
KINDS = {"dpo": DPOConfig, "reward": RewardConfig, "ppo": PPOConfig}


def shape_overrides(section: str) -> list[str]:
    """A 2-layer model with the 13B's ratios (head_dim 128, I/H 2.7, V/H 6.25)."""
    shape = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=688, num_hidden_layers=2, vocab_size=1600,
                 max_position_embeddings=1024)
    return ([f"{section}.name_or_path=tiny", f"{section}.compute_dtype=float32",
             f"{section}.param_dtype=float32", f"{section}.gradient_checkpointing=true"]
            + [f"{section}.tiny.{k}={v}" for k, v in shape.items()])


def proxy_overrides(kind: str, mesh: str) -> list[str]:
    out = [f"mesh_dim={mesh}", *shape_overrides("model")]
    if kind == "ppo":
        return out + shape_overrides("reward_model") + [
            "train_dataset.seq_length=128", "max_continuation_len=128", "train_dataset.batch_size=8",
            "mini_batch_size=8", "optimizer.accumulate_gradient_steps=2"]
    return out + ["train_dataset.seq_length=256", "train_dataset.batch_size=4"]


def run_probe(args: list[str], devices: int, dump: str) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_dump_to={dump}")
    proc = subprocess.run([sys.executable, "-m", "torchxla_rlhf.memory_probe", *args], env=env,
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


def measure_proxy(kind: str, mesh: str, devices: int) -> tuple[float, float, str]:
    """(measured, planned) per-device peak bytes of a trainer proxy, and the planned phase."""
    config = os.path.join(REPO, "configs", "tiny", f"{kind}.yaml")
    overrides = proxy_overrides(kind, mesh)
    with tempfile.TemporaryDirectory() as dump:
        out = run_probe([kind, config, *overrides], devices, dump)
        measured = graph_bytes(dump, "proxy_train")
        if kind == "ppo":
            rollout = max(graph_bytes(dump, "generation_prefill"),
                          graph_bytes(dump, "generation_decode_loop"))
            measured = max(measured, rollout + out["outside"]["generation"])
    plan = memory_plan.plan(load_config(KINDS[kind], config, overrides), devices)
    return measured, plan.peak, plan.peak_phase


def attention_probe(attn: str) -> int:
    spec = dict(mesh="1,2,4", attn_implementation=attn, hidden=320, heads=8, kv_heads=8,
                layers=1, intermediate=640, vocab=320, batch=8, seq=512,
                gradient_checkpointing=True)
    with tempfile.TemporaryDirectory() as dump:
        run_probe([json.dumps(spec)], 8, dump)
        return graph_bytes(dump, "probe_train")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4-device proxies only")
    args = parser.parse_args()
    print("== trainer proxies: planner vs XLA:CPU per-device peak (target: within +-25 %)")
    meshes = [("1,2,2", 4)] + ([] if args.quick else [("1,4,2", 8)])
    ok = True
    for kind in KINDS:
        for mesh, devices in meshes:
            measured, planned, phase = measure_proxy(kind, mesh, devices)
            err = planned / measured - 1
            ok &= abs(err) <= 0.25
            print(f"  {kind:<7} mesh {mesh} ({devices} dev): measured {measured / MIB:8.1f} MiB, "
                  f"planner {planned / MIB:8.1f} MiB ({phase}), {err:+.0%}", flush=True)
    print("== 1-layer attention probe (mesh 1,2,4, 8 heads, seq 512, fwd+bwd, checkpointing)")
    eager, einsum = attention_probe("eager"), attention_probe("auto")
    print(f"  eager {eager / MIB:.1f} MiB, einsum {einsum / MIB:.1f} MiB: "
          f"{eager / einsum:.2f}x smaller (target >= 2.5x)")
    ok &= eager / einsum >= 2.5
    print("targets hold" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
