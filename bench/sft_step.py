"""Benchmark: SFT tokens per second, packed rows vs one conversation per padded row (XLA).

The data: synthetic conversations (Tulu format, byte-level ``tiny`` tokenizer, one token per
byte) whose lengths have a long tail: assistant answers drawn from a log-normal (median about
``--median`` tokens, sigma ``--sigma``), a user turn of a few words, some conversations two
turns long; cut to ``--seq-len``. The same conversations are trained twice with the same model
(a 4-layer Llama, hidden 256, vocab 320, fp32), ``batch_size`` rows of ``--seq-len`` per step:

* packed (``packing: true``): best-fit decreasing into rows, segment mask, restarting positions;
* padded (``packing: false``): one conversation per row, right-padded.

Timed: ``--steps`` calls of ``SFTTrainer.train_step()`` after one warm-up step (which compiles),
then ``runtime.wait()``. Reported per mode: step time, conversation tokens (non-padding) per
second, assistant (loss) tokens per second, the rows' fill, the epoch time it implies, and the
compilations after the first step (must be 0).

    PJRT_DEVICE=CPU .venv/bin/python bench/sft_step.py [--steps 6] [--seq-len 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

WORDS = ("river moon stone light tree cloud music garden ocean winter paper window bright "
         "quiet running golden forest little simple number answer").split()


def synthetic_conversations(n: int, median: float, sigma: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(1 + int(rng.random() < 0.3)):
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS, 4))})
            chars = max(8, int(rng.lognormal(np.log(median), sigma)))
            text = " ".join(rng.choice(WORDS, chars // 6 + 1))[:chars]
            messages.append({"role": "assistant", "content": text})
        out.append({"messages": messages})
    return out


def measure(path: str, out: str, packing: bool, args) -> dict:
    from torchxla_rlhf import runtime
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.configs.sft import SFTConfig
    from torchxla_rlhf.trainers.sft import SFTTrainer

    cfg = load_config(SFTConfig, os.path.join(REPO, "configs", "tiny", "sft.yaml"), [
        f"output_dir={out}", f"train_dataset.path={path}", "eval_dataset=null",
        "messages_key=messages", f"packing={str(packing).lower()}",
        f"train_dataset.seq_length={args.seq_len}", f"train_dataset.batch_size={args.batch}",
        "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
        "model.tiny.num_hidden_layers=4", f"model.tiny.max_position_embeddings={args.seq_len}",
        "logger.progress_bar=false", f"total_steps={args.steps + 1}", "save_model_freq=0"])
    trainer = SFTTrainer(cfg)
    ds = trainer.data.train
    runtime.sync()
    trainer.train_step()  # compiles
    runtime.wait()
    compiles = runtime.compile_count()
    real, scored = 0.0, 0.0
    t0 = time.perf_counter()
    outs = [trainer.train_step() for _ in range(args.steps)]
    runtime.wait()
    dt = (time.perf_counter() - t0) / args.steps
    after = runtime.compile_count() - compiles
    for m in outs:
        real += runtime.host_float(m["real_tokens"])
        scored += runtime.host_float(m["loss_tokens"])
    trainer.close()
    rows = len(ds)
    return {"mode": "packed" if packing else "padded", "rows": rows,
            "fill": round(ds.fill, 3), "step_s": round(dt, 4),
            "tokens_per_s": round(real / args.steps / dt, 1),
            "assistant_tokens_per_s": round(scored / args.steps / dt, 1),
            "epoch_s": round(rows / args.batch * dt, 1), "compiles_after_first_step": after}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--median", type=float, default=60.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "conversations.jsonl")
        convs = synthetic_conversations(args.conversations, args.median, args.sigma)
        with open(path, "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in convs)
        results = [measure(path, os.path.join(tmp, mode), packing, args)
                   for mode, packing in (("packed", True), ("padded", False))]
    from torchxla_rlhf.data.tokenizers import load_tokenizer
    from torchxla_rlhf.trainers.sft import tokenize_conversations

    lengths = np.array([len(ids) for ids, _ in tokenize_conversations(
        load_tokenizer("tiny", 0), [c["messages"] for c in convs])])
    pct = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)}
    print(f"conversation tokens: {pct}, max {lengths.max()}; rows of {args.seq_len}, "
          f"batch {args.batch}")
    for r in results:
        print(json.dumps(r))
    packed, padded = results
    print(f"packed / padded: {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x tokens/s, "
          f"epoch {padded['epoch_s'] / packed['epoch_s']:.2f}x shorter")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lengths": pct, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
