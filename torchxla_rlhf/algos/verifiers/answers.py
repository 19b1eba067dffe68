"""Final answers of completions and the GSM8K verifier: exact numbers, no symbolic math.

The ``gsm8k`` verifier: a completion's answer is the first number after its last ``####``
(GSM8K's own marker; units and words after the number are ignored: ``#### 18 dollars`` is
18), else the last number inside its last ``\\boxed{...}``, else the last number in the text.
The ground truth is a number, a numeric string, a GSM8K solution ending in ``#### 42``, or a
list of these (any one matches). Numbers compare as exact rationals: ``42`` = ``42.0`` =
``$42`` = ``84/2``; thousands separators only count as such in groups of three
(``1,234`` = 1234, but ``3, 5`` is the two numbers 3 and 5, and ``35`` does not match it).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

__all__ = ["final_answer", "last_boxed", "numbers_in", "parse_number", "gsm8k_truths",
           "gsm8k_score", "check_gsm8k_truth", "format_reward"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: thousands groups of exactly three digits (1,234,567), or plain digits, an optional
# decimal part, an optional /denominator; a sign only when it is not a hyphen inside a word.
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d])"
    r"|(?<![\w.])[-+]?\.\d+")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?\d+)\s*\}\s*\{\s*(\d+)\s*\}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``) whose braces balance, or None."""
    for start in reversed([m.end() for m in _BOXED.finditer(text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def final_answer(text: str) -> tuple[str | None, bool]:
    """``(answer, explicit)``: the text of the completion's final answer and whether it was
    marked (``\\boxed{}`` or ``####``) rather than found as the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, True
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return (tail.splitlines()[0].strip() if tail else ""), True
    found = numbers_in(text)
    return (found[-1][1] if found else None), False


def parse_number(text: str, percent: bool = True) -> Fraction | None:
    """The exact value of one number written as ``1,234``, ``-3.50``, ``84/2``, ``$5``,
    ``50%`` (50; with ``percent=False`` a ``%`` makes it no plain number) or
    ``\\frac{1}{2}``; None when ``text`` is not exactly one number."""
    if not percent and "%" in text:
        return None
    t = _LATEX_FRAC.sub(r"\1/\2", text.strip())
    t = t.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").strip()
    t = t.replace("\\!", "").rstrip(".").strip()
    m = _NUMBER.fullmatch(t)
    if not m:
        return None
    try:
        return Fraction(m.group(0).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def numbers_in(text: str) -> list[tuple[Fraction, str]]:
    """Every number in ``text`` in order, as ``(value, as written)``; a LaTeX fraction of
    integers counts as one number."""
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    out = []
    for m in _NUMBER.finditer(text):
        try:
            out.append((Fraction(m.group(0).replace(",", "")), m.group(0)))
        except (ValueError, ZeroDivisionError):  # 1/0
            continue
    return out


def _gsm8k_answer(text: str) -> Fraction | None:
    if "####" in text:
        found = numbers_in(text.rsplit("####", 1)[1])
        if found:
            return found[0][0]
    boxed = last_boxed(text)
    if boxed is not None:
        found = numbers_in(boxed)
        if found:
            return found[-1][0]
    found = numbers_in(text)
    return found[-1][0] if found else None


def _truth_list(ground_truth: Any) -> list[Any]:
    return list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]


def gsm8k_truths(ground_truth: Any) -> list[Fraction]:
    """The accepted values of a GSM8K ground truth; raises ValueError (what was expected) for
    one that is not a number, a numeric string, a solution ending in ``#### <number>`` or a
    non-empty list of these."""
    items = _truth_list(ground_truth)
    if not items:
        raise ValueError("the gsm8k verifier expects a number, a numeric string or a solution "
                         "ending in '#### <number>' (or a list of them); got an empty list")
    out = []
    for item in items:
        value = None
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            value = Fraction(str(item))
        elif isinstance(item, str):
            value = (parse_number(item) if "####" not in item
                     else _gsm8k_answer(item.rsplit("####", 1)[1]))
        if value is None:
            raise ValueError(
                f"the gsm8k verifier expects a number, a numeric string or a solution ending in "
                f"'#### <number>' (or a list of them); got {type(item).__name__} {item!r:.80}")
        out.append(value)
    return out


def check_gsm8k_truth(ground_truth: Any) -> None:
    """Raise ValueError when :func:`gsm8k_truths` cannot read ``ground_truth``."""
    gsm8k_truths(ground_truth)


def gsm8k_score(completion: str, ground_truth: Any) -> float:
    """1.0 when the completion's GSM8K answer (see the module docstring) equals one of the
    ground truth's values exactly, else 0.0."""
    got = _gsm8k_answer(completion)
    return 1.0 if got is not None and got in gsm8k_truths(ground_truth) else 0.0


def format_reward(completions: list[str], records: list[dict]) -> list[float]:
    """1.0 where the completion gives its final answer explicitly (``\\boxed{}``, ``####``)."""
    return [1.0 if final_answer(text)[1] else 0.0 for text in completions]
