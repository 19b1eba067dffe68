"""The ``ifeval`` verifier: IFEval-style instruction constraints, as open-instruct's RLVR mix.

The ground truth names one constraint and its arguments, as a JSON string or an object:
``{"func_name": "validate_word_constraint", "N": 50, "quantifier": "at least"}``; arguments
that are null are ignored (open-instruct's records carry every argument name, mostly null).
The score is 1.0 when the completion (after a ``</think>`` section and ``<answer>`` tags are
removed) satisfies the constraint, else 0.0. The 25 constraints and their rules follow
open-instruct's ``if_functions.py`` (``IFEvalVerifierOld``); :data:`CONSTRAINTS` lists them with
their arguments. An unknown constraint, a missing argument or one of the wrong type is an
error at data load (:func:`parse_constraint`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

__all__ = ["CONSTRAINTS", "parse_constraint", "check_ifeval_truth", "ifeval_score",
           "strip_thinking"]

_QUANTIFIERS = ("at least", "around", "at most")


def _count_ok(actual: int, N: int, quantifier: str, around: int) -> bool:
    if quantifier == "at least":
        return actual >= N
    if quantifier == "at most":
        return actual <= N
    return abs(actual - N) <= around


def _words_tolerance(N: int) -> int:
    return max(round(N * 0.1), 1)


def verify_keywords(text: str, keyword_list: list) -> bool:
    """Every keyword occurs (case-insensitive substring)."""
    low = text.lower()
    return all(k.lower() in low for k in keyword_list)


def verify_keyword_frequency(text: str, word: str, N: int) -> bool:
    """``word`` occurs exactly N times as a whole word (case-insensitive)."""
    return sum(w == word.lower() for w in re.findall(r"\b\w+\b", text.lower())) == N


def validate_forbidden_words(text: str, forbidden_words: list) -> bool:
    """None of the words occurs (case-insensitive substring)."""
    low = text.lower()
    return not any(w.lower() in low for w in forbidden_words)


def verify_letter_frequency(text: str, letter: str, N: int) -> bool:
    """``letter`` (one character, case-sensitive) occurs exactly N times."""
    return text.count(letter) == N


def validate_response_language(text: str, language: str) -> bool:
    """langdetect (seeded, deterministic) finds the ISO 639-1 ``language``; text with no
    language features is not in it."""
    from langdetect import DetectorFactory, detect  # noqa: PLC0415
    from langdetect.lang_detect_exception import LangDetectException  # noqa: PLC0415

    DetectorFactory.seed = 0
    try:
        return detect(text) == language
    except LangDetectException:
        return False


def verify_paragraph_count(text: str, N: int) -> bool:
    """Exactly N non-empty paragraphs separated by the markdown divider ``* * *``."""
    clean = "\n".join(line.strip() for line in text.splitlines()).strip()
    parts = clean.split("* * *")
    return all(p.strip() for p in parts) and len(parts) == N


def validate_word_constraint(text: str, N: int, quantifier: str) -> bool:
    """Whitespace-separated words: at least / at most N, or around N (10 %, at least 1)."""
    return _count_ok(len(text.strip().split()), N, quantifier, _words_tolerance(N))


def verify_sentence_constraint(text: str, N: int, quantifier: str) -> bool:
    """Sentences (split after ``.``, ``?``, ``!`` and a space, not after abbreviations such
    as ``e.g.`` or ``Mr.``): at least / at most N, or around N (within 1)."""
    sentences = re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?|!)\s", text)
    return _count_ok(len(sentences), N, quantifier, 1)


def validate_paragraphs(text: str, N: int, first_word: str, i: int) -> bool:
    """Exactly N paragraphs separated by blank lines (``\\n\\n``); the i-th (from 1) starts
    with ``first_word``."""
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and 1 <= i <= N and paragraphs[i - 1].strip().startswith(first_word)


def verify_postscript(text: str, postscript_marker: str) -> bool:
    """The marker occurs and something follows it."""
    at = text.find(postscript_marker)
    return at >= 0 and len(text[at:].strip()) > len(postscript_marker)


def validate_placeholders(text: str, N: int) -> bool:
    """At least N ``[placeholders]``."""
    return len(re.findall(r"\[(.*?)\]", text)) >= N


def verify_bullet_points(text: str, N: int) -> bool:
    """Exactly N lines starting with ``*`` or ``-``."""
    return sum(line.strip().startswith(("*", "-")) for line in text.split("\n")) == N


def validate_title(text: str) -> bool:
    """A title in double angular brackets, ``<<title>>``."""
    return bool(re.search(r"<<(.*?)>>", text))


def validate_choice(text: str, options: list) -> bool:
    """One of the options occurs (substring, as open-instruct)."""
    return any(str(o) in text for o in options)


def validate_highlighted_sections(text: str, N: int) -> bool:
    """At least N ``*highlighted*`` sections."""
    return len(re.findall(r"\*(.*?)\*", text)) >= N


def validate_sections(text: str, N: int, section_splitter: str) -> bool:
    """Exactly N sections, each starting with ``section_splitter`` (text before the first
    splitter counts as a section unless empty)."""
    sections = text.split(section_splitter)
    if sections[0] == "":
        sections.pop(0)
    return len(sections) == N


def validate_json_format(text: str) -> bool:
    """The whole response parses as JSON."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def validate_repeat_prompt(text: str, original_prompt: str) -> bool:
    """The response starts with the request, unchanged."""
    return text.startswith(original_prompt)


