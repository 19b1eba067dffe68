"""Host cost at depth: rollouts and PPO steps of the debug width with 2 and 40 layers.

Run: ``PJRT_DEVICE=CPU .venv/bin/python bench/depth.py [--layers 2,40] [--ppo-layers 2]``

Part 1, rollouts (``Generator``, sampling T=0.7 top-k 50; the seed code's ``debug`` width:
hidden 128, MLP 256, 4/2 heads, vocab 32000, fp32; 8 prompts left-padded to 128), for each
depth and for 16 and 64 new tokens, each in a fresh subprocess:
  * ``first``: the first call, compilation included, until the result is on the host;
  * ``returns``: steady state (median of ``--repeats`` calls after one untimed warm-up call),
    seconds until ``generate()`` returns: the host's own cost, since every launch is
    asynchronous;
  * ``on host``: seconds until the sequences are on the host (``.cpu()`` after the return);
  * ``host CPU``: CPU seconds of the calling thread inside ``generate()`` (the host's own
    work: tracing, launches; steadier than wall time on a loaded machine), and per token.
    The CL 64 / CL 16 ratio is printed for the medians and for the minima (the least
    disturbed call: on 2 cores the device's threads and the previous rollout's buffers being
    freed disturb the host thread by +-30 % from call to call);
  * ``traced``: the first engine's loop for comparison: the same prefill, then the decode
    step re-traced in Python for every token, each followed by an asynchronous sync. Skipped
    (nan) where layers x CL > ``--traced-max``: at 40 layers x 64 tokens it exhausted this
    machine's 24 GiB.
Part 2, PPO (``bench/ppo_step.py``'s worker with ``model``/``reward_model`` at the given depth,
standard mode, 64 new tokens): first step (compilation included) and the median later step,
with its rollout and training parts, and compilations after step 1.

Timing is wall-clock on a shared machine: compare figures within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TAG = "DEPTH_RESULT "
BATCH, PROMPT_LEN = 8, 128


def _model(layers: int):
    import torch
    import transformers

    from torchxla_rlhf.models.llama import DEBUG_SHAPE

    torch.manual_seed(0)
    shape = dict(DEBUG_SHAPE, num_hidden_layers=layers)
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=1024, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


def _prompts(vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(BATCH, PROMPT_LEN, dtype=torch.long)
    mask = torch.zeros(BATCH, PROMPT_LEN, dtype=torch.long)
    for i in range(BATCH):
        n = int(torch.randint(PROMPT_LEN // 4, PROMPT_LEN + 1, (1,), generator=g))
        ids[i, PROMPT_LEN - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, PROMPT_LEN - n:] = 1
    return ids, mask


def _traced_generate(gen, ids, mask, cl: int, seed: int):
    """The previous engine's loop: decode step re-traced per token (bench-only comparison)."""
    from torchxla_rlhf import runtime

    gen.model.eval()
    state = gen._run("prefill", gen._prefill, ids, mask, cl, seed)
    for _ in range(1, cl):
        state = gen._decode_step(state)
        runtime.sync()
    return state.sequences


