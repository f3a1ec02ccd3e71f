"""Eval gates: the same prompts through a candidate version and its baseline, scored.

A :class:`Gate` holds :class:`EvalCase` s (a prompt or chat messages, optionally the
expected text or tool calls, sampling parameters: greedy by default), the scorers to
apply and the regression it tolerates (``threshold``, default 0.005: the case study's
0.5%). :meth:`Gate.run` sends every case to the candidate and to the baseline,
interleaved and concurrently, through a ``generate`` callable (the pool's own
``complete``: both versions' requests share the engine's batches, which multi-LoRA
makes cheap), scores each answer and returns a :class:`GateReport`.

Built-in scorers (by name):

* ``exact_match``: the answer's text equals the expected text (whitespace at the ends
  ignored);
* ``tool_call_names``: the answer calls exactly the expected functions, in order;
* ``tool_call_arguments``: the same calls with equal arguments once parsed as JSON (key
  order and whitespace do not matter).

Where a case gives no expected output, the **baseline's answer is the reference**: the
baseline scores 1 and the candidate scores its agreement with the baseline. A user
scorer is any callable ``(case, completion) -> float`` (a ``bool`` counts as 0 or 1),
named by its ``__name__`` or wrapped in :class:`UserScorer` to name it.

A scorer's regression is the baseline's mean score minus the candidate's; the gate
fails when any scorer's regression exceeds the threshold.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lorapool.errors import InvalidRequest, LorapoolError
from lorapool.types import Completion, Message, SamplingParams, ToolCall

__all__ = [
    "BUILTIN_SCORERS",
    "DEFAULT_THRESHOLD",
    "CaseResult",
    "EvalCase",
    "Gate",
    "GateReport",
    "Generate",
    "Progress",
    "ScorerResult",
    "UserScorer",
    "load_cases",
]

T = TypeVar("T")

DEFAULT_THRESHOLD = 0.005
"""The regression a gate tolerates by default: 0.5% (the 40-adapter case study's)."""

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
"""A case's sampling parameters when it gives none: greedy, 64 tokens."""


@dataclass(frozen=True)
class EvalCase:
    """One prompt of a gate, and what a good answer is.

    ``prompt``: a string or chat messages. ``expected``: the text a good answer is
    (``None``: the baseline's answer is the reference). ``expected_tool_calls``: the
    calls a good answer makes, each ``{"name": ..., "arguments": {...}}`` (arguments an
    object or its JSON text). ``tools`` / ``tool_choice``: as for ``pool.generate``.
    ``params``: sampling parameters (default :data:`GREEDY`). ``id``: a name for the
    report (default: the case's index).
    """

    prompt: str | Sequence[Message]
    expected: str | None = None
    expected_tool_calls: tuple[Mapping[str, Any], ...] | None = None
    tools: tuple[Mapping[str, Any], ...] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    params: SamplingParams = GREEDY
    id: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalCase:
        """A case from JSON: ``prompt`` or ``messages``, ``expected``,
        ``expected_tool_calls``, ``tools``, ``tool_choice``, ``params`` (an object of
        :class:`SamplingParams` fields, greedy unless it says otherwise), ``id``."""
        known = {"prompt", "messages", "expected", "expected_tool_calls", "tools"}
        known |= {"tool_choice", "params", "id"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"eval case: unknown fields {unknown}; known: {sorted(known)}")
        if ("prompt" in data) == ("messages" in data):
            raise InvalidRequest("eval case: give exactly one of 'prompt' or 'messages'")
        prompt = data["prompt"] if "prompt" in data else data["messages"]
        if isinstance(prompt, str):
            pass
        elif isinstance(prompt, list) and all(isinstance(m, Mapping) for m in prompt):
            prompt = tuple(prompt)
        else:
            raise InvalidRequest("eval case: 'prompt' is a string, 'messages' a list of objects")
        params = data.get("params")
        try:
            sampling = (
                GREEDY
                if params is None
                else SamplingParams.model_validate({**GREEDY.model_dump(), **params})
            )
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"eval case: bad params: {exc}") from exc
        calls = data.get("expected_tool_calls")
        tools = data.get("tools")
        return cls(
            prompt=prompt,
            expected=data.get("expected"),
            expected_tool_calls=None if calls is None else tuple(calls),
            tools=None if tools is None else tuple(tools),
            tool_choice=data.get("tool_choice"),
            params=sampling,
            id=None if data.get("id") is None else str(data["id"]),
        )

    def canonical(self) -> dict[str, Any]:
        """The case as JSON values, for the gate's identity."""
        return {
            "prompt": self.prompt if isinstance(self.prompt, str) else list(self.prompt),
            "expected": self.expected,
            "expected_tool_calls": (
                None
                if self.expected_tool_calls is None
                else [_call_json(c) for c in self.expected_tool_calls]
            ),
            "tools": None if self.tools is None else list(self.tools),
            "tool_choice": self.tool_choice,
            "params": self.params.model_dump(mode="json"),
            "id": self.id,
        }


