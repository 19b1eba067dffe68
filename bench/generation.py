"""Benchmark the static-shape rollout engine against HF ``generate``.

Run: ``PJRT_DEVICE=CPU .venv/bin/python bench/generation.py`` (a few minutes on XLA:CPU).

Part 1, a small LLaMA (4 layers, hidden 256, vocab 8000, 8 prompts left-padded to 64), at
two continuation lengths: tokens/s and compilations for
  (a) this engine on the XLA device,
  (b) HF ``generate`` on eager CPU,
  (c) HF ``generate`` on the XLA device.
Part 2, the seed code's 'debug' shape (2 layers, hidden 128, intermediate 256, 4 heads, 2 kv
heads, vocab 32000, fp32), 8 prompts left-padded to 128, 64 new tokens: first call (with
compilation) and steady state, engine vs HF ``generate`` on XLA.

All runs sample (temperature 0.7, top-k 50). HF runs get ``min_new_tokens = max_new_tokens``
so that they, like the engine, always produce the full length. Times on XLA end with a copy
of the output to the host. Each number is one measurement on a shared machine: compare them
within one run only.
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="steady-state calls per setting")
    p.add_argument(
        "--hf-xla-lengths",
        type=str,
        default="16,64",
        help="continuation lengths for HF generate on XLA in part 1 (it compiles about one "
        "graph per token on first use)",
    )
    args = p.parse_args()
    dev = runtime.init()
    sampling = SamplingConfig(temperature=0.7, top_k=50)
    hf_xla_lengths = {int(x) for x in args.hf_xla_lengths.split(",") if x}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"XLA device {runtime.device_type()} x{runtime.device_count()}, "
          f"torch threads {torch.get_num_threads()}")

    # -- part 1 ------------------------------------------------------------------------------
    b, pl, vocab = 8, 64, 8000
    print(f"\n[1] small LLaMA: 4 layers, hidden 256, inter 512, 8 heads / 4 kv, vocab {vocab}; "
          f"B={b}, PL={pl}")
    cpu_model = make_model(4, 256, 512, 8, 4, vocab)
    xla_model = make_model(4, 256, 512, 8, 4, vocab).to(dev)
    ids, mask = make_prompts(b, pl, vocab)
    x_ids, x_mask = ids.to(dev), mask.to(dev)
    gen = Generator(xla_model, sampling, eos_token_id=EOS, pad_token_id=PAD)
    for cl in (16, 64):
        tokens = b * cl
        print(f" CL={cl} ({tokens} tokens per call)")
        r = measure(engine_fn(gen, x_ids, x_mask, cl), args.repeats)
        print(row("(a) engine, XLA", r, tokens))
        r = measure(hf_fn(cpu_model, ids, mask, cl), args.repeats)
        print(row("(b) HF generate, eager CPU", r, tokens))
        if cl in hf_xla_lengths:
            r = measure(hf_fn(xla_model, x_ids, x_mask, cl), args.repeats)
            print(row("(c) HF generate, XLA", r, tokens))
        else:
            print("  (c) HF generate, XLA        skipped (--hf-xla-lengths)")

    # -- part 2 ------------------------------------------------------------------------------
    b, pl, cl, vocab = 8, 128, 64, 32000
    tokens = b * cl
    print(f"\n[2] 'debug' shape: 2 layers, hidden 128, inter 256, 4 heads / 2 kv, vocab {vocab}, "
          f"fp32; B={b}, PL={pl}, CL={cl}")
    xla_model = make_model(2, 128, 256, 4, 2, vocab).to(dev)
    ids, mask = make_prompts(b, pl, vocab, seed=1)
    x_ids, x_mask = ids.to(dev), mask.to(dev)
    gen = Generator(xla_model, sampling, eos_token_id=EOS, pad_token_id=PAD)
    eng = measure(engine_fn(gen, x_ids, x_mask, cl), args.repeats)
    print(row("engine, XLA", eng, tokens))
    hf = measure(hf_fn(xla_model, x_ids, x_mask, cl), args.repeats)
    print(row("HF generate, XLA", hf, tokens))
    speedup = hf["steady_s"] / eng["steady_s"]
    print(f"  steady state: engine {eng['steady_s']:.3f} s (target <= 0.76 s: "
          f"{'met' if eng['steady_s'] <= 0.76 else 'NOT met'}), {speedup:.1f}x HF generate on XLA "
          f"(target >= 2x: {'met' if speedup >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
