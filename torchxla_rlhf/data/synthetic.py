"""A tiny preference task in the real Tulu 2.5 schemas, with a known oracle.

Used by the tiny configs and the end-to-end tests: DPO, the reward model and PPO all train on
CPU in minutes on a 2-layer byte-level model and have a ground truth to be measured against.

Oracle (:func:`oracle_score`): the fraction of the letters of a response that are vowels
(``a e i o u``, case-insensitive; 0 when there is no letter). Why this rule: it is a per-byte
property averaged over the response, which one attention head can compute by attending evenly
to the response bytes; a byte-level model needs no word segmentation or memorised vocabulary
to learn it. A policy raises it by choosing vowel-rich words ("aurora", "audio", "idea") over
consonant clusters ("strength", "rhythm").

Responses are 3-12 words from a fixed list (capitalised first word, final period). For each
pair both answers share the prompt; the one with the higher oracle score is ``chosen`` and
``margin`` is the score gap. Pairs with a gap below ``MIN_GAP`` are resampled, so labels are
never near-ties and a model can reach >= 0.9 held-out accuracy.

Size guarantees (with the tiny byte-level tokenizer, BOS and EOS included): every preference
sequence fits in ``MAX_PAIR_TOKENS`` = 128 tokens and every PPO prompt (with BOS and the
``<|assistant|>\\n`` header) in ``MAX_PROMPT_TOKENS`` = 96 tokens (single-turn prompts without
a system turn: at most 55), so tiny configs never truncate. An answer is at most 12 words of at
most 8 letters: 108 bytes + EOS.

Files (``python -m torchxla_rlhf.data.synthetic --out data/tiny --seed 0``):
``preference_train.jsonl`` (2000 pairs), ``preference_eval.jsonl`` (200),
``prompts.jsonl`` (500; ``{"messages": [...user turn(s)], "source", "id"}`` like
``allenai/tulu-2.5-prompts``). About 10% of records have a system turn and 15% are multi-turn.

Verifiable task (GRPO / RLOO): ``rlvr_train.jsonl`` (500) and ``rlvr_eval.jsonl`` (64) in
open-instruct's RLVR schema (``messages``, ``ground_truth``, ``dataset``). The prompt asks to
repeat a digit ("Say 7."); ``ground_truth`` is that number, checked by
the ``math`` verifier (the last number of the completion must equal it). A random byte-level
model emits digits by chance, so groups start with some signal; copying the prompt's digits is
a one-head attention pattern the tiny model can learn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Any

__all__ = [
    "WORDS",
    "MIN_GAP",
    "MAX_PAIR_TOKENS",
    "MAX_PROMPT_TOKENS",
    "oracle_score",
    "make_preference_records",
    "make_prompt_records",
    "make_rlvr_records",
    "write_tiny_task",
    "main",
]

VOWELS = frozenset("aeiou")
MIN_GAP = 0.12
MAX_PAIR_TOKENS = 128
MAX_PROMPT_TOKENS = 96

# A spread of vowel fractions: vowel-rich, middling and consonant-heavy English words.
WORDS: tuple[str, ...] = (
    # rich
    "idea", "area", "audio", "aurora", "aria", "oasis", "radio", "piano", "opera", "video",
    "echo", "iota", "aloe", "eerie", "queue", "aqua", "ouzo", "patio", "rodeo", "ego",
    # middling
    "river", "water", "table", "garden", "paper", "window", "music", "summer", "people", "little",
    "simple", "orange", "banana", "tomato", "potato", "over", "under", "about", "again", "moon",
    "ocean", "forest", "open", "blue", "nice", "kind", "home", "tree", "rain", "road",
    # poor
    "strength", "rhythm", "crypt", "script", "street", "stand", "black", "fresh", "dry", "sky",
    "glyph", "trunk", "plant", "string", "crisp", "blunt", "sprint", "twelfth", "lynx", "myth",
    "gym", "spry", "shrub", "strict", "craft",
)

_TOPICS = (
    "rain", "the sea", "music", "a garden", "the moon", "trees", "bread", "winter", "a city",
    "rivers", "birds", "a song", "the sky", "stars", "coffee", "books", "the road", "a dream",
)
_ASKS = (
    "Tell me about {t}.",
    "Describe {t}.",
    "Say something about {t}.",
    "What do you think of {t}?",
    "Write a line on {t}.",
    "Give me words for {t}.",
)
_FOLLOW_UPS = ("Say more.", "Another one?", "Go on.", "And then?", "Try again.")
_SYSTEMS = ("Be brief.", "You are a poet.", "Answer kindly.")


def oracle_score(text: str) -> float:
    """Fraction of the letters of ``text`` that are vowels (a, e, i, o, u; case-insensitive).

    ``oracle_score("Idea crypt.") == 3 / 9`` (i, e, a of i d e a c r y p t); 0.0 for a text with no letter.
    """
    letters = [c for c in text.lower() if c.isalpha()]
    if not letters:
        return 0.0
    return sum(c in VOWELS for c in letters) / len(letters)


def _tiny_len(text: str) -> int:
    """Token count under the tiny byte-level tokenizer: bytes, with <s> and </s> one token."""
    return len(text.encode("utf-8")) - 2 * text.count("<s>") - 3 * text.count("</s>")


def _render(messages: list[dict[str, str]]) -> str:
    # Local copy of the Tulu rendering (kept import-light); tests check it against data.chat.
    parts = []
    for m in messages:
        eos = "</s>" if m["role"] == "assistant" else ""
        parts.append(f"<|{m['role']}|>\n{m['content'].strip()}{eos}\n")
    return "<s>" + "".join(parts).strip()


_MAX_WORD = max(len(w) for w in WORDS) + 1  # a word and its separator, in bytes


def _response(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def _prompt_messages(rng: random.Random) -> list[dict[str, str]]:
    """A prompt: optional system turn, a user turn, and sometimes an earlier exchange."""
    messages: list[dict[str, str]] = []
    r = rng.random()
    if r < 0.10:
        messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
    ask = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
    messages.append({"role": "user", "content": ask})
    if 0.10 <= r < 0.25:  # multi-turn: a short earlier answer, then a follow-up question
        messages.append({"role": "assistant", "content": _response(rng, 2, 3)})
        messages.append({"role": "user", "content": rng.choice(_FOLLOW_UPS)})
    return messages


def _prompt_tokens(messages: list[dict[str, str]]) -> int:
    """Tiny-tokenizer length of the PPO prompt: BOS + turns + "<|assistant|>\\n"."""
    return _tiny_len(_render(messages)) + 1 + len("<|assistant|>\n")  # + the stripped "\n"


def _sample_prompt(rng: random.Random) -> list[dict[str, str]]:
    while True:  # resampling on the prompt alone: no effect on which answer is chosen
        messages = _prompt_messages(rng)
        if _prompt_tokens(messages) <= MAX_PROMPT_TOKENS:
            return messages


def make_preference_records(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` records ``{"chosen", "rejected", "margin", "source"}`` (tulu-2.5-preference-data
    schema): same prompt, chosen has the higher oracle score, gap >= MIN_GAP.

    Both answers draw their word count from the same range, capped so that the longest possible
    answer fits ``MAX_PAIR_TOKENS`` after this prompt (multi-turn prompts get shorter answers);
    no pair is ever rejected for length, so length says nothing about the label.
    """
    records = []
    while len(records) < n:
        prompt = _sample_prompt(rng)
        # prompt tokens + answer bytes + eos <= MAX_PAIR_TOKENS
        hi = min(12, (MAX_PAIR_TOKENS - _prompt_tokens(prompt) - 1) // _MAX_WORD)
        if hi < 3:
            continue
        a, b = _response(rng, 3, hi), _response(rng, 3, hi)
        sa, sb = oracle_score(a), oracle_score(b)
        if abs(sa - sb) < MIN_GAP:
            continue
        (best, s_best), (worst, s_worst) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
        records.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": best}],
                "rejected": prompt + [{"role": "assistant", "content": worst}],
                "margin": round(s_best - s_worst, 6),
                "source": "synthetic",
            }
        )
    return records


