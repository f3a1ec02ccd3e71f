"""Eval gates (lorapool.lifecycle.gate): the built-in scorers, user scorers, the report's
means and regressions, the threshold, the gate's identity, loading cases, and how a run
sends the candidate's and the baseline's requests (interleaved, concurrently)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from lorapool.errors import BackendError, InvalidRequest
from lorapool.lifecycle import EvalCase, Gate, GateReport, UserScorer, load_cases
from lorapool.lifecycle.gate import BUILTIN_SCORERS, GREEDY
from lorapool.types import Completion, ToolCall, Usage


def answer(text: str = "", calls: tuple[ToolCall, ...] = ()) -> Completion:
    return Completion(
        text=text,
        token_ids=(),
        finish_reason="tool_calls" if calls else "stop",
        usage=Usage(1, 1),
        tool_calls=calls,
    )


def call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id="c", name=name, arguments=arguments)


def score(name: str, case: EvalCase, ans: Completion, ref: Completion | None = None) -> float:
    return BUILTIN_SCORERS[name].score(case, ans, ref)


# -- scorers ----------------------------------------------------------------------------


def test_exact_match_compares_with_the_expected_text_ignoring_end_whitespace() -> None:
    case = EvalCase("q", expected="Arr, matey!")
    assert score("exact_match", case, answer("  Arr, matey!\n")) == 1.0
    assert score("exact_match", case, answer("arr, matey!")) == 0.0
    assert score("exact_match", case, answer("Arr,  matey!")) == 0.0


def test_without_an_expected_text_the_baselines_answer_is_the_reference() -> None:
    case = EvalCase("q")
    assert score("exact_match", case, answer("same"), answer("same ")) == 1.0
    assert score("exact_match", case, answer("other"), answer("same")) == 0.0
    assert score("exact_match", case, answer("same"), None) == 0.0  # no reference: no match


def test_tool_call_names_must_be_the_expected_calls_in_order() -> None:
    case = EvalCase(
        [{"role": "user", "content": "q"}],
        expected_tool_calls=({"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}),
    )
    both = (call("a", "{}"), call("b", "{}"))
    assert score("tool_call_names", case, answer(calls=both)) == 1.0
    assert score("tool_call_names", case, answer(calls=both[::-1])) == 0.0
    assert score("tool_call_names", case, answer(calls=both[:1])) == 0.0
    assert score("tool_call_names", case, answer("a text answer")) == 0.0


def test_tool_call_arguments_compare_as_json_not_as_text() -> None:
    case = EvalCase(
        [{"role": "user", "content": "q"}],
        expected_tool_calls=({"name": "get", "arguments": {"city": "Oslo", "days": [1, 2]}},),
    )
    reordered = call("get", '{ "days" : [1,2],\n "city":"Oslo" }')
    assert score("tool_call_arguments", case, answer(calls=(reordered,))) == 1.0
    assert score("tool_call_names", case, answer(calls=(reordered,))) == 1.0
    wrong_value = call("get", '{"city": "Bergen", "days": [1, 2]}')
    assert score("tool_call_arguments", case, answer(calls=(wrong_value,))) == 0.0
    assert score("tool_call_names", case, answer(calls=(wrong_value,))) == 1.0
    broken = call("get", '{"city": "Oslo", "days": [1, 2]')
    assert score("tool_call_arguments", case, answer(calls=(broken,))) == 0.0
    # expected arguments given as JSON text are parsed too
    as_text = EvalCase("q", expected_tool_calls=({"name": "get", "arguments": '{"a":1}'},))
    assert score("tool_call_arguments", as_text, answer(calls=(call("get", '{"a": 1}'),))) == 1


def test_tool_scorers_take_the_baselines_calls_as_reference_without_expected_calls() -> None:
    case = EvalCase([{"role": "user", "content": "q"}], tools=({"type": "function"},))
    ref = answer(calls=(call("get", '{"x": 1, "y": 2}'),))
    same = answer(calls=(call("get", '{"y":2,"x":1}'),))
    assert score("tool_call_arguments", case, same, ref) == 1.0
    assert score("tool_call_arguments", case, answer(calls=(call("get", "{}"),)), ref) == 0.0


def test_which_scorers_apply_to_a_case() -> None:
    plain = EvalCase("q")
    calls = EvalCase("q", expected_tool_calls=({"name": "a"},))
    assert BUILTIN_SCORERS["exact_match"].applies(plain)
    assert not BUILTIN_SCORERS["exact_match"].applies(calls)
    assert not BUILTIN_SCORERS["tool_call_names"].applies(plain)
    assert BUILTIN_SCORERS["tool_call_names"].applies(calls)


# -- the report ---------------------------------------------------------------------------


def run(gate: Gate, answers: dict[str, list[str]]) -> GateReport:
    """Run ``gate`` with canned texts per adapter, case by case."""

    async def generate(case: EvalCase, adapter: str) -> Completion:
        return answer(answers[adapter][int(case.id or 0)])

    return asyncio.run(gate.run(generate, candidate="cand", baseline="base"))


def cases(n: int, expected: str = "yes") -> list[EvalCase]:
    return [EvalCase(f"q{i}", expected=expected, id=str(i)) for i in range(n)]


def test_the_report_holds_means_regression_and_every_case() -> None:
    gate = Gate(cases(4), threshold=0.1)
    report = run(gate, {"cand": ["yes", "no", "yes", "no"], "base": ["yes"] * 3 + ["no"]})
    s = report.scores["exact_match"]
    assert (s.candidate, s.baseline, s.regression, s.cases) == (0.5, 0.75, 0.25, 4)
    assert not s.passed and not report.passed and report.failures == [s]
    assert "exact_match regressed by 0.2500" in report.reason
    assert [c.id for c in report.cases] == ["0", "1", "2", "3"]
    assert report.cases[1].regressions == {"exact_match": 1.0}  # 'no' where the baseline said 'yes'
    assert report.cases[3].regressions == {"exact_match": 0.0}  # both 'no'
    assert report.cases[2].candidate_scores == {"exact_match": 1.0}
    assert report.cases[2].baseline_scores == {"exact_match": 1.0}
    assert report.cases[1].candidate_text == "no"
    assert report.candidate_scores == {"exact_match": 0.5}
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["scores"]["exact_match"]["regression"] == 0.25 and data["passed"] is False
    assert "REGRESSED" in report.format()


def test_a_better_candidate_has_a_negative_regression_and_passes() -> None:
    report = run(Gate(cases(2), threshold=0.0), {"cand": ["yes", "yes"], "base": ["yes", "no"]})
    assert report.scores["exact_match"].regression == -0.5 and report.passed


def test_the_default_threshold_is_half_a_percent() -> None:
    one_in_200 = ["no"] + ["yes"] * 199
    report = run(Gate(cases(200)), {"cand": one_in_200, "base": ["yes"] * 200})
    assert report.threshold == 0.005
    assert report.scores["exact_match"].regression == pytest.approx(0.005)
    assert report.passed  # exactly at the threshold passes
    one_in_100 = ["no"] + ["yes"] * 99
    report = run(Gate(cases(100)), {"cand": one_in_100, "base": ["yes"] * 100})
    assert report.scores["exact_match"].regression == pytest.approx(0.01)
    assert not report.passed


def test_each_scorer_is_judged_on_its_own() -> None:
    def short(case: EvalCase, c: Completion) -> bool:
        return len(c.text) <= 3

    gate = Gate(cases(2), scorers=["exact_match", short, UserScorer("len", lambda _, c: 0.5)])
    report = run(gate, {"cand": ["yes", "yes"], "base": ["yes", "nope"]})
    assert set(report.scores) == {"exact_match", "len"} | {short.__qualname__}
    assert report.scores["exact_match"].passed
    assert report.scores[short.__qualname__].regression == -0.5
    assert report.scores["len"].candidate == 0.5 and report.scores["len"].regression == 0.0


def test_a_user_scorer_must_return_a_finite_number() -> None:
    gate = Gate(cases(1), scorers=[UserScorer("bad", lambda _, c: float("nan"))])
    with pytest.raises(InvalidRequest, match="bad"):
        run(gate, {"cand": ["yes"], "base": ["yes"]})


def test_a_request_that_fails_scores_zero_and_the_report_says_why() -> None:
    async def generate(case: EvalCase, adapter: str) -> Completion:
        if adapter == "cand" and case.id == "1":
            raise BackendError("engine gone")
        return answer("yes")

    report = asyncio.run(Gate(cases(2)).run(generate, candidate="cand", baseline="base"))
    assert report.cases[1].candidate_error == "BackendError: engine gone"
    assert report.cases[1].candidate_scores == {"exact_match": 0.0}
    assert report.scores["exact_match"].regression == 0.5 and not report.passed


def test_versions_that_both_fail_do_not_pass() -> None:
    """Two failures score 0 against 0, a regression of 0: the gate must still refuse (a
    refused cold start, an engine down), saying which requests failed."""

    async def generate(case: EvalCase, adapter: str) -> Completion:
        raise BackendError(f"{adapter} did not answer (served by base)")

    report = asyncio.run(Gate(cases(2)).run(generate, candidate="cand", baseline="base"))
    assert report.scores["exact_match"].regression == 0.0
    assert report.scores["exact_match"].passed  # the scorer alone would pass it
    assert not report.passed and len(report.unanswered) == 2
    assert "2 case(s) not answered by both versions" in report.reason
    assert "did not answer" in report.reason


def test_an_error_that_is_not_lorapools_propagates_and_stops_the_other_requests() -> None:
    cancelled: list[str] = []

    async def generate(case: EvalCase, adapter: str) -> Completion:
        if case.id == "0":
            raise KeyError("a bug")
        try:
            await asyncio.Event().wait()  # never answers by itself
        except asyncio.CancelledError:
            cancelled.append(f"{case.id}:{adapter}")
            raise
        raise AssertionError("unreachable")

    async def main() -> None:
        with pytest.raises(KeyError):
            await asyncio.wait_for(  # a hang guard
                Gate(cases(3)).run(generate, candidate="c", baseline="b"), timeout=30
            )
        assert asyncio.all_tasks() == {asyncio.current_task()}  # nothing left running

    asyncio.run(main())
    assert {"1:b", "1:c", "2:b", "2:c"} <= set(cancelled)


def test_default_scorers_add_the_tool_scorers_when_cases_carry_tools() -> None:
    assert Gate(cases(1)).scorers == ("exact_match",)
    with_tools = Gate([EvalCase("q", expected_tool_calls=({"name": "a"},))])
    assert with_tools.scorers == ("exact_match", "tool_call_names", "tool_call_arguments")


# -- running ------------------------------------------------------------------------------


def test_a_run_interleaves_candidate_and_baseline_and_runs_them_concurrently() -> None:
    started: list[tuple[str, str]] = []
    release = asyncio.Event()

    async def generate(case: EvalCase, adapter: str) -> Completion:
        started.append((str(case.id), adapter))
        if len(started) == 6:
            release.set()  # all six were in flight at once
        await release.wait()
        return answer("yes")

    progress: list[tuple[int, int]] = []
    gate = Gate(cases(3), concurrency=16)
    report = asyncio.run(
        asyncio.wait_for(
            gate.run(
                generate,
                candidate="cand",
                baseline="base",
                on_progress=lambda d, t: progress.append((d, t)),
            ),
            timeout=30,  # a hang guard
        )
    )
    assert started == [(str(i), a) for i in range(3) for a in ("cand", "base")]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert report.passed and report.candidate == "cand" and report.baseline == "base"


def test_concurrency_bounds_the_requests_in_flight() -> None:
    inflight = peak = 0

    async def generate(case: EvalCase, adapter: str) -> Completion:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0)
        inflight -= 1
        return answer("yes")

    asyncio.run(Gate(cases(10), concurrency=3).run(generate, candidate="c", baseline="b"))
    assert peak == 3


# -- identity and construction ------------------------------------------------------------------


def test_the_identity_names_the_gate_and_digests_its_cases_and_settings() -> None:
    gate = Gate(cases(2), name="support-evals")
    assert gate.identity.startswith("support-evals@") and len(gate.identity.split("@")[1]) == 16
    assert Gate(cases(2), name="support-evals").identity == gate.identity
    assert Gate(cases(3), name="support-evals").identity != gate.identity
    assert Gate(cases(2), name="support-evals", threshold=0.01).identity != gate.identity
    assert Gate(cases(2, expected="no"), name="support-evals").identity != gate.identity
    assert Gate(cases(2), name="other").identity.split("@")[1] == gate.identity.split("@")[1]
    assert run(gate, {"cand": ["yes"] * 2, "base": ["yes"] * 2}).identity == gate.identity


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cases": []}, "at least one case"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"scorers": ["bleu"]}, "unknown scorers"),
        ({"scorers": []}, "distinct names"),
        ({"scorers": ["exact_match", "exact_match"]}, "distinct names"),
        ({"concurrency": 0}, "concurrency"),
        ({"name": ""}, "name"),
    ],
)
def test_a_gate_that_cannot_judge_is_refused(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"cases": cases(1), **kwargs}
    with pytest.raises(InvalidRequest, match=match):
        Gate(args.pop("cases"), **args)


def test_a_gate_whose_scorers_apply_to_no_case_cannot_report() -> None:
    gate = Gate(cases(1), scorers=["tool_call_names"])
    with pytest.raises(InvalidRequest, match="no scorer applies"):
        run(gate, {"cand": ["yes"], "base": ["yes"]})


# -- cases from files ----------------------------------------------------------------------------


def test_cases_load_from_json_lines_and_json(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Say hi", "expected": "hi", "id": "greet"},
        {
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [{"type": "function", "function": {"name": "get"}}],
            "expected_tool_calls": [{"name": "get", "arguments": {"city": "Oslo"}}],
            "params": {"max_tokens": 16},
        },
    ]
    jsonl = tmp_path / "cases.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    listed = tmp_path / "cases.json"
    listed.write_text(json.dumps(rows))
    wrapped = tmp_path / "gate.json"
    wrapped.write_text(json.dumps({"cases": rows}))
    for path in (jsonl, listed, wrapped):
        loaded = load_cases(path)
        assert [c.id for c in loaded] == ["greet", None]
        assert loaded[0].prompt == "Say hi" and loaded[0].params == GREEDY
        assert loaded[1].prompt[0]["content"] == "Weather in Oslo?"
        assert loaded[1].params.temperature == 0.0 and loaded[1].params.max_tokens == 16
        assert loaded[1].expected_tool_calls == ({"name": "get", "arguments": {"city": "Oslo"}},)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "a", "messages": []}, "exactly one"),
        ({"expected": "a"}, "exactly one"),
        ({"prompt": "a", "answer": "b"}, "unknown fields"),
        ({"prompt": 3}, "string"),
        ({"prompt": "a", "params": {"temperature": -1}}, "bad params"),
    ],
)
def test_a_bad_case_is_refused_naming_the_problem(row: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        EvalCase.from_dict(row)


def test_a_file_that_is_not_cases_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "a"}\n{"oops"')
    with pytest.raises(InvalidRequest, match="neither JSON"):
        load_cases(bad)
    bad.write_text('{"name": "x"}')
    with pytest.raises(InvalidRequest, match="list of case objects"):
        load_cases(bad)