def validate_two_responses(text: str) -> bool:
    """Two different responses separated by exactly one ``******``."""
    if text.count("******") != 1:
        return False
    first, second = (p.strip() for p in text.split("******"))
    return first != second


def validate_uppercase(text: str) -> bool:
    """No lowercase letters."""
    return text == text.upper()


def validate_lowercase(text: str) -> bool:
    """No capital letters."""
    return text == text.lower()


def validate_frequency_capital_words(text: str, N: int, quantifier: str) -> bool:
    """All-capital words: at least / at most N, or around N (10 %, at least 1)."""
    return _count_ok(len(re.findall(r"\b[A-Z]+\b", text)), N, quantifier, _words_tolerance(N))


def validate_end(text: str, end_phrase: str) -> bool:
    """The response ends with ``end_phrase`` exactly."""
    return text.endswith(end_phrase)


def validate_quotation(text: str) -> bool:
    """Wrapped in double quotation marks."""
    return text.startswith('"') and text.endswith('"')


def validate_no_commas(text: str) -> bool:
    """No comma."""
    return "," not in text


_INT, _STR, _LIST = "integer", "string", "list of strings"
_ARG_TYPES = {"N": _INT, "i": _INT, "keyword_list": _LIST, "forbidden_words": _LIST,
              "options": _LIST, "word": _STR, "letter": _STR, "language": _STR,
              "first_word": _STR, "postscript_marker": _STR, "section_splitter": _STR,
              "end_phrase": _STR, "original_prompt": _STR, "quantifier": _STR}

CONSTRAINTS: dict[str, tuple[Callable[..., bool], tuple[str, ...]]] = {
    f.__name__: (f, args) for f, args in [
        (verify_keywords, ("keyword_list",)),
        (verify_keyword_frequency, ("word", "N")),
        (validate_forbidden_words, ("forbidden_words",)),
        (verify_letter_frequency, ("letter", "N")),
        (validate_response_language, ("language",)),
        (verify_paragraph_count, ("N",)),
        (validate_word_constraint, ("N", "quantifier")),
        (verify_sentence_constraint, ("N", "quantifier")),
        (validate_paragraphs, ("N", "first_word", "i")),
        (verify_postscript, ("postscript_marker",)),
        (validate_placeholders, ("N",)),
        (verify_bullet_points, ("N",)),
        (validate_title, ()),
        (validate_choice, ("options",)),
        (validate_highlighted_sections, ("N",)),
        (validate_sections, ("N", "section_splitter")),
        (validate_json_format, ()),
        (validate_repeat_prompt, ("original_prompt",)),
        (validate_two_responses, ()),
        (validate_uppercase, ()),
        (validate_lowercase, ()),
        (validate_frequency_capital_words, ("N", "quantifier")),
        (validate_end, ("end_phrase",)),
        (validate_quotation, ()),
        (validate_no_commas, ()),
    ]}