def load_cases(path: str | Path) -> list[EvalCase]:
    """Cases from a file: JSON Lines (one case object a line), or JSON (a list of case
    objects, or an object with ``cases``)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path}: neither JSON nor JSON Lines: {exc}") from exc
    if isinstance(data, Mapping):
        data = data.get("cases")
    if not isinstance(data, list) or not all(isinstance(c, Mapping) for c in data):
        raise InvalidRequest(f"{path}: expected a list of case objects (or {{'cases': [...]}})")
    return [EvalCase.from_dict(c) for c in data]


# -- scorers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UserScorer:
    """A scorer of your own under a name: ``fn(case, completion)`` returns a score
    (higher is better; a ``bool`` is 0 or 1)."""

    name: str
    fn: Callable[[EvalCase, Completion], float | bool]

    def __call__(self, case: EvalCase, answer: Completion) -> float | bool:
        return self.fn(case, answer)


def _call_json(call: Mapping[str, Any] | ToolCall) -> dict[str, Any]:
    """A call as ``{"name", "arguments"}`` with the arguments parsed (``None`` when they
    are not valid JSON)."""
    name: object
    arguments: object
    if isinstance(call, ToolCall):
        name, arguments = call.name, call.arguments
    else:
        name, arguments = call.get("name"), call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    return {"name": name, "arguments": arguments}


class _Builtin:
    """A built-in scorer: compares an answer with the case's expectation, or with the
    baseline's answer where the case has none."""

    name = ""

    def applies(self, case: EvalCase) -> bool:
        raise NotImplementedError

    def score(self, case: EvalCase, answer: Completion, reference: Completion | None) -> float:
        raise NotImplementedError


class _ExactMatch(_Builtin):
    name = "exact_match"

    def applies(self, case: EvalCase) -> bool:
        return case.expected is not None or case.expected_tool_calls is None

    def score(self, case: EvalCase, answer: Completion, reference: Completion | None) -> float:
        want = case.expected if case.expected is not None else _text(reference)
        return float(want is not None and answer.text.strip() == want.strip())


class _ToolNames(_Builtin):
    name = "tool_call_names"

    def applies(self, case: EvalCase) -> bool:
        return case.expected_tool_calls is not None or bool(case.tools)

    def _key(self, calls: Iterable[Mapping[str, Any] | ToolCall]) -> list[Any]:
        return [_call_json(c)["name"] for c in calls]

    def score(self, case: EvalCase, answer: Completion, reference: Completion | None) -> float:
        if case.expected_tool_calls is not None:
            want: list[Any] | None = self._key(case.expected_tool_calls)
        else:
            want = None if reference is None else self._key(reference.tool_calls)
        return float(want is not None and self._key(answer.tool_calls) == want)


class _ToolArguments(_ToolNames):
    name = "tool_call_arguments"

    def _key(self, calls: Iterable[Mapping[str, Any] | ToolCall]) -> list[Any]:
        return [_call_json(c) for c in calls]


def _text(completion: Completion | None) -> str | None:
    return None if completion is None else completion.text


