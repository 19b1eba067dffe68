"""Rewards of critic-free RL (GRPO, RLOO) computed on the host from decoded completions.

Built-in verifiers (each scores one completion against its record's ``ground_truth``, 1.0 or
0.0, and checks every record's ground truth when the data loads):

- ``gsm8k`` (:mod:`~torchxla_rlhf.algos.verifiers.answers`): the number after ``####`` (units and
  words ignored), else the last number in ``\\boxed{}``, else the last number; exact rationals.
- ``math`` (:mod:`~torchxla_rlhf.algos.verifiers.mathverify`): MATH-style LaTeX answers judged by
  ``math-verify`` (sympy equivalence, sets, intervals, units), with its timeouts.
- ``ifeval`` (:mod:`~torchxla_rlhf.algos.verifiers.ifeval`): the IFEval-style constraint the ground
  truth names (open-instruct's ``func_name`` and arguments).

``rewards.verifier`` is one of these, a user function ``module:function`` (imported with
importlib; never evaluated as code; called once per step as ``function(completions,
records) -> list of floats`` with each record's fields, ``origin`` being ``file:line``), or
``by_dataset``: each record's ``dataset`` field (case-insensitive, as open-instruct) picks its
verifier: ``gsm8k``, ``math`` and ``ifeval`` pick their namesakes, and ``rewards.verifiers``
(``"name=verifier, ..."``) adds or overrides names. :class:`Verifiers` resolves all this
before training; :meth:`Verifiers.check_record` rejects, at data load, a record whose dataset
has no verifier or whose ground truth its verifier cannot read.

Health, per verifier and step: the share of its records scored 1, scored 0, and failed (the
verifier raised or timed out: the record scores 0 and is counted, with a warning naming the
first such record of the run), and the seconds it took.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torchxla_rlhf.errors import UserError
from torchxla_rlhf.algos.verifiers.answers import check_gsm8k_truth, final_answer, format_reward, gsm8k_score
from torchxla_rlhf.algos.verifiers.ifeval import check_ifeval_truth, ifeval_score
from torchxla_rlhf.algos.verifiers.mathverify import (
    VerifierTimeout,
    check_math_truth,
    math_score,
    timeouts_available,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BY_DATASET",
    "BUILTIN_VERIFIERS",
    "BuiltinVerifier",
    "RewardFunctionError",
    "Verifiers",
    "call_reward_function",
    "final_answer",
    "format_reward",
    "parse_verifier_map",
    "resolve_verifier",
    "validate_records",
]

BY_DATASET = "by_dataset"
"""``rewards.verifier`` value: each record's ``dataset`` field picks its verifier."""


class RewardFunctionError(UserError, ValueError):
    """A reward function that cannot be found, or that breaks its contract (the message names
    the function and, where one is at fault, the record)."""


@dataclass(frozen=True)
class BuiltinVerifier:
    """A built-in verifier: ``score(completion, ground_truth, timeout_s) -> 0.0 or 1.0`` and
    ``check(ground_truth)``, which raises ValueError saying what it expected."""

    name: str
    score: Callable[[str, Any, int], float]
    check: Callable[[Any], None]


BUILTIN_VERIFIERS: dict[str, BuiltinVerifier] = {
    "gsm8k": BuiltinVerifier("gsm8k", lambda c, t, s=0: gsm8k_score(c, t), check_gsm8k_truth),
    "math": BuiltinVerifier("math", math_score, check_math_truth),
    "ifeval": BuiltinVerifier("ifeval", lambda c, t, s=0: ifeval_score(c, t), check_ifeval_truth),
}
"""Verifiable rewards that read every record's ``ground_truth``."""


def parse_verifier_map(text: str) -> dict[str, str]:
    """``"name=verifier, name=verifier"`` as a dict with lower-cased names; raises ValueError
    naming the entry that is not ``name=verifier``, whose verifier is neither a built-in nor
    ``module:function``, or that repeats a name."""
    out: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, spec = (p.strip() for p in entry.partition("="))
        if not sep or not name or not spec:
            raise ValueError(f"verifiers: entry {entry!r} is not 'dataset=verifier'")
        if spec not in BUILTIN_VERIFIERS and not _is_function_spec(spec):
            raise ValueError(f"verifiers: {name}={spec}: expected one of "
                             f"{sorted(BUILTIN_VERIFIERS)} or 'module:function'")
        if name.lower() in out:
            raise ValueError(f"verifiers: dataset {name!r} is named twice")
        out[name.lower()] = spec
    return out


