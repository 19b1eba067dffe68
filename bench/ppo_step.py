"""Benchmark: PPO steps of torchxla_rlhf's ``PPOTrainer`` on XLA, against the seed JAX code's figures.

Setup: all four models (policy, reference, reward, value) are random Llamas of the
seed code's ``debug`` shape (2 layers, hidden 128, MLP 256, 4 heads / 2 kv heads, vocab 32000),
fp32 parameters and fp32 compute; 8 prompts per step from the shipped ``data/tiny/prompts.jsonl``
(tokenizer ``tiny``) left-padded to 128 tokens; 64 sampled tokens per rollout; mini-batches of 4
rollouts (2 updates per step); 1 PPO epoch; ``missing_eos_penalty=-10`` as the paper. Both modes:
``standard`` (score the whole rollout batch, then update) and ``interleaved`` (the paper's JAX
step: score inside each mini-batch's update).

What is timed (per mode, each mode in its own subprocess so that compile counts are clean):
``PPOTrainer(cfg)``, ``runtime.sync()`` (what set-up left pending, as ``Trainer.train`` does), then
for ``1 + --steps`` steps: ``trainer.train_step(); trainer.step += 1; runtime.sync();
runtime.wait()``; the final sync + wait are deliberate and exist only in this benchmark. With
``logger.log_freq=1`` the trainer itself waits after the rollout and after training and returns
``time/rollout_s`` and ``time/train_s``. Also recorded per step: XLA compilations
(``runtime.compile_count()``), compile seconds (the accumulated ``CompileTime`` metric), graph
executions (``ExecuteReplicatedTime`` samples) and process CPU seconds (user + system, all
threads: less sensitive than wall time to other jobs on shared cores). ``ExecuteReplicatedTime``
seconds are kept in the JSON and the profile only: with asynchronous dispatch they include time a
graph waits in the queue, so their sum can exceed the wall time.

``--profile`` additionally wraps the trainer's compiled callables (generation ``prefill`` and
``decode_step``, ``_split``, ``_score``, ``_advantages``, ``_micro``, ``_update``) with a sync +
wait after each call and reports, per callable, calls, wall seconds, compilations, compile
seconds and the graph's IR node count. Those extra waits stop the host's tracing from
overlapping device work, so profiled step times are an upper bound; the unprofiled run is the
headline figure.

Run (about 1-2 minutes on 2 CPU cores; both modes, 1 + 5 steps each)::

    PJRT_DEVICE=CPU .venv/bin/python bench/ppo_step.py [--mode both|standard|interleaved]
        [--steps 5] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# The seed code's "debug" Llama (EasyLM LLaMAConfig 'debug'), fp32.
from torchxla_rlhf.models.llama import DEBUG_SHAPE  # noqa: E402
PROMPT_LEN = 128
CONTINUATION_LEN = 64
BATCH_SIZE = 8
MINI_BATCH_SIZE = 4

# Targets this benchmark reports against.
TARGET_FIRST_S = 15.0
TARGET_LATER_S = 2.0
TARGET_GRAPHS = 8
# The seed's JAX code on this machine kind (recorded figures; this script does not run it).
SEED_JAX = {"first_s": 31.0, "first_compiles": 39, "compile_s": 33.0,
            "later_s": 2.1, "rollout_s": 0.76, "train_s": 1.3}

RESULT_TAG = "PPO_BENCH_RESULT "


# ----------------------------------------------------------------------------------------------
# Worker (one mode, one process)
# ----------------------------------------------------------------------------------------------


def _overrides(mode: str, steps: int, out_dir: str) -> list[str]:
    """``key=value`` overrides on configs/tiny/ppo.yaml giving the benchmark's run."""
    ov = [
        f"output_dir={out_dir}",
        "mesh_dim='1,-1,1'",
        "seed=0",
        "tokenizer=tiny",
        "tokenizer_pad_token_id=0",
        f"train_dataset.path={REPO}/data/tiny/prompts.jsonl",
        f"train_dataset.seq_length={PROMPT_LEN}",
        f"train_dataset.batch_size={BATCH_SIZE}",
        f"max_continuation_len={CONTINUATION_LEN}",
        f"mini_batch_size={MINI_BATCH_SIZE}",
        "rollouts_per_prompt=1",
        "ppo_epochs=1",
        f"mode={mode}",
        "missing_eos_penalty=-10.0",
        "oracle=null",
        f"total_steps={steps}",
        "save_model_freq=0",
        "save_milestone_freq=0",
        "logger.log_freq=1",
        "logger.progress_bar=false",
        "logger.wandb_mode=disabled",
        "value_model=null",
    ]
    for section in ("model", "reward_model"):
        ov += [f"{section}.name_or_path=tiny", f"{section}.param_dtype=float32",
               f"{section}.compute_dtype=float32", f"{section}.tiny.seed=0",
               f"{section}.tiny.max_position_embeddings=1024"]
        ov += [f"{section}.tiny.{k}={v}" for k, v in DEBUG_SHAPE.items()]
    return ov