"""Constraint name (open-instruct's ``func_name``) -> (check, its argument names)."""


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def parse_constraint(ground_truth: Any) -> tuple[str, dict[str, Any]]:
    """``(func_name, arguments)`` of an ifeval ground truth (a JSON string or an object; null
    arguments dropped). Raises ValueError saying what was expected for anything else: no
    ``func_name``, an unknown one, a missing, unexpected or mistyped argument."""
    spec = ground_truth
    if isinstance(spec, list) and len(spec) == 1:  # open-instruct wraps some in a list
        spec = spec[0]
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise ValueError(
                "the ifeval verifier expects a JSON object with 'func_name' and its arguments; "
                f"got a string that is not JSON: {ground_truth!r:.80}") from None
    if not isinstance(spec, dict) or "func_name" not in spec:
        raise ValueError(
            "the ifeval verifier expects a JSON object with 'func_name' and its arguments "
            f"(e.g. {{\"func_name\": \"validate_lowercase\"}}); got {ground_truth!r:.80}")
    name = spec["func_name"]
    if name not in CONSTRAINTS:
        raise ValueError(f"unknown ifeval constraint {name!r}; expected one of "
                         f"{', '.join(sorted(CONSTRAINTS))}")
    wanted = CONSTRAINTS[name][1]
    args = {k: v for k, v in spec.items() if k != "func_name" and v is not None}
    extra = sorted(set(args) - set(wanted))
    missing = [a for a in wanted if a not in args]
    if extra or missing:
        raise ValueError(f"ifeval constraint {name} takes {list(wanted) or 'no arguments'}; "
                         + (f"missing {missing}" if missing else f"unexpected {extra}"))
    for arg in wanted:
        if not _type_ok(args[arg], _ARG_TYPES[arg]):
            raise ValueError(f"ifeval constraint {name}: {arg} must be a {_ARG_TYPES[arg]}, got "
                             f"{args[arg]!r:.60}")
    if "quantifier" in args and args["quantifier"] not in _QUANTIFIERS:
        raise ValueError(f"ifeval constraint {name}: quantifier must be one of {list(_QUANTIFIERS)}, "
                         f"got {args['quantifier']!r}")
    if name == "verify_letter_frequency" and len(args["letter"]) != 1:
        raise ValueError(f"ifeval constraint {name}: letter must be one character, got "
                         f"{args['letter']!r}")
    return name, args


def check_ifeval_truth(ground_truth: Any) -> None:
    """Raise ValueError when :func:`parse_constraint` cannot read ``ground_truth``."""
    parse_constraint(ground_truth)


def strip_thinking(text: str) -> str:
    """The answer part of a completion: what follows the last ``</think>``, without
    ``<answer>`` tags (open-instruct's ``remove_thinking_section``)."""
    text = text.replace("<|assistant|>", "").strip().split("</think>")[-1]
    return text.replace("<answer>", "").replace("</answer>", "").strip()


def ifeval_score(completion: str, ground_truth: Any) -> float:
    """1.0 when the completion's answer part satisfies the constraint, else 0.0 (an empty
    answer satisfies none)."""
    name, args = parse_constraint(ground_truth)
    answer = strip_thinking(completion)
    if not answer:
        return 0.0
    return 1.0 if CONSTRAINTS[name][0](answer, **args) else 0.0