def make_prompt_records(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` records ``{"messages": [...user turn(s)], "source", "id"}`` (tulu-2.5-prompts
    schema), each fitting MAX_PROMPT_TOKENS as a PPO prompt with BOS."""
    return [
        {"messages": _sample_prompt(rng), "source": "synthetic", "id": f"synthetic_{i}"} for i in range(n)
    ]


def make_rlvr_records(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` records ``{"messages", "ground_truth", "dataset"}``: repeat a digit."""
    records = []
    for _ in range(n):
        number = str(rng.randrange(0, 10))
        records.append({"messages": [{"role": "user", "content": f"Say {number}."}],
                        "ground_truth": number, "dataset": "tiny_say_number"})
    return records


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_tiny_task(out_dir: str, seed: int = 0, n_train: int = 2000, n_eval: int = 200, n_prompts: int = 500) -> dict[str, str]:
    """Write the three files; deterministic in ``seed`` (each file has its own stream).
    Returns ``{name: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "preference_train": os.path.join(out_dir, "preference_train.jsonl"),
        "preference_eval": os.path.join(out_dir, "preference_eval.jsonl"),
        "prompts": os.path.join(out_dir, "prompts.jsonl"),
        "rlvr_train": os.path.join(out_dir, "rlvr_train.jsonl"),
        "rlvr_eval": os.path.join(out_dir, "rlvr_eval.jsonl"),
    }
    _write_jsonl(paths["preference_train"], make_preference_records(n_train, random.Random(f"{seed}-train")))
    _write_jsonl(paths["preference_eval"], make_preference_records(n_eval, random.Random(f"{seed}-eval")))
    _write_jsonl(paths["prompts"], make_prompt_records(n_prompts, random.Random(f"{seed}-prompts")))
    _write_jsonl(paths["rlvr_train"], make_rlvr_records(500, random.Random(f"{seed}-rlvr-train")))
    _write_jsonl(paths["rlvr_eval"], make_rlvr_records(64, random.Random(f"{seed}-rlvr-eval")))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/tiny", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_eval", type=int, default=200)
    parser.add_argument("--n_prompts", type=int, default=500)
    args = parser.parse_args(argv)
    paths = write_tiny_task(args.out, args.seed, args.n_train, args.n_eval, args.n_prompts)
    for name, path in paths.items():
        print(f"{name}: {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
