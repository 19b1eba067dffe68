"""Shared test utilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, num_devices: int, timeout: int = 600) -> dict:
    """Run ``code`` in a fresh Python with ``num_devices`` XLA:CPU devices (the device count
    is fixed per process). The code must print one JSON object on its last stdout line;
    returns it."""
    env = dict(os.environ)
    env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(num_devices), PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
    return json.loads(lines[-1])


def read_metrics(out: str) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny_config(cls, name: str, out: str, *overrides: str):
    """``configs/tiny/<name>.yaml`` as ``cls``, writing to ``out``, with the shipped data's
    absolute paths (tests may run from any directory) and no progress bar."""
    from torchxla_rlhf.config import load_config

    return load_config(
        cls, os.path.join(REPO, "configs", "tiny", f"{name}.yaml"),
        [f"output_dir={out}", "logger.progress_bar=false", "logger.log_freq=1",
         f"train_dataset.path={REPO}/data/tiny/preference_train.jsonl",
         f"eval_dataset.path={REPO}/data/tiny/preference_eval.jsonl", *overrides],
    )


# LLaMA-2's real SentencePiece tokenizer: read-only material beside the repository (never
# copied into it; see ../shared/tokenizers/llama2/README.md).
LLAMA2_TOKENIZER_DIR = os.path.join(os.path.dirname(REPO), "shared", "tokenizers", "llama2")
LLAMA2_MISSING = (
    f"LLaMA-2's tokenizer.model is not at {LLAMA2_TOKENIZER_DIR} "
    "(the shared/ folder beside the repository root is not present)"
)


def has_llama2_tokenizer() -> bool:
    return os.path.isfile(os.path.join(LLAMA2_TOKENIZER_DIR, "tokenizer.model"))


def U(content: str) -> dict:
    """A user message."""
    return {"role": "user", "content": content}


def A(content: str) -> dict:
    """An assistant message."""
    return {"role": "assistant", "content": content}


def S(content: str) -> dict:
    """A system message."""
    return {"role": "system", "content": content}
