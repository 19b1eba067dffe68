"""Benchmark the static-shape rollout engine against HF ``generate``.

Run: ``PJRT_DEVICE=CPU .venv/bin/python bench/generation.py`` (a few minutes on XLA:CPU).

Part 1, a small LLaMA (4 layers, hidden 256, vocab 8000, 8 prompts left-padded to 64):
tokens/s and compilations for
  (a) this engine on the XLA device, CL = 16 and 64,
  (b) HF ``generate`` on eager CPU, CL = 16 and 64,
  (c) HF ``generate`` on the XLA device, capped at CL = 4 and 8 (``--hf-xla-lengths``): it
      compiles about one graph per token on every call, which took minutes per call here.
Part 2, the seed code's 'debug' shape (2 layers, hidden 128, intermediate 256, 4 heads, 2 kv
heads, vocab 32000, fp32), 8 prompts left-padded to 128, 64 new tokens: first call (with
compilation) and steady state, engine vs HF ``generate`` on XLA; HF on XLA runs 16 of the 64
tokens (``--hf-xla-debug-tokens``; a 16-token call took 200-300 s here) and its time is scaled
by 64/16. HF-on-XLA runs go in a fresh subprocess each.

Part 3 (``--policies``; alone: ``--policies-only``), ``sampling.gather_weights`` on the
XLA:CPU proxy of a pod: 8 devices (a child process with CPU_NUM_DEVICES=8), mesh (1,4,2), an
8-layer model (hidden 256, 8 heads, intermediate 688, vocab 320), sharded as the trainers
shard it, bf16 autocast; 8 prompts of 16, 32 new tokens. One rollout per policy (per_layer,
hoisted, generation_layout at tp=8), steady-state median, and the ratios to per_layer. On
XLA:CPU the "devices" share the host's cores and a collective is a memory copy, so the
ratios show the work each policy does per token, not a TPU's interconnect.

All runs sample (temperature 0.7, top-k 50). HF runs get ``min_new_tokens = max_new_tokens``
so that they, like the engine, always produce the full length. Times on XLA end with a copy
of the output to the host. Each number is one measurement on a shared machine: compare them
within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from torchxla_rlhf import runtime  # noqa: E402
from torchxla_rlhf.generation import Generator, SamplingConfig  # noqa: E402

EOS, PAD = 2, 0


def make_model(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


def make_prompts(batch: int, pl: int, vocab: int, seed: int = 0):
    """Left-padded prompts with lengths spread over [pl/4, pl]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, pl), PAD, dtype=torch.long)
    mask = torch.zeros(batch, pl, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(max(1, pl // 4), pl + 1, (1,), generator=g))
        ids[i, pl - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, pl - n :] = 1
    return ids, mask


def timed(fn):
    """(seconds, compilations, host syncs) of ``fn()``; ``fn`` must end with a host copy."""
    c0, s0 = runtime.compile_count(), runtime.host_sync_count()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, runtime.compile_count() - c0, runtime.host_sync_count() - s0


def engine_fn(gen: Generator, ids, mask, cl: int):
    seeds = iter(range(10**6))

    def run():
        out = gen.generate(ids, mask, cl, seed=next(seeds))
        return out.sequences.cpu()

    return run


def hf_fn(model, ids, mask, cl: int):
    def run():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.7,
            top_k=50,
            max_new_tokens=cl,
            min_new_tokens=cl,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        return out.cpu()

    return run


def measure(fn, repeats: int) -> dict:
    """First call, then ``repeats`` steady-state calls (median time)."""
    first, c_first, s_first = timed(fn)
    steady = [timed(fn) for _ in range(repeats)]
    return {
        "first_s": first,
        "first_compiles": c_first,
        "first_syncs": s_first,
        "steady_s": statistics.median(t for t, _, _ in steady),
        "steady_compiles": sum(c for _, c, _ in steady),
        "steady_syncs": max(s for _, _, s in steady),
    }


def row(name: str, r: dict, tokens: int) -> str:
    return (
        f"  {name:<26} first {r['first_s']:7.2f} s ({r['first_compiles']:3d} compiles, "
        f"{r['first_syncs']:3d} syncs)   steady {r['steady_s']:7.3f} s "
        f"= {tokens / r['steady_s']:8.1f} tok/s ({r['steady_compiles']} compiles, "
        f"{r['steady_syncs']} syncs/call)"
    )


SHAPES = {
    # name: (layers, hidden, intermediate, heads, kv heads, vocab, batch, prompt length, seed)
    "small": (4, 256, 512, 8, 4, 8000, 8, 64, 0),
    "debug": (2, 128, 256, 4, 2, 32000, 8, 128, 1),
}


def setup(shape: str, dev):
    layers, hidden, inter, heads, kv, vocab, b, pl, seed = SHAPES[shape]
    model = make_model(layers, hidden, inter, heads, kv, vocab)
    ids, mask = make_prompts(b, pl, vocab, seed=seed)
    if dev is not None:
        model, ids, mask = model.to(dev), ids.to(dev), mask.to(dev)
    return model, ids, mask


def hf_xla_child(shape: str, cl: int, repeats: int) -> None:
    """HF generate on XLA, in a fresh process: it compiles one graph per token and keeps
    compiling in steady state; after a few hundred compilations in one process XLA:CPU's LLVM
    ran out of mappable memory ("Unable to allocate section memory") here."""
    model, ids, mask = setup(shape, runtime.init())
    print("RESULT " + json.dumps(measure(hf_fn(model, ids, mask, cl), repeats)), flush=True)


def run_hf_xla(shape: str, cl: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--hf-xla-child", shape, str(cl), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"HF generate on XLA ({shape}, CL={cl}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


POLICY_MESH, POLICY_TP = "1,4,2", 8


def policies_child(repeats: int) -> None:
    """Part 3, inside an 8-device process: one steady-state rollout time per policy."""
    from torchxla_rlhf.models import sharding

    mesh = runtime.make_mesh(POLICY_MESH)
    dev = runtime.device()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=688,
                                   num_hidden_layers=8, num_attention_heads=8,
                                   num_key_value_heads=8, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).to(dev)
    sharding.shard_model(model, mesh)
    ids, mask = make_prompts(8, 16, 320, seed=2)
    ids, mask = ids.to(dev), mask.to(dev)
    runtime.sync()
    cl, out = 32, {}
    for policy in ("per_layer", "hoisted", "generation_layout"):
        gen = Generator(model, SamplingConfig(temperature=0.7, top_k=50, gather_weights=policy,
                                              generation_tp=POLICY_TP),
                        eos_token_id=EOS, pad_token_id=PAD, mesh=mesh)
        run = engine_fn(gen, ids, mask, cl)

        def autocast_run():
            with runtime.autocast("bfloat16", "float32"):
                return run()

        out[policy] = measure(autocast_run, repeats)
    print("RESULT " + json.dumps(out), flush=True)


def run_policies(repeats: int) -> None:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8")
    cmd = [sys.executable, __file__, "--policies-child", "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"policies run failed:\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    tokens = 8 * 32
    print(f"\n[3] sampling.gather_weights on 8 XLA:CPU devices, mesh ({POLICY_MESH}), 8 layers, "
          f"hidden 256, bf16 autocast; B=8, PL=16, CL=32 (generation_layout: tp={POLICY_TP})")
    for policy, m in r.items():
        print(row(policy, m, tokens))
    base = r["per_layer"]["steady_s"]
    print("  steady rollout time / per_layer's: " + ", ".join(
        f"{p} {m['steady_s'] / base:.2f}" for p, m in r.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="steady-state calls per setting")
    p.add_argument(
        "--hf-xla-lengths",
        type=str,
        default="4,8",
        help="part 1: continuation lengths for HF generate on XLA (capped: it compiles about "
        "one graph per token, even in steady state, ~5-25 s each here)",
    )
    p.add_argument(
        "--hf-xla-debug-tokens",
        type=int,
        default=16,
        help="part 2: tokens for HF generate on XLA (of the 64); its time is scaled to 64",
    )
    p.add_argument("--hf-xla-repeats", type=int, default=1, help="steady calls, HF on XLA")
    p.add_argument("--hf-xla-child", nargs=2, metavar=("SHAPE", "CL"), help=argparse.SUPPRESS)
    p.add_argument("--policies", action="store_true",
                   help="part 3: time a rollout per sampling.gather_weights on 8 devices")
    p.add_argument("--policies-only", action="store_true", help="part 3 only")
    p.add_argument("--policies-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.policies_child:
        runtime.init()
        policies_child(args.repeats)
        return
    if args.policies_only:
        run_policies(args.repeats)
        return
    if args.hf_xla_child:
        hf_xla_child(args.hf_xla_child[0], int(args.hf_xla_child[1]), args.repeats)
        return
    dev = runtime.init()
    sampling = SamplingConfig(temperature=0.7, top_k=50)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"XLA device {runtime.device_type()} x{runtime.device_count()}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    # -- part 1 ------------------------------------------------------------------------------
    layers, hidden, inter, heads, kv, vocab, b, pl, _ = SHAPES["small"]
    print(
        f"\n[1] small LLaMA: {layers} layers, hidden {hidden}, inter {inter}, {heads} heads / "
        f"{kv} kv, vocab {vocab}; B={b}, PL={pl}"
    )
    cpu_model, ids, mask = setup("small", None)
    xla_model, x_ids, x_mask = setup("small", dev)
    gen = Generator(xla_model, sampling, eos_token_id=EOS, pad_token_id=PAD)
    for cl in (16, 64):
        tokens = b * cl
        print(f" CL={cl} ({tokens} tokens per call)")
        r = measure(engine_fn(gen, x_ids, x_mask, cl), args.repeats)
        print(row("(a) engine, XLA", r, tokens))
        r = measure(hf_fn(cpu_model, ids, mask, cl), args.repeats)
        print(row("(b) HF generate, eager CPU", r, tokens))
    for cl in [int(x) for x in args.hf_xla_lengths.split(",") if x]:
        print(f" CL={cl}, capped ({b * cl} tokens per call)")
        r = run_hf_xla("small", cl, args.hf_xla_repeats)
        print(row("(c) HF generate, XLA", r, b * cl))

    # -- part 2 ------------------------------------------------------------------------------
    layers, hidden, inter, heads, kv, vocab, b, pl, _ = SHAPES["debug"]
    cl = 64
    tokens = b * cl
    print(
        f"\n[2] 'debug' shape: {layers} layers, hidden {hidden}, inter {inter}, {heads} heads / "
        f"{kv} kv, vocab {vocab}, fp32; B={b}, PL={pl}, CL={cl}"
    )
    xla_model, x_ids, x_mask = setup("debug", dev)
    gen = Generator(xla_model, sampling, eos_token_id=EOS, pad_token_id=PAD)
    eng = measure(engine_fn(gen, x_ids, x_mask, cl), args.repeats)
    print(row("engine, XLA", eng, tokens))
    n = args.hf_xla_debug_tokens
    hf = run_hf_xla("debug", n, args.hf_xla_repeats)
    print(row(f"HF generate, XLA, {n} tok", hf, b * n))
    scale = cl / n
    hf64 = hf["steady_s"] * scale
    print(
        f"  HF generate, XLA, scaled to {cl} tokens: first ~{hf['first_s'] * scale:.0f} s, "
        f"steady ~{hf64:.0f} s (x{scale:g} the {n}-token run; later tokens cost at least as much)"
    )
    speedup = hf64 / eng["steady_s"]
    print(
        f"  steady state: engine {eng['steady_s']:.3f} s (target <= 0.76 s: "
        f"{'met' if eng['steady_s'] <= 0.76 else 'NOT met'}), ~{speedup:.0f}x HF generate on XLA "
        f"(target >= 2x: {'met' if speedup >= 2 else 'NOT met'})"
    )
    if args.policies:
        run_policies(args.repeats)


if __name__ == "__main__":
    main()
