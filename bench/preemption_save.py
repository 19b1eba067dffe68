"""Size of the preemption save (the sharded training state) per host, for each 13B config.

    python bench/preemption_save.py [--bandwidth-mb-s 400] [--notice-s 30]

Computed, not measured: the trained models are built on the meta device (no memory, no
weights) with Llama-2 13B shapes; each parameter gets its partition spec from the project's
sharding rules on the config's mesh; each distinct shard box is written once, by the host of
its lowest-numbered device (replica 0), 8 devices per v3 host. Per parameter the state is the
parameter and AdamW's two moments, all in the config's ``param_dtype`` (float32). The write
time is that size over an assumed per-host upload bandwidth (``--bandwidth-mb-s``), an input
to check on the pod, not a measurement.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchxla_rlhf.models import sharding  # noqa: E402
from torchxla_rlhf.preflight.memory_plan import LLAMA2  # noqa: E402
from torchxla_rlhf.runtime import parse_mesh_dim  # noqa: E402

DEVICES_PER_HOST = 8
CONFIGS = {
    # config: (trained model classes, {pod: mesh_dim}) as the configs' headers list them
    "dpo_13b": (("LlamaForCausalLM",), {"v3-256": "-1,16,16", "v3-128": "-1,16,8"}),
    "reward_13b": (("LlamaForSequenceClassification",), {"v3-256": "1,64,4", "v3-128": "1,64,2"}),
    "ppo_13b": (("LlamaForCausalLM", "LlamaForSequenceClassification"),
                {"v3-256": "1,64,4", "v3-128": "1,32,4"}),
}


def named_shapes(cls_name: str) -> list[tuple[str, tuple[int, ...]]]:
    s = LLAMA2["13b"]
    cfg = transformers.LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden,
                                   intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                                   num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                                   num_labels=1, pad_token_id=0)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


def per_host_bytes(cls_names, mesh_dim: str, devices: int, bytes_per_elem: int) -> np.ndarray:
    dp, fsdp, mp = parse_mesh_dim(mesh_dim, devices)
    coords = np.stack(np.unravel_index(np.arange(devices), (dp, fsdp, mp)), axis=1)
    axis = {"dp": 0, "fsdp": 1, "mp": 2}
    sizes = {"dp": dp, "fsdp": fsdp, "mp": mp}
    hosts = np.zeros(devices // DEVICES_PER_HOST)
    for cls_name in cls_names:
        shapes = named_shapes(cls_name)
        rules = sharding.CAUSAL_LM_RULES if cls_name == "LlamaForCausalLM" else sharding.SEQUENCE_CLASSIFIER_RULES
        specs = sharding.match_specs(shapes, rules, axis_sizes=sizes)
        for name, shape in shapes:
            key = np.zeros(devices, dtype=np.int64)
            boxes = 1
            for axes in specs[name]:
                for a in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
                    key = key * sizes[a] + coords[:, axis[a]]
                    boxes *= sizes[a]
            nbytes = math.prod(shape) * bytes_per_elem * 3 / boxes  # param, exp_avg, exp_avg_sq
            for k in np.unique(key):
                first = int(np.flatnonzero(key == k)[0])  # replica 0: the lowest device
                hosts[first // DEVICES_PER_HOST] += nbytes
    return hosts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bandwidth-mb-s", type=float, default=400.0,
                   help="assumed upload bandwidth of one host to the bucket (MB/s)")
    p.add_argument("--notice-s", type=float, default=30.0)
    a = p.parse_args()
    print(f"{'config':<11} {'pod':<7} {'hosts':>5} {'total GB':>9} {'max/host GB':>11} "
          f"{'min/host GB':>11} {'write s':>8} {'fits ' + str(int(a.notice_s)) + ' s':>8}")
    for name, (classes, pods) in CONFIGS.items():
        for pod, mesh in pods.items():
            devices = int(pod.split("-")[1])
            hosts = per_host_bytes(classes, mesh, devices, bytes_per_elem=4)
            worst = hosts.max()
            seconds = worst / (a.bandwidth_mb_s * 1e6)
            print(f"{name:<11} {pod:<7} {len(hosts):>5} {hosts.sum() / 1e9:>9.1f} "
                  f"{worst / 1e9:>11.2f} {hosts.min() / 1e9:>11.2f} {seconds:>8.1f} "
                  f"{'yes' if seconds < a.notice_s else 'NO':>8}")


if __name__ == "__main__":
    main()
