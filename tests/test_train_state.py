"""Sharded training state: each process writes the shards its devices hold (replica 0 of
each piece, no all-gather), loads only what overlaps its devices, and reshards onto another
mesh; a checkpoint holds its state iff it is complete."""

from __future__ import annotations

import pytest
import torch

from helpers import read_metrics, run_with_devices

CODE = r"""
import json, os, tempfile, types
import torch
from torchxla_rlhf import runtime
from torchxla_rlhf.checkpoint import COMPLETE_MARKER, write_json
from torchxla_rlhf.checkpoint import state as train_state

runtime.init()
torch.manual_seed(0)
SHAPES = {"a.weight": (8, 12), "a.bias": (8,), "b.weight": (6, 8)}
HOST = {k: {kind: torch.randn(s) for kind in ("param", "exp_avg", "exp_avg_sq")}
        for k, s in SHAPES.items()}

def build(mesh_dim, specs):
    # A model and an AdamW-shaped state whose tensors carry the given shardings.
    mesh = runtime.make_mesh(mesh_dim)
    model = torch.nn.Module()
    for sub in ("a", "b"):
        setattr(model, sub, torch.nn.Module())
    params, m, v = [], [], []
    for k in SHAPES:
        sub, attr = k.split(".")
        t = {kind: runtime.shard_to_device(torch.zeros(SHAPES[k]), mesh, specs[k]) for kind in HOST[k]}
        p = torch.nn.Parameter(t["param"])
        setattr(getattr(model, sub), attr, p)
        params.append(p); m.append(t["exp_avg"]); v.append(t["exp_avg_sq"])
    count = torch.zeros((), device=runtime.device())
    return model, types.SimpleNamespace(params=params, exp_avg=m, exp_avg_sq=v, count=count)

def fill(model, opt):
    with torch.no_grad():
        for (k, p), a, b in zip(model.named_parameters(), opt.exp_avg, opt.exp_avg_sq):
            p.copy_(HOST[k]["param"]); a.copy_(HOST[k]["exp_avg"]); b.copy_(HOST[k]["exp_avg_sq"])
        opt.count.fill_(7.0)
    runtime.sync()

def equal(model, opt):
    ok = float(opt.count.cpu()) == 7.0
    for (k, p), a, b in zip(model.named_parameters(), opt.exp_avg, opt.exp_avg_sq):
        ok &= torch.equal(p.cpu(), HOST[k]["param"]) and torch.equal(a.cpu(), HOST[k]["exp_avg"])
        ok &= torch.equal(b.cpu(), HOST[k]["exp_avg_sq"])
    return bool(ok)

# fsdp-sharded and partially replicated (over mp, on this one process: pytorch/xla#7919's case).
specs = {"a.weight": ("fsdp", None), "a.bias": (None,), "b.weight": ("mp", "fsdp")}
model, opt = build("1,2,2", specs)
fill(model, opt)
d = tempfile.mkdtemp()
train_state.save_training_state(d, {"policy": (model, opt)}, {"step": 3}, is_main_process=True)
open(os.path.join(d, COMPLETE_MARKER), "w").close()
manifest = json.load(open(os.path.join(d, "training_state", "policy", "process-00000-of-00001.json")))
stored = {k: sum(__import__("math").prod(b - a for a, b in p["box"]) for p in e["pieces"])
          for k, e in manifest["tensors"].items()}
expected = {"count": 1, **{f"{kind}.{k}": __import__("math").prod(s) for k, s in SHAPES.items()
                           for kind in HOST[k]}}
size = os.path.getsize(os.path.join(d, "training_state", "policy", "process-00000-of-00001.bin"))

with torch.no_grad():
    for t in [*model.parameters(), *opt.exp_avg, *opt.exp_avg_sq, opt.count]:
        t.zero_()
runtime.sync()
same = train_state.load_training_state(d, {"policy": (model, opt)})
same_ok = equal(model, opt)

# Another mesh and other shardings: the state reshards.
other = {"a.weight": (None, "fsdp"), "a.bias": ("fsdp",), "b.weight": (None, None)}
model2, opt2 = build("1,4,1", other)
train_state.load_training_state(d, {"policy": (model2, opt2)})
print(json.dumps({"stored": stored == expected, "bytes": size == 4 * sum(expected.values()),
                  "step": same["step"], "same_ok": same_ok, "resharded_ok": equal(model2, opt2)}))
"""


@pytest.mark.slow
def test_sharded_state_roundtrip_and_reshard():
    r = run_with_devices(CODE, 4)
    assert r == {"stored": True, "bytes": True, "step": 3, "same_ok": True, "resharded_ok": True}


