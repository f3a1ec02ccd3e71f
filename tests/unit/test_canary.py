"""The canary watch (lorapool.lifecycle.canary): the sliding window, each threshold and its
minimum samples, feedback, promotion after a clean window, and the watch's bookkeeping;
then AdapterPool's promote / feedback / automatic rollback over MockBackend (a unit test
of the wiring: the real model's run is tests/integration/test_promotion.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorapool.errors import BackendError, InvalidRequest
from lorapool.lifecycle import Canary, CanaryPolicy, CanaryWatch, Verdict
from lorapool.lifecycle.canary import p99
from lorapool.testing.clock import ManualClock

STABLE, CAND = "acme/bot@v1", "acme/bot@v2"


def canary(clock: ManualClock | None = None, **policy: object) -> Canary:
    return Canary(
        "acme/bot",
        tenant="acme",
        stable=STABLE,
        candidate=CAND,
        policy=CanaryPolicy(**policy),  # type: ignore[arg-type]
        started_at=0.0 if clock is None else clock(),
    )


def feed(c: Canary, version: str, n: int, *, failed: bool = False, ttft: float = 0.1) -> None:
    for _ in range(n):
        c.record(version, failed=failed, ttft=None if failed else ttft, now=0.0)


def test_p99_is_the_nearest_rank() -> None:
    assert p99([0.5]) == 0.5
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([float(i) for i in range(1, 11)]) == 10.0


# -- errors -------------------------------------------------------------------------------


def test_errors_are_judged_only_after_min_samples() -> None:
    c = canary(min_samples=10, max_ttft_p99_ratio=None)
    feed(c, STABLE, 20)
    feed(c, CAND, 9, failed=True)
    assert c.judge(0.0) is None  # 9 failures, but fewer than 10 samples
    feed(c, CAND, 1, failed=True)
    verdict = c.judge(0.0)
    assert verdict is not None and verdict.action == "rollback"
    assert "error rate 1.000" in verdict.reason and "0.000" in verdict.reason
    assert verdict.numbers["candidate_error_rate"] == 1.0
    assert verdict.numbers["stable_error_rate"] == 0.0
    assert verdict.numbers["candidate_samples"] == 10 and verdict.numbers["stable_samples"] == 20


def test_the_stable_versions_own_errors_are_allowed_for() -> None:
    c = canary(window=10, min_samples=10, max_error_rate_increase=0.05, max_ttft_p99_ratio=None)
    feed(c, STABLE, 8)
    feed(c, STABLE, 2, failed=True)  # 20% errors
    feed(c, CAND, 8)
    feed(c, CAND, 2, failed=True)  # 20% too: not worse
    assert c.judge(0.0) is None
    feed(c, CAND, 1, failed=True)  # the oldest success slid out: 3 of 10 failed now
    verdict = c.judge(0.0)
    assert verdict is not None and "error rate 0.300" in verdict.reason


def test_without_enough_stable_samples_its_error_rate_counts_as_zero() -> None:
    c = canary(min_samples=5, max_error_rate_increase=0.1, max_ttft_p99_ratio=None)
    feed(c, STABLE, 2, failed=True)  # too few to count
    feed(c, CAND, 4)
    feed(c, CAND, 1, failed=True)  # 20% > 0% + 0.1
    verdict = c.judge(0.0)
    assert verdict is not None and verdict.numbers["stable_error_rate"] == 1.0
    assert "against the stable version's 0.000" in verdict.reason


# -- latency ------------------------------------------------------------------------------


def test_ttft_p99_past_the_ratio_rolls_back() -> None:
    c = canary(min_samples=10, max_ttft_p99_ratio=2.0)
    feed(c, STABLE, 10, ttft=0.1)
    feed(c, CAND, 10, ttft=0.19)
    assert c.judge(0.0) is None
    feed(c, CAND, 1, ttft=0.5)  # the candidate's p99 is now 0.5 > 2 x 0.1
    verdict = c.judge(0.0)
    assert verdict is not None and "TTFT p99 0.500" in verdict.reason
    assert verdict.numbers["stable_ttft_p99_s"] == 0.1


def test_ttft_needs_both_sides_unless_an_absolute_bound_is_set() -> None:
    c = canary(min_samples=5, max_ttft_p99_ratio=2.0)
    feed(c, CAND, 5, ttft=9.0)
    assert c.judge(0.0) is None  # no stable samples to compare with
    c = canary(min_samples=5, max_ttft_p99_ratio=2.0, max_ttft_p99_s=1.0)
    feed(c, CAND, 5, ttft=9.0)
    verdict = c.judge(0.0)
    assert verdict is not None and "over 1 s" in verdict.reason


# -- quality ------------------------------------------------------------------------------------


def test_a_drop_in_mean_feedback_rolls_back_after_min_feedback() -> None:
    c = canary(min_feedback=4, max_quality_drop=0.2)
    for _ in range(4):
        c.score(STABLE, 0.9, now=0.0)
    for _ in range(3):
        c.score(CAND, 0.1, now=0.0)
    assert c.judge(0.0) is None  # three scores: not enough
    c.score(CAND, 0.1, now=0.0)
    verdict = c.judge(0.0)
    assert verdict is not None and "mean feedback 0.100" in verdict.reason
    assert verdict.numbers["candidate_quality"] == pytest.approx(0.1)
    assert verdict.numbers["stable_quality"] == pytest.approx(0.9)


def test_a_small_drop_is_tolerated_and_a_floor_can_be_set() -> None:
    c = canary(min_feedback=2, max_quality_drop=0.2)
    for v, s in ((STABLE, 0.9), (STABLE, 0.9), (CAND, 0.8), (CAND, 0.8)):
        c.score(v, s, now=0.0)
    assert c.judge(0.0) is None
    c = canary(min_feedback=2, max_quality_drop=None, min_quality=0.85)
    c.score(CAND, 0.8, now=0.0)
    c.score(CAND, 0.8, now=0.0)
    verdict = c.judge(0.0)
    assert verdict is not None and "below 0.85" in verdict.reason


# -- the window -----------------------------------------------------------------------------------


def test_the_window_keeps_the_last_requests_only() -> None:
    c = canary(window=10, min_samples=10, max_ttft_p99_ratio=None)
    feed(c, CAND, 10, failed=True)
    feed(c, CAND, 10)  # the failures slid out
    assert c.judge(0.0) is None
    assert c.numbers(0.0)["candidate_samples"] == 10
    assert c.numbers(0.0)["candidate_error_rate"] == 0.0


def test_the_window_ages_requests_out_with_window_seconds() -> None:
    clock = ManualClock()
    c = canary(clock, window_seconds=60.0, min_samples=5, max_ttft_p99_ratio=None)
    for _ in range(4):
        c.record(CAND, failed=True, ttft=None, now=clock())
    clock.advance(61)
    c.record(CAND, failed=True, ttft=None, now=clock())
    assert c.judge(clock()) is None  # the first four aged out: one sample
    assert c.numbers(clock())["candidate_samples"] == 1
    for _ in range(4):
        clock.advance(1)
        c.record(CAND, failed=True, ttft=None, now=clock())
    verdict = c.judge(clock())
    assert verdict is not None and verdict.action == "rollback"


def test_a_clean_window_promotes_when_asked() -> None:
    c = canary(min_samples=5, promote_after=20, max_ttft_p99_ratio=None)
    feed(c, STABLE, 20)
    feed(c, CAND, 19)
    assert c.judge(0.0) is None
    feed(c, CAND, 1)
    verdict = c.judge(0.0)
    assert verdict is not None and verdict.action == "promote"
    assert canary(min_samples=5).policy.promote_after is None  # off by default


@pytest.mark.parametrize(
    "policy",
    [
        {"window": 0},
        {"min_samples": 0},
        {"window": 10, "min_samples": 11},
        {"max_error_rate_increase": -0.1},
        {"window_seconds": float("inf")},
        {"promote_after": 0},
    ],
)
def test_a_policy_that_cannot_judge_is_refused(policy: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        CanaryPolicy(**policy)  # type: ignore[arg-type]


# -- the watch ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    request_id: str
    tenant: str
    adapter: str | None
    outcome: str
    ttft: float | None = 0.1


_ids = itertools.count()


def records(adapter: str, n: int, outcome: str = "finished", tenant: str = "acme") -> list[Record]:
    return [Record(f"r{next(_ids)}", tenant, adapter, outcome) for _ in range(n)]


class Owner:
    """What the pool does with a verdict, recorded; ``accept`` says whether it acted."""

    def __init__(self, accept: bool = True, fail: int = 0) -> None:
        self.accept = accept
        self.fail = fail
        self.verdicts: list[tuple[str, Verdict]] = []

    def __call__(self, c: Canary, verdict: Verdict) -> bool:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("registry unreachable")
        self.verdicts.append((c.alias, verdict))
        return self.accept


POLICY = CanaryPolicy(min_samples=5, max_ttft_p99_ratio=None, min_feedback=3)


def test_the_watch_counts_only_its_versions_and_the_versions_own_outcomes() -> None:
    owner = Owner()
    watch = CanaryWatch(owner)
    c = watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=CAND, policy=POLICY)
    for r in records("acme/other@v1", 10, "error") + records(CAND, 10, "cancelled"):
        watch.observe(r)
    for outcome in ("refused", "expired", "preempted-then-cancelled"):
        for r in records(CAND, 3, outcome):
            watch.observe(r)
    watch.observe(Record("base", "acme", None, "error"))
    assert c.numbers(0.0)["candidate_samples"] == 0 and owner.verdicts == []
    for r in records(CAND, 4, "error") + records(CAND, 1, "handed_off"):
        watch.observe(r)
    assert c.numbers(0.0)["candidate_samples"] == 5
    assert [a for a, _ in owner.verdicts] == ["acme/bot"]
    assert owner.verdicts[0][1].action == "rollback"
    assert watch.rollbacks == {"acme/bot": 1} and watch.canaries == {}
    for r in records(CAND, 10, "error"):  # no longer watched: nothing more happens
        watch.observe(r)
    assert len(owner.verdicts) == 1 and watch.rollbacks == {"acme/bot": 1}


def test_feedback_goes_to_the_version_that_served_the_request() -> None:
    owner = Owner()
    watch = CanaryWatch(owner)
    watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=CAND, policy=POLICY)
    good, bad = records(STABLE, 3), records(CAND, 3)
    for r in good + bad:
        watch.observe(r)
    assert not watch.feedback("unknown", 0.0)
    assert not watch.feedback(bad[0].request_id, 0.0, tenant="globex")  # not its request
    for r in good:
        assert watch.feedback(r.request_id, 1.0, tenant="acme")
    for r in bad[:2]:
        assert watch.feedback(r.request_id, 0.0)
    assert owner.verdicts == []
    assert watch.feedback(bad[2].request_id, 0.0)
    assert len(owner.verdicts) == 1 and "mean feedback 0.000" in owner.verdicts[0][1].reason
    assert not watch.feedback(bad[0].request_id, 0.0)  # the canary is over


def test_a_request_is_scored_once() -> None:
    """One answer scored ten times must not reach min_feedback (and roll back the owner's
    canary, or hide a regression): the second score of a request is not counted."""
    owner = Owner()
    watch = CanaryWatch(owner)
    watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=CAND, policy=POLICY)
    good, bad = records(STABLE, 3), records(CAND, 3)
    for r in good + bad:
        watch.observe(r)
    for r in good:
        assert watch.feedback(r.request_id, 1.0)
    assert watch.feedback(bad[0].request_id, 0.0)
    for _ in range(10):
        assert not watch.feedback(bad[0].request_id, 0.0)
    assert owner.verdicts == []  # one low score, not eleven


def test_a_verdict_the_owner_declines_is_not_counted() -> None:
    watch = CanaryWatch(Owner(accept=False))
    watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=CAND, policy=POLICY)
    for r in records(CAND, 5, "error"):
        watch.observe(r)
    assert watch.rollbacks == {} and watch.canaries == {}


def test_a_verdict_that_fails_keeps_the_canary_watched_and_is_tried_again() -> None:
    owner = Owner(fail=1)
    watch = CanaryWatch(owner)
    watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=CAND, policy=POLICY)
    for r in records(CAND, 5, "error"):
        watch.observe(r)
    assert owner.verdicts == [] and "acme/bot" in watch.canaries
    watch.observe(records(CAND, 1, "error")[0])
    assert len(owner.verdicts) == 1 and watch.rollbacks == {"acme/bot": 1}


def test_watching_an_alias_again_replaces_its_canary_and_stop_ends_it() -> None:
    owner = Owner()
    watch = CanaryWatch(owner)
    watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=CAND, policy=POLICY)
    v3 = "acme/bot@v3"
    watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=v3, policy=POLICY)
    for r in records(CAND, 5, "error"):
        watch.observe(r)  # v2 is no longer watched
    assert owner.verdicts == []
    assert watch.stop("acme/bot") is not None and watch.stop("acme/bot") is None
    with pytest.raises(InvalidRequest):
        watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=STABLE, policy=POLICY)


def test_the_watch_promotes_after_a_clean_window() -> None:
    owner = Owner()
    watch = CanaryWatch(owner)
    policy = CanaryPolicy(min_samples=5, max_ttft_p99_ratio=None, promote_after=8)
    watch.watch("acme/bot", tenant="acme", stable=STABLE, candidate=CAND, policy=policy)
    for r in records(CAND, 8):
        watch.observe(r)
    assert [v.action for _, v in owner.verdicts] == ["promote"]
    assert watch.promotions == {"acme/bot": 1} and watch.rollbacks == {}


# -- through the pool (MockBackend) ---------------------------------------------------------------


async def _pool(tmp_path: Path, fail_for: set[str]) -> object:
    from lorapool import AdapterPool, SamplingParams  # noqa: F401
    from lorapool.testing import MockBackend
    from lorapool.types import GenerationRequest

    from .test_store import make_adapters

    def handler(request: GenerationRequest) -> list[str]:
        if request.adapter_id in fail_for:
            raise BackendError("this version is broken")
        return ["same ", "answer"]

    pool = AdapterPool(MockBackend(handler))
    await pool.start()
    paths = make_adapters(tmp_path, 2)
    for version, path in zip(("v1", "v2"), paths.values(), strict=True):
        await pool.register("bot", str(path), tenant="acme", version=version, activate=False)
    return pool


def test_the_pool_promotes_through_a_gate_and_rolls_a_failing_canary_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from lorapool import AdapterPool, SamplingParams
    from lorapool.lifecycle import EvalCase, Gate
    from lorapool.server.metrics import MetricsConfig, ServerMetrics

    async def main() -> None:
        pool = await _pool(tmp_path, fail_for={CAND})
        assert isinstance(pool, AdapterPool)
        async with pool:
            assert pool.registry.alias("acme/bot", None).traffic == {"v1": 100.0}
            gate = Gate([EvalCase("q", params=SamplingParams(max_tokens=2))], name="g")
            # v2 fails every request: the gate refuses it
            from lorapool.errors import PromotionRefused

            with pytest.raises(PromotionRefused) as refused:
                await pool.promote("bot", "v2", tenant="acme", gate=gate)
            assert refused.value.report.scores["exact_match"].candidate == 0.0
            assert pool.registry.alias("acme/bot", None).traffic == {"v1": 100.0}
            assert len(pool.audit.entries(action="promotion_refused")) == 1
            assert pool.audit.entries(action="promote") == []
            # without the gate, as a 50% canary: its failures roll it back by themselves
            policy = CanaryPolicy(min_samples=4, max_ttft_p99_ratio=None)
            promotion = await pool.promote(
                "bot", "v2", tenant="acme", canary=50, canary_policy=policy
            )
            assert promotion.traffic == {"v1": 50.0, "v2": 50.0}
            assert promotion.baseline == STABLE and promotion.canary == 50
            assert pool.registry.alias("acme/bot", None).traffic == {"v1": 50.0, "v2": 50.0}
            served = {"ok": 0, "failed": 0}
            for i in range(40):
                if pool.registry.alias("acme/bot", None).traffic == {"v1": 100.0}:
                    break
                try:
                    await pool.complete("hi", adapter="bot", tenant="acme", request_id=f"q{i}")
                    served["ok"] += 1
                except BackendError:  # the candidate's requests fail
                    served["failed"] += 1
            assert pool.registry.alias("acme/bot", None).traffic == {"v1": 100.0}
            assert served["failed"] == 4 and served["ok"] > 0  # rolled back at min_samples
            rollback = pool.audit.entries(action="rollback")
            assert len(rollback) == 1 and rollback[0].detail["automatic"] is True
            assert rollback[0].adapter == CAND and "error rate" in rollback[0].detail["reason"]
            assert rollback[0].detail["to"] == {"v1": 100.0}
            numbers = rollback[0].detail["numbers"]
            # the ledger's records carry each request's TTFT: the stable side's, measured
            assert numbers["stable_ttft_p99_s"] > 0 and numbers["candidate_ttft_p99_s"] is None
            assert pool.canary.rollbacks == {"acme/bot": 1}
            assert any("canary acme/bot@v2 rolled back" in m for m in caplog.messages)
            metrics = ServerMetrics(pool, MetricsConfig(max_adapters=5))
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(metrics.render().decode())
                for s in f.samples
            }
            assert samples[("lorapool_canary_rollbacks_total", (("adapter", "acme/bot"),))] == 1

    with caplog.at_level(logging.WARNING, logger="lorapool.pool"):
        asyncio.run(main())


def test_a_promotion_that_passes_moves_the_alias_and_records_the_scores(tmp_path: Path) -> None:
    from lorapool import AdapterPool, SamplingParams
    from lorapool.errors import AdapterNotFound
    from lorapool.lifecycle import EvalCase, Gate

    async def main() -> None:
        pool = await _pool(tmp_path, fail_for=set())
        assert isinstance(pool, AdapterPool)
        async with pool:
            gate = Gate([EvalCase("q", params=SamplingParams(max_tokens=2))] * 3, name="g")
            with pytest.raises(AdapterNotFound):  # another tenant's alias is not found
                await pool.promote("acme/bot", "v2", tenant="globex", gate=gate)
            for bad in (0, 100, 150, float("nan")):
                with pytest.raises(InvalidRequest, match="canary"):
                    await pool.promote("bot", "v2", tenant="acme", canary=bad)
            with pytest.raises(AdapterNotFound):
                await pool.promote("bot", "v9", tenant="acme", gate=gate)
            assert pool.registry.alias("acme/bot", None).traffic == {"v1": 100.0}
            assert pool.audit.entries(action="promote") == []
            progress: list[tuple[int, int]] = []
            done = await pool.promote(
                "bot",
                "v2",
                tenant="acme",
                gate=gate,
                on_progress=lambda d, t: progress.append((d, t)),
                actor="ci",
            )
            assert progress[-1] == (3, 3)
            assert pool.registry.alias("acme/bot", None).traffic == {"v2": 100.0}
            assert done.report is not None and done.report.passed and done.canary is None
            meta = pool.registry.resolve(CAND, None).metadata
            assert meta.eval_scores == {"exact_match": 1.0}
            assert meta.baseline_version == "v1" and meta.gate == gate.identity
            assert meta.promoted_at == done.promoted_at
            entry = pool.audit.entries(action="promote")[-1]
            assert entry.adapter == CAND and entry.actor == "ci"
            assert entry.detail["gate"] == gate.identity and entry.detail["automatic"] is False
            assert entry.detail["scores"]["exact_match"]["regression"] == 0.0
            assert entry.detail["from"] == {"v1": 100.0} and entry.detail["to"] == {"v2": 100.0}
            with pytest.raises(InvalidRequest, match="already"):
                await pool.promote("bot", "v2", tenant="acme")
            # back to v1 as a canary: v2 is now the baseline, and the watch has it
            back = await pool.promote("bot", "v1", tenant="acme", gate=gate, canary=10)
            assert back.baseline == CAND and back.traffic == {"v2": 90.0, "v1": 10.0}
            watched = pool.canary.canaries["acme/bot"]
            assert (watched.stable, watched.candidate) == (CAND, STABLE)
            # Unregistered, the alias takes its watch with it: a stale watch could move an
            # alias registered again later under the same version ids.
            await pool.unregister("bot", tenant="acme")
            assert pool.canary.canaries == {}

    asyncio.run(main())


def test_the_baseline_is_the_version_with_the_most_traffic_and_the_split_is_checked() -> None:
    from lorapool.lifecycle.promotion import baseline_of, promotion_split

    assert baseline_of({"v1": 100.0}, "v2") == "v1"
    assert baseline_of({"v1": 20.0, "v3": 80.0, "v2": 5.0}, "v2") == "v3"
    assert baseline_of({"v2": 100.0}, "v2") is None
    assert promotion_split("v1", "v2", None) == {"v2": 100.0}
    assert promotion_split("v1", "v2", 10) == {"v1": 90.0, "v2": 10.0}
    with pytest.raises(InvalidRequest, match="needs a version"):
        promotion_split(None, "v2", 10)


def test_a_gate_answered_by_the_base_model_while_the_adapters_load_is_refused(
    tmp_path: Path,
) -> None:
    """Under a ``fallback`` cold start both versions' first answers come from the base
    model: identical, so they would pass any comparison. Such an answer is no answer."""
    from lorapool import AdapterPool, SamplingParams
    from lorapool.errors import PromotionRefused
    from lorapool.lifecycle import EvalCase, Gate
    from lorapool.scheduler import FairScheduler, TenantConfig, TierPolicy
    from lorapool.testing import MockBackend

    from .test_store import make_adapters

    async def main() -> None:
        tiers = TenantConfig(tiers={"only": TierPolicy(cold_start="fallback")})
        pool = AdapterPool(
            MockBackend(lambda request: ["same ", "answer"]),
            scheduler=FairScheduler(tenants=tiers),
        )
        async with pool:
            paths = make_adapters(tmp_path, 2)
            for version, path in zip(("v1", "v2"), paths.values(), strict=True):
                await pool.register(
                    "bot", str(path), tenant="acme", version=version, activate=version == "v1"
                )
            assert not pool.store.on_device("acme/bot@v1")  # both cold when the gate starts
            assert not pool.store.on_device("acme/bot@v2")
            gate = Gate([EvalCase("q", params=SamplingParams(max_tokens=2))], name="g")
            with pytest.raises(PromotionRefused) as refused:
                await pool.promote("bot", "v2", tenant="acme", gate=gate)
            assert "not answered by both versions" in refused.value.reason
            assert "served by base" in refused.value.reason
            assert pool.registry.alias("acme/bot", None).traffic == {"v1": 100.0}

    asyncio.run(main())