def rollout_worker(layers: int, cl: int, repeats: int, traced_too: bool = True) -> dict:
    from torchxla_rlhf import runtime
    from torchxla_rlhf.generation import Generator, SamplingConfig

    dev = runtime.init()
    model = _model(layers).to(dev)
    gen = Generator(model, SamplingConfig(), eos_token_id=2, pad_token_id=0)
    batches = [tuple(t.to(dev) for t in _prompts(32000, s)) for s in range(2)]
    runtime.sync()
    runtime.wait()

    def call(i: int, traced: bool = False) -> tuple[float, float, float]:
        ids, mask = batches[i % 2]
        t0, c0 = time.perf_counter(), time.thread_time()
        if traced:
            seqs = _traced_generate(gen, ids, mask, cl, seed=i)
        else:
            seqs = gen.generate(ids, mask, cl, seed=i).sequences
        t_ret, cpu = time.perf_counter() - t0, time.thread_time() - c0
        seqs.cpu()
        return t_ret, time.perf_counter() - t0, cpu

    c0 = runtime.compile_count()
    _, first, _ = call(0)
    first_compiles = runtime.compile_count() - c0
    call(1)  # warm-up, untimed: the first call after compiling still pays one-time host costs
    c1 = runtime.compile_count()
    steady = [call(i + 2) for i in range(repeats)]
    steady_compiles = runtime.compile_count() - c1
    nan = (float("nan"),) * 3
    traced, traced_compiles = [nan], 0
    if traced_too:
        call(0, traced=True)  # the traced loop's own graphs (compiled here, not timed)
        c2 = runtime.compile_count()
        traced = [call(i + 1, traced=True) for i in range(max(1, repeats // 2))]
        traced_compiles = runtime.compile_count() - c2
    return {
        "layers": layers, "cl": cl, "first_s": first, "first_compiles": first_compiles,
        "steady_compiles": steady_compiles, "traced_compiles": traced_compiles,
        "returns_s": statistics.median(r[0] for r in steady),
        "on_host_s": statistics.median(r[1] for r in steady),
        "host_cpu_s": statistics.median(r[2] for r in steady),
        "host_cpu_min_s": min(r[2] for r in steady),
        "traced_returns_s": statistics.median(r[0] for r in traced),
        "traced_on_host_s": statistics.median(r[1] for r in traced),
        "traced_host_cpu_s": statistics.median(r[2] for r in traced),
        "host_syncs": runtime.host_sync_count(),
    }


def ppo_worker(layers: int, steps: int) -> dict:
    sys.argv = [sys.argv[0]]
    import bench.ppo_step as ppo_step

    orig = ppo_step._overrides

    def overrides(mode, total, out_dir):
        return orig(mode, total, out_dir) + [
            f"{s}.tiny.num_hidden_layers={layers}" for s in ("model", "reward_model")
        ]

    ppo_step._overrides = overrides
    res = ppo_step.worker("standard", steps, profile=False)
    return {"layers": layers, "steps": res["steps"]}


def _spawn(args: list[str]) -> dict | None:
    env = dict(os.environ, PJRT_DEVICE="CPU", TOKENIZERS_PARALLELISM="false")
    env.setdefault("CPU_NUM_DEVICES", "1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, cwd=REPO,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    print(f"worker {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,40")
    p.add_argument("--lengths", default="16,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ppo-layers", default="2", help="'' to skip the PPO part")
    p.add_argument("--ppo-steps", type=int, default=3)
    p.add_argument("--traced-max", type=int, default=40 * 16,
                   help="run the traced comparison only where layers x CL <= this (the traced "
                        "loop at 40 layers x 64 tokens exhausted this machine's 24 GiB)")
    p.add_argument("--no-traced", action="store_true")
    p.add_argument("--json")
    p.add_argument("--worker", choices=("rollout", "ppo"))
    p.add_argument("--n", type=int)
    p.add_argument("--cl", type=int)
    a = p.parse_args()
    if a.worker == "rollout":
        print(TAG + json.dumps(rollout_worker(a.n, a.cl, a.repeats, not a.no_traced)), flush=True)
        return
    if a.worker == "ppo":
        print(TAG + json.dumps(ppo_worker(a.n, a.ppo_steps)), flush=True)
        return

    results: dict = {"rollout": [], "ppo": []}
    print(f"Rollouts: debug width, {BATCH} prompts x {PROMPT_LEN}, sampling (T 0.7, top-k 50)")
    print(f"{'layers':>6} {'CL':>4} {'first':>8} {'returns':>8} {'on host':>8} {'host CPU':>8}"
          f" {'/token':>8} | traced: {'returns':>8} {'on host':>8} {'host CPU':>8} | "
          f"{'speedup':>7} compiles")
    for n in [int(x) for x in a.layers.split(",") if x]:
        for cl in [int(x) for x in a.lengths.split(",") if x]:
            r = _spawn(["--worker", "rollout", "--n", str(n), "--cl", str(cl),
                        "--repeats", str(a.repeats)]
                       + (["--no-traced"] if a.no_traced or n * cl > a.traced_max else []))
            if r is None:
                continue
            results["rollout"].append(r)
            print(f"{n:>6} {cl:>4} {r['first_s']:>7.2f}s {r['returns_s']:>7.3f}s "
                  f"{r['on_host_s']:>7.3f}s {r['host_cpu_s']:>7.3f}s "
                  f"{1e3 * r['host_cpu_s'] / cl:>6.2f}ms |         {r['traced_returns_s']:>7.3f}s "
                  f"{r['traced_on_host_s']:>7.3f}s {r['traced_host_cpu_s']:>7.3f}s | "
                  f"{r['traced_on_host_s'] / r['on_host_s']:>6.2f}x "
                  f"{r['first_compiles']} first, {r['steady_compiles']} later", flush=True)
    by = {(r["layers"], r["cl"]): r for r in results["rollout"]}
    for n in sorted({r["layers"] for r in results["rollout"]}):
        lens = sorted(cl for (m, cl) in by if m == n)
        if len(lens) >= 2:
            lo, hi = by[(n, lens[0])], by[(n, lens[-1])]
            print(f"  {n} layers: host CPU per rollout CL {lens[-1]} / CL {lens[0]} = "
                  f"{hi['host_cpu_s'] / lo['host_cpu_s']:.2f} (medians; minima "
                  f"{hi['host_cpu_min_s'] / lo['host_cpu_min_s']:.2f}; target 0.8-1.2); traced "
                  f"loop {hi['traced_host_cpu_s'] / lo['traced_host_cpu_s']:.2f}")

    ppo_layers = [int(x) for x in a.ppo_layers.split(",") if x]
    if ppo_layers:
        print("\nPPO (standard mode, 64 new tokens), first step and median later step:")
    for n in ppo_layers:
        r = _spawn(["--worker", "ppo", "--n", str(n), "--ppo-steps", str(a.ppo_steps)])
        if r is None:
            continue
        results["ppo"].append(r)
        first, later = r["steps"][0], r["steps"][1:]

        def med(k: str) -> float:
            return statistics.median(s[k] for s in later) if later else float("nan")

        print(f"  {n:>2} layers: first {first['wall_s']:.2f} s ({first['compiles']} compiles)"
              f"   later {med('wall_s'):.3f} s (rollout {med('rollout_s'):.3f} s, train "
              f"{med('train_s'):.3f} s; {sum(s['compiles'] for s in later)} compiles after "
              f"step 1)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
