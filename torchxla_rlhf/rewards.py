"""Rewards of critic-free RL (GRPO, RLOO) computed on the host from decoded completions.

Built-ins (names for ``rewards.verifier``):

- ``math``: exact match of the completion's final answer with the record's ``ground_truth``
  (1.0 or 0.0). The final answer is the last ``\\boxed{...}`` (balanced braces), else the text
  after the last ``####`` (GSM8K), else the last number in the completion. Numbers are
  normalized before comparing: thousands separators, ``$``, a trailing ``.`` or ``%`` and
  surrounding spaces go; ``42``, ``42.0``, ``042`` and ``84/2`` are equal (exact rationals, no
  float rounding); ``\\frac{a}{b}`` and ``\\dfrac{a}{b}`` read as ``a/b``. Anything that is not a
  number is compared as text without spaces. A list ground truth accepts any of its answers.
- ``format`` (its own weight, ``rewards.format_weight``): 1.0 when the completion states its
  final answer in an explicit form (``\\boxed{...}`` or ``#### ...``), else 0.0.

A user function ``module:function`` (imported with importlib; never evaluated as code) is
called once per step as ``function(completions, records) -> list of floats``: the decoded
completions of the whole rollout batch and each one's record fields (``ground_truth``,
``dataset`` and the record's other fields; ``origin`` is ``file:line``).
"""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Any, Callable, Sequence

from torchxla_rlhf.errors import UserError

__all__ = [
    "RewardFunctionError",
    "BUILTIN_VERIFIERS",
    "final_answer",
    "normalize_answer",
    "math_exact_match",
    "format_reward",
    "resolve_verifier",
    "call_reward_function",
]


class RewardFunctionError(UserError, ValueError):
    """A reward function that cannot be found, or that fails on a record (the message names
    the function and the record)."""


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def final_answer(text: str) -> tuple[str | None, bool]:
    """``(answer, explicit)``: the completion's final answer and whether it was given in an
    explicit form (``\\boxed{}`` or ``####``) rather than found as the last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, True
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return (tail.splitlines()[0].strip() if tail else ""), True
    numbers = _NUMBER.findall(text)
    return (numbers[-1] if numbers else None), False


def normalize_answer(answer: Any) -> Fraction | str:
    """A comparable form of an answer: an exact :class:`~fractions.Fraction` for numbers
    (``"1,000"``, ``"$42.0"``, ``"\\frac{1}{2}"``, ``"3/6"``), else the text without spaces."""
    if isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, (int, float)):
        return Fraction(str(answer))
    text = _FRAC.sub(r"\1/\2", str(answer)).strip()
    text = text.replace(",", "").replace("$", "").replace("\\!", "").strip()
    text = text.rstrip(".").rstrip("%").strip()
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text)
    try:
        return Fraction(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return re.sub(r"\s+", "", text)


def _truths(ground_truth: Any) -> list[Any]:
    if isinstance(ground_truth, (list, tuple)):
        return list(ground_truth)
    return [ground_truth]


def math_exact_match(completions: Sequence[str], records: Sequence[dict]) -> list[float]:
    """1.0 where the completion's :func:`final_answer` equals (normalized) a ground truth."""
    out = []
    for text, record in zip(completions, records):
        answer, _ = final_answer(text)
        if answer is None:
            out.append(0.0)
            continue
        got = normalize_answer(answer)
        # A GSM8K-style ground truth may be a whole solution ending in "#### 42".
        truths = [final_answer(t)[0] if isinstance(t, str) and "####" in t else t
                  for t in _truths(record.get("ground_truth"))]
        out.append(1.0 if any(got == normalize_answer(t) for t in truths if t is not None) else 0.0)
    return out


def format_reward(completions: Sequence[str], records: Sequence[dict]) -> list[float]:
    """1.0 where the completion gives its final answer explicitly (``\\boxed{}``, ``####``)."""
    return [1.0 if final_answer(text)[1] else 0.0 for text in completions]


BUILTIN_VERIFIERS: dict[str, Callable[[Sequence[str], Sequence[dict]], list[float]]] = {
    "math": math_exact_match,
}
"""Verifiable rewards that need a ``ground_truth`` in every record."""


def resolve_verifier(spec: str) -> Callable[[Sequence[str], Sequence[dict]], list[float]]:
    """A built-in name or ``module:function`` (imported, never evaluated)."""
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(
            f"rewards.verifier: unknown reward function {spec!r}; expected one of "
            f"{sorted(BUILTIN_VERIFIERS)} or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardFunctionError(
            f"rewards.verifier: cannot import module {module_name!r} of {spec!r} ({e}); is it "
            "on PYTHONPATH?") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise RewardFunctionError(
            f"rewards.verifier: {module_name!r} has no function {attr!r} (from {spec!r})")
    return fn


def call_reward_function(name: str, fn: Callable, completions: Sequence[str],
                         records: Sequence[dict]) -> list[float]:
    """``fn(completions, records)`` checked: one finite number per completion. When the call
    raises, each record is retried alone to name the one that fails."""
    try:
        values = fn(list(completions), list(records))
    except Exception as batch_error:  # a user's function: any failure is reported, by record
        for text, record in zip(completions, records):
            try:
                fn([text], [record])
            except Exception as e:
                raise RewardFunctionError(
                    f"reward function {name} failed on record {record.get('origin', '?')}: "
                    f"{type(e).__name__}: {e}") from e
        raise RewardFunctionError(
            f"reward function {name} failed on the batch of {len(completions)} completions: "
            f"{type(batch_error).__name__}: {batch_error}") from batch_error
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"reward function {name} must return numbers, got {values!r:.200}") from e
    if len(values) != len(completions):
        raise RewardFunctionError(f"reward function {name} returned {len(values)} values for "
                                  f"{len(completions)} completions")
    bad = [i for i, v in enumerate(values) if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise RewardFunctionError(f"reward function {name} returned {values[bad[0]]} for record "
                                  f"{records[bad[0]].get('origin', '?')}; rewards must be finite")
    return values