def test_incomplete_or_stateless_checkpoints(tmp_path):
    from torchxla_rlhf.checkpoint import COMPLETE_MARKER, write_json
    from torchxla_rlhf.checkpoint import state as train_state

    ckpt = tmp_path / "checkpoint-latest"
    write_json(str(ckpt / train_state.STATE_DIR / train_state.TRAINER_STATE), {"step": 1})
    assert not train_state.has_training_state(str(ckpt))  # no _COMPLETE: never published
    (ckpt / COMPLETE_MARKER).write_text("")
    assert train_state.has_training_state(str(ckpt))
    with pytest.raises(FileNotFoundError, match="no training-state shards"):
        train_state.load_training_state(str(ckpt), {"policy": (None, None)})


def test_multi_host_needs_a_shared_output_dir():
    from torchxla_rlhf.checkpoint import require_shared_output_dir

    require_shared_output_dir("outputs/run", 1)
    require_shared_output_dir("gs://bucket/run", 4)
    with pytest.raises(ValueError, match="output_dir='outputs/run' is a local path.*4 processes"):
        require_shared_output_dir("outputs/run", 4)


KILLED_SAVE = r"""
import importlib, os, signal, sys
from torchxla_rlhf.checkpoint import fsio
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.configs.reward import RewardConfig
from torchxla_rlhf.configs.loader import cli_main

trainer = sys.argv.pop(1)
cls = {"dpo": DPOConfig, "reward": RewardConfig}[trainer]
main = importlib.import_module(f"torchxla_rlhf.{trainer}").main

moves = []
real_move = fsio.move_dir

def move_then_die(fs, src, dst):
    moves.append((src, dst))
    # Saves at step 2 (one move: nothing to replace) and step 4 (old aside, then new in):
    # die with the previous checkpoint moved aside and the new one not yet in place.
    if len(moves) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real_move(fs, src, dst)

fsio.move_dir = move_then_die
cli_main(cls, main, sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["dpo", "reward"])
def test_sigkill_during_a_save_resumes_from_the_previous_complete_checkpoint(tmp_path, trainer):
    """SIGKILL while step 4's checkpoint is being published: resume_from=auto finds step 2's
    (left aside as ``.old-*``) and the resumed run ends with the uninterrupted run's weights."""
    import os
    import subprocess
    import sys

    import safetensors.torch

    from helpers import REPO

    def args(out, *extra):
        return ["--config", f"{REPO}/configs/tiny/{trainer}.yaml", f"output_dir={out}",
                "logger.progress_bar=false", "logger.log_freq=1", "eval_dataset=null",
                f"train_dataset.path={REPO}/data/tiny/preference_train.jsonl",
                "total_steps=6", "save_model_freq=2", "save_training_state=true",
                "optimizer.accumulate_gradient_steps=1", *extra]

    env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=REPO)

    def run(argv):
        return subprocess.run([sys.executable, *argv], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=900)

    straight, out = tmp_path / "straight", tmp_path / "killed"
    r = run(["-m", f"torchxla_rlhf.{trainer}", *args(straight)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(["-c", KILLED_SAVE, trainer, *args(out)])
    assert r.returncode == -9, r.stderr[-3000:]
    assert not (out / "checkpoint-latest").exists()
    assert any(p.name.startswith("checkpoint-latest.old-") for p in out.iterdir())
    r = run(["-m", f"torchxla_rlhf.{trainer}", *args(out, "resume_from=auto")])
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [row["step"] for row in read_metrics(str(out))]
    assert steps.count(1) == 1 and steps[-4:] == [3, 4, 5, 6], steps  # resumed after step 2
    a = safetensors.torch.load_file(str(straight / "final" / "model.safetensors"))
    b = safetensors.torch.load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_auto_refuses_weights_without_state(tmp_path):
    from helpers import tiny_config
    from torchxla_rlhf.configs.dpo import DPOConfig
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    out = str(tmp_path / "run")
    common = ["total_steps=2", "save_model_freq=1", "eval_dataset=null"]
    trainer = DPOTrainer(tiny_config(DPOConfig, "dpo", out, *common))
    trainer.train()
    trainer.close()
    with pytest.raises(ValueError, match="none can be resumed from .checkpoint-latest: weights only"):
        DPOTrainer(tiny_config(DPOConfig, "dpo", out, *common, "resume_from=auto"))


@pytest.mark.slow
def test_kill_9_at_a_random_point_of_a_13b_shaped_schedule_resumes_from_the_newest(tmp_path):
    """dpo_13b's save settings scaled to a tiny run: HF exports with save_model_freq, the
    training state alone every save_every_minutes (here seconds), kill -9 at a random moment
    (inside a save or not). resume_from=auto continues from the newest complete checkpoint with
    a state: never from step 0 while one exists; metrics.jsonl then has each step once."""
    import os
    import random
    import re
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO
    from torchxla_rlhf.checkpoint import CheckpointManager, CheckpointSchedule
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.configs.dpo import DPOConfig

    real = load_config(DPOConfig, f"{REPO}/configs/dpo_13b.yaml")
    total = 16
    # 13B: HF export every 250 of ~3 epochs' updates, state every 30 minutes; here every 6
    # steps and every 2 seconds (a few steps of the tiny model).
    scaled = ["save_model_freq=6", f"save_every_minutes={real.save_every_minutes / 900}",
              f"save_milestone_freq={real.save_milestone_freq}",
              f"save_training_state={str(real.save_training_state).lower()}"]
    out = tmp_path / "run"
    args = ["-m", "torchxla_rlhf.dpo", "--config", f"{REPO}/configs/tiny/dpo.yaml",
            f"output_dir={out}", "logger.progress_bar=false", "logger.log_freq=1",
            "eval_dataset=null", f"train_dataset.path={REPO}/data/tiny/preference_train.jsonl",
            f"total_steps={total}", "num_epochs=100", "optimizer.accumulate_gradient_steps=1",
            *scaled]
    env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=REPO)
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # A random step of the run, then a random moment within it (inside a save or not): drawn
    # in steps, not seconds, so a fast machine cannot finish the run before the kill.
    kill_at_step, kill_after = rng.randint(1, total - 4), rng.uniform(0.0, 0.3)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= kill_at_step):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -9:
        pytest.skip(f"the run finished before the kill (seed {seed}); nothing to test")

    manager = CheckpointManager(str(out), schedule=CheckpointSchedule(6, 0), save_every_minutes=0,
                                save_training_state=False, is_main=True, export=print,
                                trained=dict, trainer_state=dict)
    usable = [c.step for c in manager.candidates() if c.step is not None]
    r = subprocess.run([sys.executable, *args, "resume_from=auto"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    context = (f"seed {seed}, killed {kill_after:.2f}s after step {kill_at_step}, usable steps "
               f"{usable}:\n{r.stderr[-3000:]}")
    assert r.returncode == 0, context
    resumed = re.search(r"resumed from (\S+) at step (\d+)", r.stderr)
    if usable:
        assert resumed and int(resumed.group(2)) == max(usable), context
    else:
        assert resumed is None and "starting fresh" in r.stderr, context
    steps = [row["step"] for row in read_metrics(str(out))]
    assert steps == list(range(1, total + 1)), (steps, context)


def test_process_0_leaves_after_every_other_process(tmp_path, monkeypatch):
    """Process 0 (the coordinator) waits for every other process's exit marker before it
    leaves: a host left running without its coordinator aborts."""
    from torchxla_rlhf import runtime
    from torchxla_rlhf.trainers import base

    monkeypatch.setattr(runtime, "process_count", lambda: 3)
    # Process 1 finishes: it writes its marker and returns at once.
    monkeypatch.setattr(runtime, "is_main_process", lambda: False)
    monkeypatch.setattr(runtime, "process_index", lambda: 1)
    base.leave_together(str(tmp_path))
    monkeypatch.setattr(runtime, "is_main_process", lambda: True)
    now = {"t": 0.0}
    waited = []

    def sleep(s):  # process 2 finishes while process 0 waits
        waited.append(s)
        now["t"] += s
        if len(waited) == 3:
            (tmp_path / base.EXIT_MARKERS / "process-2").write_text("done\n")

    base.leave_together(str(tmp_path), clock=lambda: now["t"], sleep=sleep)
    assert len(waited) == 3 and not (tmp_path / base.EXIT_MARKERS).exists()
    # A host that never finishes: process 0 gives up after the timeout, with a warning.
    now["t"], waited[:] = 0.0, []
    base.leave_together(str(tmp_path), clock=lambda: now["t"], sleep=lambda s: now.update(t=now["t"] + s))
    assert now["t"] >= base.LEAVE_TIMEOUT_S


@pytest.mark.slow
def test_sigterm_before_the_first_step_exits_75_at_once(tmp_path):
    """A preemption notice during start-up (weights loading on a pod) ends the run at once
    with the code the launcher relaunches on, having written no checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO
    from torchxla_rlhf.errors import EXIT_PREEMPTED

    out = tmp_path / "run"
    env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchxla_rlhf.dpo", "--config", f"{REPO}/configs/tiny/dpo.yaml",
         f"output_dir={out}", "logger.progress_bar=false", "eval_dataset=null",
         f"train_dataset.path={REPO}/data/tiny/preference_train.jsonl", "total_steps=50"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the trainer is being built: set-up has started
        if "start-up checks passed" in line:
            break
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, rest[-3000:]
    assert time.monotonic() - t0 < 10
    assert "SIGTERM before the first training step" in rest
    assert not (out / "metrics.jsonl").exists() and not (out / "training-state-latest").exists()
