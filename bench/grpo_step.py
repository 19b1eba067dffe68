"""Benchmark: GRPO steps of torchxla_rlhf's ``GRPOTrainer`` on XLA, beside ``bench/ppo_step.py``.

The same shapes as the PPO benchmark: a random Llama of the seed code's ``debug`` shape
(2 layers, hidden 128, vocab 32000), fp32; the same number of rollout rows (8 per step: 2
prompts x G = 4 here, 8 prompts x 1 there) of 128 prompt tokens (left-padded prompts from
``data/tiny/rlvr_train.jsonl``) and 64 sampled tokens; mini-batches of 4 rows (2 updates per
step). Variants: ``beta0`` (no reference model: the policy alone) and ``kl`` (beta 0.04, the
frozen reference scores every chunk). GRPO has no value model and no reward model here (the
``math`` verifier runs on the host: one transfer of the rollout's tokens per step).

What is timed (each variant in its own subprocess, so compile counts are clean):
``GRPOTrainer(cfg)``, ``runtime.sync()``, then for ``1 + --steps`` steps: ``train_step();
step += 1; runtime.sync(); runtime.wait()`` (the final sync + wait exist only here).

Run (about a minute on 2 CPU cores)::

    PJRT_DEVICE=CPU .venv/bin/python bench/grpo_step.py [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from ppo_step import CONTINUATION_LEN, MINI_BATCH_SIZE, PROMPT_LEN, _Counters  # noqa: E402
from torchxla_rlhf.models.llama import DEBUG_SHAPE  # noqa: E402

GROUP = 4
PROMPTS = 2
VARIANTS = {"beta0": ["beta=0.0"], "kl": ["beta=0.04"]}
RESULT_TAG = "GRPO_BENCH_RESULT "


def _overrides(variant: str, steps: int, out_dir: str) -> list[str]:
    ov = [f"output_dir={out_dir}", "mesh_dim='1,-1,1'", "seed=0", "tokenizer=tiny",
          f"train_dataset.path={REPO}/data/tiny/rlvr_train.jsonl",
          f"train_dataset.seq_length={PROMPT_LEN}", f"train_dataset.batch_size={PROMPTS}",
          f"rollouts_per_prompt={GROUP}", f"max_continuation_len={CONTINUATION_LEN}",
          f"mini_batch_size={MINI_BATCH_SIZE}", f"total_steps={steps}", "eval_dataset=null",
          "save_model_freq=0", "logger.log_freq=1", "logger.progress_bar=false",
          "model.name_or_path=tiny", "model.param_dtype=float32", "model.compute_dtype=float32",
          "model.tiny.seed=0", "model.tiny.max_position_embeddings=1024", *VARIANTS[variant]]
    return ov + [f"model.tiny.{k}={v}" for k, v in DEBUG_SHAPE.items()]


def run_variant(variant: str, steps: int) -> dict:
    """In this process: build, then time 1 + ``steps`` steps."""
    from torchxla_rlhf import runtime
    from torchxla_rlhf.configs.loader import load_config
    from torchxla_rlhf.configs.grpo import GRPOConfig
    from torchxla_rlhf.trainers.grpo import GRPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(GRPOConfig, os.path.join(REPO, "configs", "tiny", "grpo.yaml"),
                          _overrides(variant, steps + 1, os.path.join(tmp, "run")))
        trainer = GRPOTrainer(cfg)
        runtime.sync()
        per_step = []
        for _ in range(steps + 1):
            before = _Counters()
            trainer.train_step()
            trainer.step += 1
            runtime.sync()
            runtime.wait()
            per_step.append(_Counters().delta(before))
        trainer.close()
    later = per_step[1:]
    return {"variant": variant, "first_s": per_step[0]["wall_s"],
            "first_compiles": per_step[0]["compiles"],
            "later_s": statistics.median(d["wall_s"] for d in later),
            "later_compiles": sum(d["compiles"] for d in later),
            "reference_loaded": trainer.reference is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                        help=argparse.SUPPRESS)  # the subprocess side
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.variant:
        print(RESULT_TAG + json.dumps(run_variant(args.variant, args.steps)))
        return
    results = []
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps",
                               str(args.steps)], capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, PJRT_DEVICE="CPU"))
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
        if proc.returncode or not lines:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(RESULT_TAG):]))
    print("| variant | first step (incl. compile) | later steps | compiles first / later | reference |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['variant']} | {r['first_s']:.1f} s | {r['later_s']:.2f} s | "
              f"{r['first_compiles']} / {r['later_compiles']} | {r['reference_loaded']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
