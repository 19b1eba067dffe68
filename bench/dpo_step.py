"""Benchmark: one DPO optimizer step of torchxla_rlhf (XLA) against TRL's ``DPOTrainer`` (eager CPU).

Both sides train the same randomly initialised Llama of the seed code's ``debug`` shape (2 layers,
hidden 128, MLP 256, 4 heads / 2 kv heads, vocab 32000, float32) on the same synthetic preference
pairs (Tulu chat format, byte-level ``tiny`` tokenizer), 4 pairs per step, reference model in
memory, ``beta = 0.1``, AdamW with gradient clipping at 1.0, no gradient accumulation.

What is timed:

* ours: ``DPOTrainer.train_step()`` (host batch -> device, the compiled micro-step with policy
  forward + backward and the reference forward, the compiled AdamW update) followed by
  ``runtime.wait()``, a deliberate device sync that exists only in this benchmark. Step 1
  includes tracing and XLA compilation. Also reported: the pipelined rate, ``steps`` calls with
  one wait at the end (what ``Trainer.train`` achieves, since dispatch is asynchronous).
  Compilations are counted with ``runtime.compile_count()`` (setup, step 1, warm-up, after).
* TRL: the interval between consecutive ``on_step_end`` callbacks (collation, forward/backward of
  policy and reference, clipping, AdamW, scheduler, TRL's per-step metric ``.item()`` calls), and
  ``on_step_begin`` -> ``on_step_end`` (the same without fetching/collating the batch). TRL runs
  in a subprocess with ``USE_TORCH_XLA=0`` and ``use_cpu=True``, before this process initialises
  torch_xla, so it is plain eager PyTorch on the CPU. TRL's own defaults that would make it do
  different work are switched off: ``bf16`` (its default on) and gradient checkpointing (its
  default on; ``--trl-gradient-checkpointing`` keeps it).

Both sides also report CPU seconds (user + system, all threads) per step, which is less
sensitive than wall time to other jobs sharing the cores.

TRL is measured twice: ``padded`` — every batch padded to exactly ``--seq-len`` tokens (TRL 1.16
``DPOConfig(max_length=L, pad_to_multiple_of=L)``; its collator truncates to ``max_length`` and then
pads to a multiple of ``pad_to_multiple_of``, which is ``L`` for every batch), the same ``[2B, L]``
shape our static-shape step computes; and ``dynamic`` — TRL's default, padding each batch to its
longest sequence.

Run (about 3-5 minutes on 2 CPU cores)::

    PJRT_DEVICE=CPU .venv/bin/python bench/dpo_step.py [--steps 5] [--seq-len 384] [--trl-modes padded]

Needs the ``bench`` extra (``pip install -e .[bench]``, i.e. ``trl==1.16.*``) for the TRL side;
``--skip-trl`` runs ours alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# The seed code's "debug" Llama (EasyLM LLaMAConfig 'debug'), fp32.
from torchxla_rlhf.models.llama import DEBUG_SHAPE  # noqa: E402
MODEL_SEED = 0
BETA = 0.1
LR = 5e-7
TARGET_RATIO = 0.7


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _text(rng: np.random.Generator, n_chars: int) -> str:
    """Random lowercase 'words' of about ``n_chars`` characters (1 byte = 1 tiny token)."""
    words, size = [], 0
    while size < n_chars:
        w = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 9))))
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:n_chars].strip()


def make_pairs(n: int, seq_len: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` Tulu-schema preference pairs whose tokenized sides are ~35%..98% of ``seq_len``.

    The Tulu format adds about 26 tokens (bos, ``<|user|>\\n``, ``\\n<|assistant|>\\n``, eos) to
    the prompt and response bytes; the lengths below keep every side within ``seq_len`` so that
    nothing is truncated and both trainers see identical token sequences.
    """
    rng = np.random.default_rng(seed)
    budget = seq_len - 30
    pairs = []
    for _ in range(n):
        prompt_len = int(rng.integers(int(0.08 * budget), int(0.32 * budget)))
        prompt = _text(rng, prompt_len)
        sides = []
        for _ in range(2):
            resp_len = int(rng.integers(int(0.25 * budget), budget - prompt_len))
            sides.append([
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(rng, resp_len)},
            ])
        pairs.append({"chosen": sides[0], "rejected": sides[1]})
    return pairs


