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
    from torchxla_rlhf.configs.loader import load_config

    return load_config(
        cls, os.path.join(REPO, "configs", "tiny", f"{name}.yaml"),
        [f"output_dir={out}", "logger.progress_bar=false", "logger.log_freq=1",
         f"train_dataset.path={REPO}/data/tiny/preference_train.jsonl",
         f"eval_dataset.path={REPO}/data/tiny/preference_eval.jsonl", *overrides],
    )


# LLaMA-2's real SentencePiece tokenizer is not shipped (Llama 2 Community License): the tests
# that need it read the directory $LLAMA2_TOKENIZER_DIR names (one holding tokenizer.model, e.g.
# the tokenizer files of meta-llama/Llama-2-7b-hf) and skip, saying so, where it is unset.
LLAMA2_TOKENIZER_DIR = os.environ.get("LLAMA2_TOKENIZER_DIR", "")
LLAMA2_MISSING = (
    f"LLaMA-2's tokenizer.model is not in LLAMA2_TOKENIZER_DIR={LLAMA2_TOKENIZER_DIR!r} "
    "(set it to a directory holding LLaMA-2's tokenizer.model)"
)


def has_llama2_tokenizer() -> bool:
    return bool(LLAMA2_TOKENIZER_DIR) and os.path.isfile(
        os.path.join(LLAMA2_TOKENIZER_DIR, "tokenizer.model"))


def U(content: str) -> dict:
    """A user message."""
    return {"role": "user", "content": content}


def A(content: str) -> dict:
    """An assistant message."""
    return {"role": "assistant", "content": content}


def S(content: str) -> dict:
    """A system message."""
    return {"role": "system", "content": content}


def sigterm_during_second_update(trainer) -> None:
    """Make ``trainer`` receive SIGTERM right after its first update (so during the 2nd step):
    the preemption path then saves at the next step boundary and stops at step 2."""
    import signal

    step = trainer.train_step

    def step_then_sigterm():
        metrics = step()
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    trainer.train_step = step_then_sigterm