def _metric_sum(name: str) -> tuple[int, float]:
    """``(samples, total seconds)`` of a torch_xla timing metric (nanoseconds accumulated)."""
    from torchxla_rlhf import runtime

    data = runtime.metric_data(name)
    if not data:
        return 0, 0.0
    return int(data[0]), float(data[1]) / 1e9


def _host_mean(value: Any) -> float | None:
    """A metric as one host float: a device scalar, or the mean of a list of them (interleaved
    mode returns one value per mini-batch). A host sync: call outside the timed region."""
    from torchxla_rlhf import runtime

    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        vals = [_host_mean(v) for v in value]
        return sum(vals) / len(vals) if vals else None
    return runtime.host_float(value)


def _last_graph_size() -> int:
    """IR nodes of the most recently synced graph (last ``TensorsGraphSize`` sample)."""
    from torchxla_rlhf import runtime

    data = runtime.metric_data("TensorsGraphSize")
    return int(data[2][-1][1]) if data and data[2] else 0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class _Counters:
    """Snapshot of the process-wide counters; ``delta`` since another snapshot."""

    def __init__(self) -> None:
        from torchxla_rlhf import runtime

        self.t = time.perf_counter()
        self.cpu = _cpu_seconds()
        self.compiles = runtime.compile_count()
        self.compile_s = _metric_sum("CompileTime")[1]
        self.execute_n, self.execute_s = _metric_sum("ExecuteReplicatedTime")
        self.host_syncs = runtime.host_sync_count()

    def delta(self, before: "_Counters") -> dict[str, float]:
        return {
            "wall_s": self.t - before.t,
            "cpu_s": self.cpu - before.cpu,
            "compiles": self.compiles - before.compiles,
            "compile_s": self.compile_s - before.compile_s,
            "executions": self.execute_n - before.execute_n,
            "execute_s": self.execute_s - before.execute_s,
            "host_syncs": self.host_syncs - before.host_syncs,
        }


def _profile_wrap(name: str, fn: Callable, table: dict[str, dict[str, float]]) -> Callable:
    """``fn`` followed by a sync + wait, with its wall time and compilations added to ``table``."""
    from torchxla_rlhf import runtime

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before = _Counters()
        out = fn(*args, **kwargs)
        runtime.sync()
        runtime.wait()
        d = _Counters().delta(before)
        row = table.setdefault(name, {"calls": 0, "wall_s": 0.0, "compiles": 0, "compile_s": 0.0,
                                      "execute_s": 0.0, "graph_nodes": 0})
        row["graph_nodes"] = max(row["graph_nodes"], _last_graph_size())
        row["calls"] += 1
        for k in ("wall_s", "compiles", "compile_s", "execute_s"):
            row[k] += d[k]
        return out

    return wrapped


def _install_profiler(trainer: Any, first: dict, later: dict, state: dict) -> None:
    """Wrap the trainer's compiled callables; rows go to ``first`` during step 1, else ``later``."""

    def table() -> dict:
        return first if state["step"] == 0 else later

    for attr in ("_split", "_score", "_advantages", "_micro", "_update"):
        orig = getattr(trainer, attr)

        def dispatch(*a: Any, _orig=orig, _name=attr, **k: Any) -> Any:
            return _profile_wrap(_name, _orig, table())(*a, **k)

        setattr(trainer, attr, dispatch)
    gen = trainer.generator
    orig_run = gen._run

    def run(name: str, *args: Any, **kwargs: Any) -> Any:  # Generator._run(name, fn, ...)
        return _profile_wrap(f"generation.{name}", orig_run, table())(name, *args, **kwargs)

    gen._run = run