def _is_function_spec(spec: str) -> bool:
    module_name, sep, attr = spec.partition(":")
    return bool(sep and module_name and attr)


def resolve_verifier(spec: str, key: str = "rewards.verifier") -> BuiltinVerifier | Callable:
    """A built-in (:class:`BuiltinVerifier`) or ``module:function`` (imported, never
    evaluated) as its callable."""
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    if not _is_function_spec(spec):
        raise RewardFunctionError(
            f"{key}: unknown reward function {spec!r}; expected one of "
            f"{sorted(BUILTIN_VERIFIERS) + [BY_DATASET]} or 'module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardFunctionError(
            f"{key}: cannot import module {module_name!r} of {spec!r} ({e}); is it "
            "on PYTHONPATH?") from e
    except Exception as e:  # noqa: BLE001 - the user's module ran and failed while imported
        if isinstance(e, SyntaxError):
            what = f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}"
        else:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            what = f"{frame.filename}:{frame.lineno}: {type(e).__name__}: {e}"
        raise RewardFunctionError(f"{key}: importing the module of {spec!r} failed ({what}); "
                                  "fix the module or the spec") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise RewardFunctionError(f"{key}: {module_name!r} has no function {attr!r} (from {spec!r})")
    return fn


def _check_values(name: str, values: Any, records: Sequence[dict]) -> list[float]:
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"reward function {name} must return numbers, got {values!r:.200}") from e
    if len(values) != len(records):
        raise RewardFunctionError(f"reward function {name} returned {len(values)} values for "
                                  f"{len(records)} completions")
    bad = [i for i, v in enumerate(values) if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise RewardFunctionError(f"reward function {name} returned {values[bad[0]]} for record "
                                  f"{records[bad[0]].get('origin', '?')}; rewards must be finite")
    return values


def call_reward_function(name: str, fn: Callable, completions: Sequence[str],
                         records: Sequence[dict]) -> tuple[list[float], list[BaseException | None]]:
    """``fn(completions, records)`` checked: one finite number per completion, and per
    completion the exception it raised (None when it scored). When the batch call raises,
    each record is retried alone: one that raises again scores 0 and has its exception
    listed. A function that raises on every record, returns the wrong count, non-numbers or
    non-finite values is broken: :class:`RewardFunctionError` naming it (and the record)."""
    try:
        return _check_values(name, fn(list(completions), list(records)), records), [None] * len(records)
    except RewardFunctionError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - a user's function: failures are per record
        values, errors = [], []
        for text, record in zip(completions, records):
            try:
                values.append(_check_values(name, fn([text], [record]), [record])[0])
                errors.append(None)
            except RewardFunctionError:
                raise
            except Exception as e:  # noqa: BLE001
                values.append(0.0)
                errors.append(e)
        if errors and all(e is not None for e in errors):
            first = errors[0]
            raise RewardFunctionError(
                f"reward function {name} failed on every record of the step, the first "
                f"{records[0].get('origin', '?')}: {type(first).__name__}: {first}") from batch_error
        return values, errors


class Verifiers:
    """The verifiers of a run, resolved from the ``rewards`` config before any weights load
    (an unknown name or a user function that cannot be imported fails at once).

    ``check_record(record)`` (for data load) and ``score(completions, records)`` (each step)
    route each record to its verifier: ``rewards.verifier`` itself, or with ``by_dataset`` the
    one its ``dataset`` field names."""

    def __init__(self, verifier: str, verifiers: str = "", timeout_s: int = 5):
        self.spec = verifier
        self.timeout_s = timeout_s
        self.by_dataset = verifier == BY_DATASET
        try:
            mapping = parse_verifier_map(verifiers)
        except ValueError as e:
            raise RewardFunctionError(f"rewards.{e}") from None
        self.mapping = {**{n: n for n in BUILTIN_VERIFIERS}, **mapping} if self.by_dataset else {}
        specs = set(self.mapping.values()) if self.by_dataset else {verifier}
        key = "rewards.verifiers" if self.by_dataset else "rewards.verifier"
        self.functions = {s: resolve_verifier(s, key) for s in sorted(specs)}
        self._warned: set[str] = set()
        if not timeouts_available() and "math" in self.functions:
            logger.warning("the math verifier runs off the main thread: math-verify's timeouts "
                           "(signal.alarm) cannot apply there, so a pathological answer can "
                           "stall a step")

    @classmethod
    def from_config(cls, rewards_cfg: Any) -> "Verifiers | None":
        """From a ``GRPORewardsConfig`` (None when no verifier is on)."""
        if not rewards_cfg.verifier or not rewards_cfg.verifier_weight:
            return None
        return cls(rewards_cfg.verifier, rewards_cfg.verifiers, rewards_cfg.verifier_timeout_s)

    def spec_for(self, record: dict) -> str:
        """The verifier (name or ``module:function``) that scores ``record``; raises
        ValueError (what was expected) when its ``dataset`` field names none."""
        if not self.by_dataset:
            return self.spec
        dataset = record.get("dataset")
        if isinstance(dataset, list) and len(dataset) == 1:
            dataset = dataset[0]
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(
                f"'dataset' is {dataset!r:.60}; rewards.verifier=by_dataset picks each record's "
                f"verifier by its dataset name ({', '.join(sorted(self.mapping))}; more through "
                "rewards.verifiers)")
        spec = self.mapping.get(dataset.lower())
        if spec is None:
            raise ValueError(
                f"no verifier for dataset {dataset!r}; known: {', '.join(sorted(self.mapping))} "
                f"(map it with rewards.verifiers=\"{dataset}=<verifier>\")")
        return spec

    def check_record(self, record: dict) -> None:
        """Raise ValueError (one line, what was expected) when ``record`` has no verifier or
        its ground truth is not what its verifier reads; a user function takes any."""
        fn = self.functions[self.spec_for(record)]
        if isinstance(fn, BuiltinVerifier):
            truth = record.get("ground_truth")
            if truth is None or truth == "" or truth == []:
                raise ValueError(f"no 'ground_truth' (the RLVR schema is messages, ground_truth, "
                                 f"dataset); the {fn.name} verifier needs one for every record")
            fn.check(truth)

    def score(self, completions: Sequence[str], records: Sequence[dict]) -> tuple[list[float], dict]:
        """One reward per completion and the step's health metrics per verifier:
        ``rewards/<v>/frac_one``, ``/frac_zero``, ``/frac_error`` (raised or timed out;
        scored 0), ``/frac_timeout``, ``/count`` and ``time/verifier/<v>_s``."""
        groups: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            groups.setdefault(self.spec_for(record), []).append(i)
        values = [0.0] * len(records)
        metrics: dict[str, float] = {}
        for spec, idx in groups.items():
            fn = self.functions[spec]
            t0 = time.perf_counter()
            if isinstance(fn, BuiltinVerifier):
                got, errors = [], []
                for i in idx:
                    try:
                        got.append(float(fn.score(completions[i], records[i]["ground_truth"],
                                                  self.timeout_s)))
                        errors.append(None)
                    except Exception as e:  # noqa: BLE001 - raised or timed out: scored 0, counted
                        got.append(0.0)
                        errors.append(e)
            else:
                got, errors = call_reward_function(spec, fn, [completions[i] for i in idx],
                                                   [records[i] for i in idx])
            elapsed = time.perf_counter() - t0
            name = spec.replace(":", ".")
            n = len(idx)
            failed = [(records[i], e) for i, e in zip(idx, errors) if e is not None]
            ok = [v for v, e in zip(got, errors) if e is None]
            metrics[f"rewards/{name}/count"] = float(n)
            metrics[f"rewards/{name}/frac_one"] = sum(v == 1.0 for v in ok) / n
            metrics[f"rewards/{name}/frac_zero"] = sum(v == 0.0 for v in ok) / n
            metrics[f"rewards/{name}/frac_error"] = len(failed) / n
            metrics[f"rewards/{name}/frac_timeout"] = sum(
                isinstance(e, VerifierTimeout) for _, e in failed) / n
            metrics[f"time/verifier/{name}_s"] = elapsed
            if failed and spec not in self._warned:
                self._warned.add(spec)
                record, e = failed[0]
                logger.warning("verifier %s failed on record %s (%s: %s); such records score 0 "
                               "and are counted in rewards/%s/frac_error (warned once)", spec,
                               record.get("origin", "?"), type(e).__name__, str(e)[:200], name)
            for i, v in zip(idx, got):
                values[i] = v
        return values, metrics


def validate_records(records: Sequence[dict], rewards_cfg: Any) -> None:
    """Check every record against the verifier it would get (see :class:`Verifiers`); raise
    :class:`RewardFunctionError` naming the first bad record's ``origin`` (``file:line``)."""
    verifiers = Verifiers.from_config(rewards_cfg)
    if verifiers is None:
        return
    for record in records:
        try:
            verifiers.check_record(record)
        except ValueError as e:
            raise RewardFunctionError(f"{record.get('origin', '?')}: {e}") from None