BUILTIN_SCORERS: Mapping[str, _Builtin] = {
    s.name: s for s in (_ExactMatch(), _ToolNames(), _ToolArguments())
}
"""The built-in scorers by name."""

Scorer = str | UserScorer | Callable[[EvalCase, Completion], float | bool]
"""A built-in scorer's name, or a callable ``(case, completion) -> score``."""


def _scorer_name(scorer: Scorer) -> str:
    if isinstance(scorer, str):
        return scorer
    if isinstance(scorer, UserScorer):
        return scorer.name
    return str(getattr(scorer, "__qualname__", None) or type(scorer).__qualname__)


# -- the gate ----------------------------------------------------------------------------


class Generate(Protocol):
    """Runs one case with one adapter version and returns the whole answer: the pool's
    ``complete`` with the case's prompt, tools and parameters (``AdapterPool.promote``
    passes it). Raising a :class:`~lorapool.errors.LorapoolError` scores that answer 0."""

    def __call__(self, case: EvalCase, adapter: str) -> Awaitable[Completion]: ...


Progress = Callable[[int, int], None]
"""Called as cases finish: ``(cases done, cases in all)``."""


@dataclass(frozen=True)
class ScorerResult:
    """One scorer over the gate: the mean scores, the regression, whether it passed."""

    name: str
    candidate: float
    baseline: float
    regression: float
    """``baseline - candidate``: how much worse the candidate is (negative: better)."""
    passed: bool
    cases: int
    """Cases the scorer applied to."""


@dataclass(frozen=True)
class CaseResult:
    """One case's answers and scores. A scorer that did not apply has no score."""

    index: int
    id: str
    candidate_text: str
    baseline_text: str
    candidate_scores: Mapping[str, float]
    baseline_scores: Mapping[str, float]
    candidate_error: str | None = None
    baseline_error: str | None = None

    @property
    def regressions(self) -> dict[str, float]:
        """Per scorer, the baseline's score minus the candidate's on this case."""
        return {n: self.baseline_scores[n] - s for n, s in self.candidate_scores.items()}


