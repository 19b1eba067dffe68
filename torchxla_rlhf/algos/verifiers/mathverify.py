"""The ``math`` verifier: MATH-style answers judged by Hugging Face's ``math-verify``.

A completion's answer is found by ``math_verify.parse``: the last ``\\boxed{...}`` first, else
a LaTeX expression after an anchor ("the final answer is $...$"), else the last LaTeX or plain
expression (``ExprExtractionConfig``); GSM8K's ``#### 42`` is read as the answer ``42``. The
ground truth is LaTeX without dollar signs (``\\frac{\\sqrt{3}}{2}``, ``(1, 2)``,
``\\{1, 2\\}``, ``25\\%``), a number, or a list of these (any one matches). Both are parsed
to sympy and compared by ``math_verify.verify``: numbers within 6 decimals, expressions
through simplification, sets and intervals as sets, tuples in order, ``x = 5`` against ``5``,
units (``\\text{ cm}``, ``^\\circ``), ``\\%``, ``\\$``, ``\\tfrac``, ``\\frac12``,
``\\sqrt2``, ``\\left( \\right)`` normalized away. When both sides are plain numbers the
comparison is exact (rationals) and math-verify is not called.

Timeouts: math-verify bounds each parse and each comparison with ``signal.alarm``, which only
works in the main thread. There, ``timeout_s`` (whole seconds) applies and a timeout raises
:class:`VerifierTimeout` (the caller scores it 0 and counts it). Off the main thread the
alarms are impossible: verification runs without them, and :func:`timeouts_available` says so.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from torchxla_rlhf.algos.verifiers.answers import parse_number

__all__ = ["VerifierTimeout", "check_math_truth", "math_score", "timeouts_available"]


class VerifierTimeout(Exception):
    """math-verify gave up on a parse or a comparison after its time limit."""


def timeouts_available() -> bool:
    """math-verify's signal-based timeouts work only in the main thread."""
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify  # noqa: PLC0415 - sympy and antlr load only when the verifier is used

    return math_verify


def _call(fn, *args, timeout_kw: str, timeout_s: int, **kwargs):
    """Call a math-verify function with its timeout (keyword ``timeout_kw``; none off the
    main thread) and ``raise_on_error``; its timeout exception (a ``BaseException``) becomes
    :class:`VerifierTimeout`."""
    from math_verify.errors import TimeoutException  # noqa: PLC0415

    kwargs[timeout_kw] = timeout_s if timeouts_available() else None
    try:
        return fn(*args, raise_on_error=True, **kwargs)
    except TimeoutException as e:
        raise VerifierTimeout(f"math-verify gave up after {timeout_s} s") from e


def _items(ground_truth: Any) -> list[Any]:
    return list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]


def check_math_truth(ground_truth: Any) -> None:
    """Raise ValueError (what was expected) unless ``ground_truth`` is a non-empty LaTeX
    string, a number, or a non-empty list of these."""
    items = _items(ground_truth)
    ok = bool(items) and all(
        (isinstance(t, str) and t.strip()) or (isinstance(t, (int, float)) and not isinstance(t, bool))
        for t in items)
    if not ok:
        bad = next((t for t in items if not isinstance(t, (str, int, float)) or isinstance(t, bool)
                    or (isinstance(t, str) and not t.strip())), ground_truth)
        raise ValueError(
            "the math verifier expects a LaTeX answer string (e.g. \\frac{1}{2}), a number, or "
            f"a list of them; got {type(bad).__name__} {bad!r:.80}")


@functools.lru_cache(maxsize=65536)
def _parse_gold(text: str, timeout_s: int) -> tuple:
    mv = _math_verify()
    wrapped = text if ("$" in text or "\\boxed" in text or "\\(" in text) else f"${text}$"
    parsed = _call(mv.parse, wrapped, timeout_kw="parsing_timeout", timeout_s=timeout_s,
                   extraction_config=[mv.LatexExtractionConfig(), mv.ExprExtractionConfig()])
    if not parsed:
        raise ValueError(f"math-verify cannot parse the ground truth {text!r:.80}")
    return tuple(parsed)


def _parse_answer(completion: str, timeout_s: int) -> list:
    mv = _math_verify()
    text = completion
    if "####" in completion and "\\boxed" not in completion:
        tail = completion.rsplit("####", 1)[1].strip()
        text = tail.splitlines()[0] if tail else ""
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return _call(mv.parse, text, timeout_kw="parsing_timeout", timeout_s=timeout_s,
                 extraction_config=config)


def _plain_number(text: str):
    from torchxla_rlhf.algos.verifiers.answers import final_answer  # noqa: PLC0415

    answer, explicit = final_answer(text)
    return parse_number(answer, percent=False) if answer is not None and explicit else None


def math_score(completion: str, ground_truth: Any, timeout_s: int = 5) -> float:
    """1.0 when the completion's answer equals one of the ground truths by math-verify's
    rules (see the module docstring), else 0.0. Raises :class:`VerifierTimeout` on a timeout
    and ValueError for a ground truth math-verify cannot parse."""
    golds = [str(t) if not isinstance(t, str) else t for t in _items(ground_truth)]
    exact_golds = [parse_number(g, percent=False) for g in golds]
    got = _plain_number(completion)
    if got is not None and all(v is not None for v in exact_golds):
        return 1.0 if got in exact_golds else 0.0
    answer = None
    for gold in golds:
        parsed_gold = list(_parse_gold(gold, timeout_s))
        if answer is None:
            answer = _parse_answer(completion, timeout_s)
            if not answer:
                return 0.0
        if _call(_math_verify().verify, parsed_gold, answer, timeout_kw="timeout_seconds",
                 timeout_s=timeout_s):
            return 1.0
    return 0.0