def worker(mode: str, steps: int, profile: bool) -> dict[str, Any]:
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    from torchxla_rlhf import runtime
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.configs.ppo import PPOConfig
    from torchxla_rlhf.trainers.ppo import PPOTrainer

    with tempfile.TemporaryDirectory(prefix="ppo_bench_") as tmp:
        cfg = load_config(PPOConfig, os.path.join(REPO, "configs", "tiny", "ppo.yaml"),
                          _overrides(mode, 1 + steps, os.path.join(tmp, "run")))
        t_import = _Counters()
        trainer = PPOTrainer(cfg)
        runtime.sync()  # what set-up left pending, as Trainer.train does before its loop
        runtime.wait()
        setup = _Counters().delta(t_import)

        prof_first: dict = {}
        prof_later: dict = {}
        state = {"step": 0}
        if profile:
            _install_profiler(trainer, prof_first, prof_later, state)

        per_step: list[dict[str, Any]] = []
        for i in range(1 + steps):
            state["step"] = i
            before = _Counters()
            metrics = trainer.train_step()
            trainer.step += 1
            runtime.sync()
            runtime.wait()  # benchmark-only: the step's work has finished
            row = _Counters().delta(before)
            row["rollout_s"] = float(metrics.get("time/rollout_s", float("nan")))
            row["train_s"] = float(metrics.get("time/train_s", float("nan")))
            if i == 0:  # sanity figures of step 1 (host reads after the timing)
                row["reward_mean"] = _host_mean(metrics.get("env/reward_mean"))
                row["kl"] = _host_mean(metrics.get("objective/kl"))
            per_step.append(row)
        trainer.close()
        return {
            "mode": mode,
            "device_type": runtime.device_type(),
            "device_count": runtime.device_count(),
            "setup": setup,
            "steps": per_step,
            "profile_first": prof_first,
            "profile_later": prof_later,
            "cpu_fallbacks": runtime.cpu_fallback_counts(),
            "n_rollouts": trainer.n_rollouts,
            "n_mini": trainer.n_mini,
        }


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any] | None:
    env = dict(os.environ, PJRT_DEVICE="CPU", TOKENIZERS_PARALLELISM="false")
    env.setdefault("CPU_NUM_DEVICES", str(args.devices))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode,
           "--steps", str(args.steps)]
    if args.profile:
        cmd.append("--profile")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            out["process_s"] = time.perf_counter() - t
            return out
    print(f"[{mode}] worker failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}",
          file=sys.stderr)
    return None


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(f"PPO step benchmark: debug Llama {DEBUG_SHAPE} x4 models, fp32 params+compute")
    print(f"  {BATCH_SIZE} prompts x {PROMPT_LEN} tokens, {CONTINUATION_LEN} new tokens, "
          f"mini-batch {MINI_BATCH_SIZE}, 1 PPO epoch; 1 + {args.steps} steps per mode; "
          f"{os.cpu_count()} CPU(s), load average at start {args.load_start}")
    print(f"  load average at end {args.load_end} (> {os.cpu_count()}: cores shared, wall times "
          "inflated; compare CPU seconds)")
    for mode, r in results.items():
        steps = r["steps"]
        first, later = steps[0], steps[1:]
        later_wall = [s["wall_s"] for s in later]
        total_compiles = r["setup"]["compiles"] + sum(s["compiles"] for s in steps)
        loop_compiles = sum(s["compiles"] for s in steps)
        print()
        print(f"[{mode}] XLA:{r['device_type']} x{r['device_count']}, "
              f"{r['n_rollouts']} rollouts = {r['n_mini']} updates/step, "
              f"subprocess total {r['process_s']:.1f} s")
        su = r["setup"]
        print(f"  set-up (build 4 models + sync)   {su['wall_s']:6.2f} s   "
              f"{su['compiles']} compilation(s), {su['compile_s']:.2f} s compiling")
        print(f"  first step (incl. compiling)     {first['wall_s']:6.2f} s   "
              f"rollout {first['rollout_s']:.2f} s, train {first['train_s']:.2f} s   "
              f"target <= {TARGET_FIRST_S:.0f} s: {_verdict(first['wall_s'] <= TARGET_FIRST_S)}"
              f"   (seed JAX ~{SEED_JAX['first_s']:.0f} s)")
        print(f"    compilations {first['compiles']}, compiling {first['compile_s']:.2f} s, "
              f"{first['executions']} graph runs, CPU {first['cpu_s']:.2f} s   "
              f"(seed JAX: {SEED_JAX['first_compiles']} compilations, "
              f"{SEED_JAX['compile_s']:.0f} s compiling)")
        if later:
            print(f"  later steps (median of {len(later)})       {_med(later_wall):6.3f} s   "
                  f"rollout {_med([s['rollout_s'] for s in later]):.3f} s, "
                  f"train {_med([s['train_s'] for s in later]):.3f} s   "
                  f"target <= {TARGET_LATER_S:.0f} s: {_verdict(_med(later_wall) <= TARGET_LATER_S)}"
                  f"   (seed JAX ~{SEED_JAX['later_s']} s: rollout {SEED_JAX['rollout_s']}, "
                  f"train {SEED_JAX['train_s']})")
            print(f"    min {min(later_wall):.3f} / max {max(later_wall):.3f} s; "
                  f"{int(_med([s['executions'] for s in later]))} graph runs/step; "
                  f"CPU {_med([s['cpu_s'] for s in later]):.3f} s/step; "
                  f"compilations in later steps {sum(s['compiles'] for s in later)}")
        compile_total_s = su["compile_s"] + sum(s["compile_s"] for s in steps)
        print(f"  graphs compiled, whole run       {total_compiles} ({su['compiles']} set-up, "
              f"{loop_compiles} steps), {compile_total_s:.2f} s compiling   "
              f"target <= {TARGET_GRAPHS}: {_verdict(total_compiles <= TARGET_GRAPHS)}")
        hs = sum(s["host_syncs"] for s in steps)
        print(f"  host syncs (.item) in steps      {hs}; CPU fallbacks {r['cpu_fallbacks'] or 'none'}")
        if first.get("reward_mean") is not None:
            print(f"  step-1 sanity: env/reward_mean {first['reward_mean']:.3f}, "
                  f"objective/kl {first['kl']:.4f}")
        for label, table, n in (("first step", r["profile_first"], 1),
                                ("per later step", r["profile_later"], max(len(later), 1))):
            if not table:
                continue
            print(f"  profile, {label} (sync+wait after each call; an upper bound):")
            for name, row in table.items():
                print(f"    {name:24s} calls {row['calls'] / n:5.1f}  wall {row['wall_s'] / n:7.3f} s  "
                      f"device {row['execute_s'] / n:7.3f} s  compiles {row['compiles'] / n:4.1f} "
                      f"({row['compile_s'] / n:.2f} s)  IR nodes {row['graph_nodes']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="both", choices=("both", "standard", "interleaved"))
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    p.add_argument("--devices", type=int, default=1, help="XLA:CPU devices (CPU_NUM_DEVICES)")
    p.add_argument("--profile", action="store_true",
                   help="also time each compiled callable (adds a wait after each)")
    p.add_argument("--json", help="also write all figures to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.worker:
        if args.mode == "both":
            p.error("--worker needs one --mode")
        print(RESULT_TAG + json.dumps(worker(args.mode, args.steps, args.profile)), flush=True)
        return
    args.load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    modes = ("standard", "interleaved") if args.mode == "both" else (args.mode,)
    results = {}
    for mode in modes:
        r = run_mode(mode, args)
        if r is not None:
            results[mode] = r
    args.load_end = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    if len(results) != len(modes):
        sys.exit(1)


if __name__ == "__main__":
    main()