def debug_llama_config(seq_len: int):
    """The HF ``LlamaConfig`` of the debug shape, exactly as ``llama.load_causal_lm`` builds ``tiny``."""
    from torchxla_rlhf.models import llama
    from torchxla_rlhf.configs.sections import TinyModelConfig

    tiny = TinyModelConfig(
        **DEBUG_SHAPE, max_position_embeddings=max(1024, seq_len), seed=MODEL_SEED
    )
    return tiny, llama.tiny_llama_config(tiny, pad_token_id=0)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (XLA:CPU's included)."""
    t = os.times()
    return t.user + t.system


def weight_fingerprint(named: dict) -> dict[str, float]:
    """Per-tensor float64 sum of squares: equal dicts = equal initial weights (to fp32 rounding)."""
    import torch

    return {k: float(v.detach().to(torch.float64).pow(2).sum()) for k, v in named.items()}


# ----------------------------------------------------------------------------------------------
# TRL side (runs in a subprocess: eager CPU, torch_xla never initialised)
# ----------------------------------------------------------------------------------------------


def trl_worker(args: argparse.Namespace) -> None:
    """Run TRL's DPOTrainer for ``warmup + steps`` updates per padding mode; print JSON."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback

    from torchxla_rlhf.data.tokenizers import build_tiny_tokenizer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.train_begin = 0.0
            self.begin: list[float] = []
            self.end: list[float] = []
            self.cpu_end: list[float] = []
            self.devices: set[str] = set()

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.train_begin = time.perf_counter()
            if model is not None:
                self.devices = {str(p.device) for p in model.parameters()}

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())
            self.cpu_end.append(cpu_seconds())

    with open(args.data) as f:
        pairs = [json.loads(line) for line in f]
    tokenizer = build_tiny_tokenizer()
    _, config = debug_llama_config(args.seq_len)
    out: dict[str, Any] = {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "modes": {},
    }
    total = 1 + args.warmup + args.steps
    for mode in args.trl_modes.split(","):
        torch.manual_seed(MODEL_SEED)  # what llama._init_cpu_tensors does for 'tiny'
        policy = LlamaForCausalLM(config)
        torch.manual_seed(MODEL_SEED)
        reference = LlamaForCausalLM(config)
        if mode == "padded":
            out["fingerprint"] = weight_fingerprint(dict(policy.named_parameters()))
        dpo_args = trl.DPOConfig(
            output_dir=os.path.join(args.tmp, f"trl_{mode}"),
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_length=args.seq_len,
            pad_to_multiple_of=args.seq_len if mode == "padded" else None,
            beta=BETA,
            learning_rate=LR,
            max_grad_norm=1.0,
            max_steps=total,
            lr_scheduler_type="linear",
            warmup_steps=0,
            report_to=[],
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            bf16=False,  # TRL's DPOConfig defaults to bf16 autocast; the benchmark is fp32
            fp16=False,
            # TRL defaults to gradient checkpointing (a second policy forward in the backward);
            # ours does not recompute unless model.gradient_checkpointing is set.
            gradient_checkpointing=args.trl_gradient_checkpointing,
            dataloader_num_workers=0,
            dataloader_drop_last=True,
            seed=0,
        )
        timer = StepTimes()
        t0 = time.perf_counter()
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=reference,
            args=dpo_args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        setup_s = time.perf_counter() - t0
        # The padded length of the batches actually fed, from the collator.
        lengths = sorted(
            trainer.data_collator([trainer.train_dataset[i] for i in range(k, k + args.batch_size)])[
                "input_ids"
            ].shape[1]
            for k in range(0, len(trainer.train_dataset) - args.batch_size + 1, args.batch_size)
        )
        result = trainer.train()
        end = timer.end
        out["modes"][mode] = {
            "setup_s": setup_s,
            "first_step_s": end[0] - timer.train_begin,
            "steps_s": [b - a for a, b in zip(end[args.warmup:], end[args.warmup + 1:])],
            "compute_s": [e - b for b, e in zip(timer.begin[args.warmup + 1:], end[args.warmup + 1:])],
            "cpu_s": [b - a for a, b in zip(timer.cpu_end[args.warmup:], timer.cpu_end[args.warmup + 1:])],
            "batch_lengths": lengths,
            "train_loss": float(result.training_loss),
            "devices": sorted(timer.devices),
            "attn_implementation": policy.config._attn_implementation,
        }
        del trainer, policy, reference
    print("TRL_RESULT " + json.dumps(out), flush=True)


def run_trl(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run :func:`trl_worker` in a child process with torch_xla switched off."""
    env = dict(os.environ, USE_TORCH_XLA="0", TOKENIZERS_PARALLELISM="false")
    env.pop("PJRT_DEVICE", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", "--data", args.data,
           "--tmp", args.tmp, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--trl-modes", args.trl_modes]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl-gradient-checkpointing")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            return json.loads(line[len("TRL_RESULT "):])
    print("TRL run failed (exit %d):\n%s" % (proc.returncode, proc.stderr[-4000:]), file=sys.stderr)
    return None


# ----------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Build ``torchxla_rlhf.trainers.dpo.DPOTrainer`` and time ``train_step()`` calls."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    from torchxla_rlhf import runtime
    from torchxla_rlhf.configs.loader import from_dict
    from torchxla_rlhf.configs.dpo import DPOConfig
    from torchxla_rlhf.trainers.dpo import DPOTrainer

    tiny, _ = debug_llama_config(args.seq_len)
    total = 1 + args.warmup + 2 * args.steps
    cfg = from_dict(DPOConfig, {
        "output_dir": os.path.join(args.tmp, "ours"),
        "mesh_dim": "1,-1,1",
        "seed": 0,
        "model": {
            "name_or_path": "tiny",
            "param_dtype": "float32",
            "compute_dtype": "float32",
            "tiny": {k: getattr(tiny, k) for k in (*DEBUG_SHAPE, "max_position_embeddings", "seed")},
        },
        "tokenizer": "tiny",
        "tokenizer_pad_token_id": 0,
        "optimizer": {"lr": LR, "end_lr": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 1.0,
                      "accumulate_gradient_steps": 1},
        "train_dataset": {"path": args.data, "seq_length": args.seq_len,
                          "batch_size": args.batch_size, "shuffle": True, "seed": 0},
        "total_steps": total,
        "beta": BETA,
        "logger": {"wandb_mode": "disabled", "progress_bar": False, "log_freq": 10**6},
    }, source="bench/dpo_step.py")

    t0 = time.perf_counter()
    trainer = DPOTrainer(cfg)
    runtime.wait()
    setup_s = time.perf_counter() - t0
    fingerprint = weight_fingerprint(
        {k: runtime.to_cpu(v) for k, v in trainer.policy.named_parameters()}
    )
    compiles0 = runtime.compile_count()

    cpu_s: list[float] = []

    def timed_step() -> tuple[float, dict]:
        t, c = time.perf_counter(), cpu_seconds()
        metrics = trainer.train_step()
        runtime.wait()  # benchmark-only sync: wait for the device to finish the update
        cpu_s.append(cpu_seconds() - c)
        return time.perf_counter() - t, metrics

    first_s, first_metrics = timed_step()
    compiles_first = runtime.compile_count() - compiles0
    first_loss = runtime.host_float(first_metrics["loss"])
    for _ in range(args.warmup):
        timed_step()
    compiles_warm = runtime.compile_count() - compiles0
    del cpu_s[:]
    steps_s = [timed_step()[0] for _ in range(args.steps)]
    # Pipelined: no wait between steps (tracing of step k+1 overlaps execution of step k).
    t = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    runtime.wait()
    pipelined_s = (time.perf_counter() - t) / args.steps
    compiles_total = runtime.compile_count() - compiles0
    trainer.close()
    return {
        "setup_s": setup_s,
        "first_step_s": first_s,
        "first_loss": first_loss,
        "steps_s": steps_s,
        "pipelined_s": pipelined_s,
        "cpu_s": cpu_s,
        "compiles_setup": compiles0,
        "compiles_first_step": compiles_first,
        "compiles_after_warmup": compiles_warm,
        "compiles_total": compiles_total,
        "host_syncs": runtime.host_sync_count(),
        "cpu_fallbacks": runtime.cpu_fallback_counts(),
        "fingerprint": fingerprint,
        "device_type": runtime.device_type(),
        "lengths": {
            "chosen": trainer.data.train.chosen.lengths.tolist(),
            "rejected": trainer.data.train.rejected.lengths.tolist(),
        },
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _med(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{statistics.median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def report(args: argparse.Namespace, ours: dict[str, Any], trl_out: dict[str, Any] | None) -> None:
    lens = np.array(ours["lengths"]["chosen"] + ours["lengths"]["rejected"])
    print()
    print(f"DPO step benchmark: debug Llama {DEBUG_SHAPE}, fp32, {args.batch_size} pairs/step, "
          f"seq_len {args.seq_len}, reference in memory")
    print(f"data: {len(lens) // 2} pairs, tokens per side min {lens.min()} / median "
          f"{int(np.median(lens))} / max {lens.max()}; machine: {os.cpu_count()} CPU(s)")
    print(f"timed: {args.warmup} warm-up step(s) after the first, then {args.steps} steps (median)")
    print()
    print(f"ours (torchxla_rlhf, XLA:{ours['device_type']}, static [2x{args.batch_size}, {args.seq_len}]):")
    print(f"  trainer setup                {ours['setup_s']:.2f} s ({ours['compiles_setup']} compilation(s))")
    print(f"  first step (incl. compile)   {ours['first_step_s']:.2f} s   loss {ours['first_loss']:.4f}")
    print(f"  steady step (+wait)          {_med(ours['steps_s'])}")
    print(f"  CPU time per step            {_med(ours['cpu_s'])}")
    print(f"  pipelined (no wait)          {ours['pipelined_s']:.3f} s/step")
    print(f"  XLA compilations             {ours['compiles_first_step']} in step 1, "
          f"{ours['compiles_after_warmup'] - ours['compiles_first_step']} in warm-up, "
          f"{ours['compiles_total'] - ours['compiles_after_warmup']} after "
          f"(runtime.compile_count() = {ours['compiles_setup'] + ours['compiles_total']})")
    print(f"  host syncs / CPU fallbacks   {ours['host_syncs']} / {ours['cpu_fallbacks'] or 'none'}")
    if trl_out is None:
        print("\nTRL: not run")
        return
    print()
    print(f"TRL {trl_out['trl']} DPOTrainer (eager CPU, torch {trl_out['torch']}, "
          f"{trl_out['torch_threads']} threads, transformers {trl_out['transformers']}):")
    ours_med = statistics.median(ours["steps_s"])
    for mode, r in trl_out["modes"].items():
        bl = r["batch_lengths"]
        print(f"  [{mode}] batches padded to {min(bl)}..{max(bl)} tokens, attention "
              f"{r['attn_implementation']}, params on {','.join(r['devices'])}")
        print(f"    first step                 {r['first_step_s']:.2f} s")
        print(f"    steady step                {_med(r['steps_s'])}")
        print(f"    of which fwd/bwd/optimizer {_med(r['compute_s'])}")
        print(f"    CPU time per step          {_med(r['cpu_s'])}")
        if r["steps_s"]:
            ratio = ours_med / statistics.median(r["steps_s"])
            cpu_ratio = statistics.median(ours["cpu_s"]) / statistics.median(r["cpu_s"])
            print(f"    ratio ours/TRL             {ratio:.2f} wall, {cpu_ratio:.2f} CPU time"
                  + (f"  (target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'})"
                     if mode == "padded" else ""))
    fp_ours, fp_trl = ours["fingerprint"], trl_out.get("fingerprint")
    if fp_trl is not None:
        same_keys = set(fp_ours) == set(fp_trl)
        rel = max((abs(fp_ours[k] - fp_trl[k]) / max(abs(fp_trl[k]), 1e-30) for k in fp_trl
                   if k in fp_ours), default=math.inf)
        print(f"\ninitial weights identical: {same_keys and rel < 1e-6} "
              f"(max relative difference of per-tensor sum of squares {rel:.1e})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steady-state steps (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    p.add_argument("--pairs", type=int, default=None,
                   help="pairs in the synthetic data set (default: enough for one epoch)")
    p.add_argument("--trl-modes", default="padded,dynamic",
                   help="comma-separated TRL runs: padded (to --seq-len), dynamic (TRL default)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="keep TRL's default gradient checkpointing (off here: ours does not recompute)")
    p.add_argument("--skip-trl", action="store_true", help="time our step only")
    p.add_argument("--json", help="also write all figures to this JSON file")
    # Internal: the TRL child process.
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_worker:
        trl_worker(args)
        return
    if args.steps < 2:
        p.error("--steps must be >= 2")
    bad = set(args.trl_modes.split(",")) - {"padded", "dynamic"}
    if bad:
        p.error(f"--trl-modes: unknown mode(s) {sorted(bad)}; expected 'padded' and/or 'dynamic'")
    if args.pairs is None:
        args.pairs = max(64, args.batch_size * (2 + args.warmup + 2 * args.steps))
    with tempfile.TemporaryDirectory(prefix="dpo_bench_") as tmp:
        args.tmp = tmp
        args.data = os.path.join(tmp, "pairs.jsonl")
        with open(args.data, "w") as f:
            for pair in make_pairs(args.pairs, args.seq_len):
                f.write(json.dumps(pair) + "\n")
        # TRL first, while this process has not started torch_xla (no competition for the cores).
        trl_out = None if args.skip_trl else run_trl(args)
        ours = run_ours(args)
    report(args, ours, trl_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("tmp", "data")},
                       "ours": ours, "trl": trl_out}, f, indent=1)


if __name__ == "__main__":
    main()
