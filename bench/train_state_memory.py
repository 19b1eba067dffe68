"""Host memory of saving and loading the sharded training state (torchxla_rlhf/checkpoint/state.py).

    python bench/train_state_memory.py [--devices 4 8] [--params-millions 100]

For each device count (a fresh process with that many XLA:CPU devices): builds parameters and
AdamW moments (fp32, ``--params-millions`` parameters, so 12 bytes each: 100M -> 1.2 GB of
state) sharded over an fsdp mesh, then measures the peak resident memory *above the baseline*
(the process with its state on the devices: on XLA:CPU the devices' buffers are host memory,
so they are in the baseline) while saving, and again while loading, and prints it as a
multiple of the bytes of this process's own shards (target: at most 1.2x). The peak is the
kernel's high-water mark (VmHWM), reset before each phase through /proc/self/clear_refs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, shutil, sys, tempfile, time, types
import torch
from torchxla_rlhf import runtime
from torchxla_rlhf.checkpoint import state as train_state

def vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

runtime.init()
mesh = runtime.make_mesh("1,-1,1")
n_params = int(float(sys.argv[1]) * 1e6)
rows, cols = 4096, 1536  # 6.3M parameters (25 MB fp32) per tensor
count = max(1, round(n_params / (rows * cols)))
model = torch.nn.Module()
params, m, v = [], [], []
for i in range(count):
    # Built tensor by tensor straight into their shards (no whole-model host copy).
    p = torch.nn.Parameter(runtime.shard_to_device(torch.randn(rows, cols), mesh, ("fsdp", None)))
    model.register_parameter(f"w{i}", p)
    params.append(p)
    m.append(runtime.shard_to_device(torch.randn(rows, cols), mesh, ("fsdp", None)))
    v.append(runtime.shard_to_device(torch.rand(rows, cols), mesh, ("fsdp", None)))
opt = types.SimpleNamespace(params=params, exp_avg=m, exp_avg_sq=v,
                            count=torch.zeros((), device=runtime.device()))
runtime.sync(); runtime.wait()
state_bytes = 3 * 4 * count * rows * cols
out = tempfile.mkdtemp(dir=sys.argv[2])
try:
    base = vm("VmRSS"); reset_peak()
    t0 = time.perf_counter()
    train_state.save_training_state(out, {"policy": (model, opt)}, {"step": 1}, is_main_process=True)
    save_s = time.perf_counter() - t0
    save_peak = vm("VmHWM") - base
    own = sum(os.path.getsize(os.path.join(out, "training_state", "policy", f))
              for f in os.listdir(os.path.join(out, "training_state", "policy")) if f.endswith(".bin"))
    open(os.path.join(out, "_COMPLETE"), "w").close()
    base = vm("VmRSS"); reset_peak()
    t0 = time.perf_counter()
    train_state.load_training_state(out, {"policy": (model, opt)})
    runtime.wait()
    load_s = time.perf_counter() - t0
    load_peak = vm("VmHWM") - base
finally:
    shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"devices": runtime.device_count(), "state_gb": state_bytes / 1e9,
                  "own_shard_gb": own / 1e9, "save_extra_gb": save_peak / 1e9,
                  "load_extra_gb": load_peak / 1e9, "save_ratio": save_peak / own,
                  "load_ratio": load_peak / own, "save_s": save_s, "load_s": load_s}))
"""


def measure(devices: int, params_millions: float, tmp: str) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(params_millions), tmp],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{devices} devices: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[4, 8])
    p.add_argument("--params-millions", type=float, default=100.0)
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the state is written")
    a = p.parse_args()
    print(f"{'devices':>7} {'state GB':>9} {'own GB':>7} {'save +GB':>9} {'x own':>6} "
          f"{'load +GB':>9} {'x own':>6} {'save s':>7} {'load s':>7}")
    for n in a.devices:
        r = measure(n, a.params_millions, a.tmp)
        print(f"{r['devices']:>7} {r['state_gb']:>9.2f} {r['own_shard_gb']:>7.2f} "
              f"{r['save_extra_gb']:>9.3f} {r['save_ratio']:>6.3f} {r['load_extra_gb']:>9.3f} "
              f"{r['load_ratio']:>6.3f} {r['save_s']:>7.1f} {r['load_s']:>7.1f}")
    print("target: save and load at most 1.2x the process's own shards above the baseline")


if __name__ == "__main__":
    main()