@dataclass(frozen=True)
class GateReport:
    """What a gate found: per scorer (:attr:`scores`) and per case (:attr:`cases`)."""

    gate: str
    identity: str
    """The gate's name and the digest of its cases and settings (:attr:`Gate.identity`)."""
    threshold: float
    candidate: str
    baseline: str
    scores: Mapping[str, ScorerResult]
    cases: tuple[CaseResult, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """Every scorer's regression is within the threshold, and every request of both
        versions was answered: a failed request is no answer, and two failures scoring
        0 against 0 must not pass a version (a cold start refused, an engine down)."""
        return not self.unanswered and all(s.passed for s in self.scores.values())

    @property
    def unanswered(self) -> list[CaseResult]:
        """The cases where either version's request failed."""
        return [c for c in self.cases if c.candidate_error or c.baseline_error]

    @property
    def failures(self) -> list[ScorerResult]:
        """The scorers whose regression exceeds the threshold."""
        return [s for s in self.scores.values() if not s.passed]

    @property
    def candidate_scores(self) -> dict[str, float]:
        """The candidate's mean score by scorer (what the registry keeps)."""
        return {n: s.candidate for n, s in self.scores.items()}

    @property
    def reason(self) -> str:
        """Why the gate failed, with the numbers ("" when it passed)."""
        reasons = [
            f"{s.name} regressed by {s.regression:.4f} (candidate {s.candidate:.4f}, "
            f"baseline {s.baseline:.4f}) over the threshold {self.threshold:g}"
            for s in self.failures
        ]
        if self.unanswered:
            first = self.unanswered[0]
            side, error = (
                ("candidate", first.candidate_error)
                if first.candidate_error
                else ("baseline", first.baseline_error)
            )
            reasons.append(
                f"{len(self.unanswered)} case(s) not answered by both versions (case "
                f"{first.id}, {side}: {error})"
            )
        return "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values."""
        return {
            "gate": self.gate,
            "identity": self.identity,
            "threshold": self.threshold,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "passed": self.passed,
            "scores": {
                n: {
                    "candidate": s.candidate,
                    "baseline": s.baseline,
                    "regression": s.regression,
                    "passed": s.passed,
                    "cases": s.cases,
                }
                for n, s in self.scores.items()
            },
            "cases": [
                {
                    "index": c.index,
                    "id": c.id,
                    "candidate_text": c.candidate_text,
                    "baseline_text": c.baseline_text,
                    "candidate_scores": dict(c.candidate_scores),
                    "baseline_scores": dict(c.baseline_scores),
                    "candidate_error": c.candidate_error,
                    "baseline_error": c.baseline_error,
                }
                for c in self.cases
            ],
        }

    def format(self) -> str:
        """A few lines for a terminal: the verdict and each scorer's numbers."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"gate {self.identity}: {verdict} ({self.candidate} vs {self.baseline}, "
            f"{len(self.cases)} case(s), threshold {self.threshold:g})"
        ]
        for s in self.scores.values():
            mark = "ok" if s.passed else "REGRESSED"
            lines.append(
                f"  {s.name}: candidate {s.candidate:.4f} baseline {s.baseline:.4f} "
                f"regression {s.regression:+.4f} [{mark}] ({s.cases} case(s))"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Answer:
    completion: Completion | None
    error: str | None


class Gate:
    """An eval gate: cases, scorers, a threshold and a name.

    ``scorers``: built-in names (:data:`BUILTIN_SCORERS`) and callables; by default
    ``exact_match``, with ``tool_call_names`` and ``tool_call_arguments`` when a case
    carries tools or expected tool calls. ``threshold``: the largest regression (the
    baseline's mean score minus the candidate's, per scorer) that still passes.
    ``concurrency``: requests in flight at once (each case sends two).
    """

    def __init__(
        self,
        cases: Iterable[EvalCase | Mapping[str, Any]],
        *,
        name: str = "gate",
        threshold: float = DEFAULT_THRESHOLD,
        scorers: Sequence[Scorer] | None = None,
        concurrency: int = 16,
    ) -> None:
        self.cases = tuple(c if isinstance(c, EvalCase) else EvalCase.from_dict(c) for c in cases)
        if not self.cases:
            raise InvalidRequest("a gate needs at least one case")
        if not math.isfinite(threshold) or threshold < 0:
            raise InvalidRequest(f"a gate's threshold must be >= 0, not {threshold!r}")
        if concurrency < 1:
            raise InvalidRequest("a gate's concurrency must be >= 1")
        if not name or not isinstance(name, str):
            raise InvalidRequest("a gate needs a name")
        self.name = name
        self.threshold = float(threshold)
        self.concurrency = concurrency
        if scorers is None:
            tools = any(c.tools or c.expected_tool_calls is not None for c in self.cases)
            scorers = ["exact_match", *(["tool_call_names", "tool_call_arguments"] * tools)]
        unknown = [s for s in scorers if isinstance(s, str) and s not in BUILTIN_SCORERS]
        if unknown:
            raise InvalidRequest(
                f"unknown scorers {unknown}; built in: {sorted(BUILTIN_SCORERS)} (or a callable)"
            )
        names = [_scorer_name(s) for s in scorers]
        if not names or len(set(names)) != len(names):
            raise InvalidRequest(f"a gate needs scorers with distinct names, got {names}")
        self.scorers: tuple[Scorer, ...] = tuple(scorers)

    @property
    def identity(self) -> str:
        """``name@digest``: the sha256 (first 16 hex digits) of the cases, the scorers'
        names and the threshold. Two gates with the same identity judge alike (a user
        scorer is identified by its name only)."""
        body = {
            "cases": [c.canonical() for c in self.cases],
            "scorers": [_scorer_name(s) for s in self.scorers],
            "threshold": self.threshold,
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return f"{self.name}@{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    async def run(
        self,
        generate: Generate,
        *,
        candidate: str,
        baseline: str,
        on_progress: Progress | None = None,
    ) -> GateReport:
        """Run every case with ``candidate`` and ``baseline`` (adapter ids, as
        ``generate`` takes them), interleaved and concurrently, and score the answers.

        ``on_progress(done, total)`` is called as each case's two answers are in.
        A :class:`~lorapool.errors.LorapoolError` from one request scores that answer 0
        (the report names the error); anything else propagates.
        """
        total = len(self.cases)
        limit = asyncio.Semaphore(self.concurrency)
        done = 0

        async def answer(case: EvalCase, adapter: str) -> _Answer:
            async with limit:
                try:
                    return _Answer(await generate(case, adapter), None)
                except LorapoolError as exc:
                    return _Answer(None, f"{type(exc).__name__}: {exc}")

        async def both(case: EvalCase) -> tuple[_Answer, _Answer]:
            nonlocal done
            # Both versions' requests are created together: they queue side by side and
            # share the engine's batches.
            pair = await _all([answer(case, candidate), answer(case, baseline)])
            done += 1
            if on_progress is not None:
                on_progress(done, total)
            return pair[0], pair[1]

        answers = await _all([both(c) for c in self.cases])
        results = [
            self._score(i, c, a, b)
            for i, (c, (a, b)) in enumerate(zip(self.cases, answers, strict=True))
        ]
        return self.report(results, candidate=candidate, baseline=baseline)

    def _score(self, index: int, case: EvalCase, cand: _Answer, base: _Answer) -> CaseResult:
        """One case's scores, for each scorer that applies to it."""
        cand_scores: dict[str, float] = {}
        base_scores: dict[str, float] = {}
        for scorer in self.scorers:
            if isinstance(scorer, str) and not BUILTIN_SCORERS[scorer].applies(case):
                continue
            name = _scorer_name(scorer)
            cand_scores[name] = _judge(scorer, case, cand.completion, base.completion)
            base_scores[name] = _judge(scorer, case, base.completion, base.completion)
        return CaseResult(
            index=index,
            id=case.id if case.id is not None else str(index),
            candidate_text="" if cand.completion is None else cand.completion.text,
            baseline_text="" if base.completion is None else base.completion.text,
            candidate_scores=cand_scores,
            baseline_scores=base_scores,
            candidate_error=cand.error,
            baseline_error=base.error,
        )

    def report(self, results: Sequence[CaseResult], *, candidate: str, baseline: str) -> GateReport:
        """The report of scored cases: each scorer's mean over the cases it applied to,
        its regression and verdict."""
        scores: dict[str, ScorerResult] = {}
        for scorer in self.scorers:
            name = _scorer_name(scorer)
            pairs = [
                (r.candidate_scores[name], r.baseline_scores[name])
                for r in results
                if name in r.candidate_scores
            ]
            if not pairs:
                continue
            cand = sum(p[0] for p in pairs) / len(pairs)
            base = sum(p[1] for p in pairs) / len(pairs)
            regression = base - cand
            scores[name] = ScorerResult(
                name=name,
                candidate=cand,
                baseline=base,
                regression=regression,
                # a hair of slack: means of the same scores can differ in the last bit
                passed=regression <= self.threshold + 1e-12,
                cases=len(pairs),
            )
        if not scores:
            raise InvalidRequest(f"gate {self.name!r}: no scorer applies to any of its cases")
        return GateReport(
            gate=self.name,
            identity=self.identity,
            threshold=self.threshold,
            candidate=candidate,
            baseline=baseline,
            scores=scores,
            cases=tuple(results),
        )


async def _all(aws: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``aws`` concurrently; their results in order. When one raises (a bug) or the
    caller is cancelled, the others are cancelled and awaited before it propagates: no
    request of a gate goes on running unread."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _judge(
    scorer: Scorer, case: EvalCase, answer: Completion | None, reference: Completion | None
) -> float:
    """One answer's score (0 for an answer that failed); ``reference``: the baseline's."""
    if answer is None:
        return 0.0
    if isinstance(scorer, str):
        return BUILTIN_SCORERS[scorer].score(case, answer, reference)
    return _as_score(scorer(case, answer), _scorer_name(scorer))


def _as_score(value: object, name: str) -> float:
    """A user scorer's result as a finite float."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    raise InvalidRequest(f"scorer {name!r} returned {value!r}, not a finite number")
