"""Preemption (lorapool.scheduler.preemption): whose request pauses, how often, how far the
places are over-committed."""

from __future__ import annotations

from collections.abc import Mapping

from lorapool.scheduler import FairnessConfig
from lorapool.scheduler.places import Places, RecentService
from lorapool.scheduler.preemption import LIGHT_PAUSES, PREEMPT_TRIES, Preemption, share_victim
from lorapool.scheduler.vtc import CounterQueue, TenantState
from lorapool.testing import ManualClock

from .test_scheduler_pick import places, request, tenant


def test_the_victim_is_the_largest_holder_over_its_share_and_ahead_of_the_newcomer() -> None:
    noisy, quiet = tenant("noisy", flight=4), tenant("quiet")
    p = places(noisy, quiet, max_inflight=4)
    assert share_victim(quiet, p.holders(), p) is noisy
    assert share_victim(noisy, p.holders(), p) is None  # over its share itself


def test_no_victim_for_a_newcomer_at_its_share_nor_one_under_its_own() -> None:
    a, b = tenant("a", flight=2), tenant("b", flight=2)
    p = places(a, b, max_inflight=4)
    assert share_victim(b, p.holders(), p) is None  # b holds its share: it waits
    a, b, c = tenant("a", flight=2), tenant("b", flight=1), tenant("c")
    p = places(a, b, c, max_inflight=8)
    assert share_victim(c, p.holders(), p) is None  # a holds 2 of a share of 8/3


class Engine:
    """The backend's ``preempt``: accepts the request ids in ``accept`` (all if None)."""

    def __init__(self, accept: set[str] | None = None) -> None:
        self.accept = accept
        self.calls: list[str] = []

    def __call__(self, request_id: str) -> bool:
        self.calls.append(request_id)
        return self.accept is None or request_id in self.accept


def _full(
    noisy_flight: int = 4, *, max_inflight: int = 4, headroom: int = 0, window: float = 0.0
) -> tuple[Preemption, Engine, TenantState, TenantState, RecentService]:
    """Every place taken by noisy; quiet has one request queued."""
    noisy, quiet = tenant("noisy", flight=noisy_flight), tenant("quiet")
    p: Places = places(noisy, quiet, max_inflight=max_inflight, headroom=headroom)
    q = CounterQueue(FairnessConfig())
    q.enqueue(quiet, request("quiet"))
    service = RecentService(window, 1.25, ManualClock())
    preemption = Preemption(True, p, service, q)
    engine = Engine()
    preemption.hook = engine
    return preemption, engine, noisy, quiet, service


def _can(adapter: str | None, inflight: Mapping[str, int]) -> bool:
    return True


def test_the_newest_request_of_the_victim_pauses_once() -> None:
    preemption, engine, noisy, quiet, _ = _full()
    newest = list(noisy.flight.values())[-1]
    assert preemption.attempt(4, _can, {}) == (quiet, quiet.queue[0])
    assert engine.calls == [newest.request_id] and newest.pauses == 1
    assert preemption.count == 1
    # Asked again (say the next kick, before anything changed): the paused one is skipped.
    assert preemption.attempt(4, _can, {}) == (quiet, quiet.queue[0])
    assert engine.calls[-1] != newest.request_id and newest.pauses == 1


def test_a_refused_pause_is_offered_to_the_next_newest_a_few_times() -> None:
    preemption, engine, noisy, _, _ = _full(noisy_flight=6, max_inflight=6)
    ids = [t.request_id for t in noisy.flight.values()]
    engine.accept = {ids[0]}  # only the oldest is running, say
    assert preemption.attempt(6, _can, {}) is None
    assert engine.calls == ids[::-1][:PREEMPT_TRIES]


def test_the_share_rules_over_commit_the_places_by_at_most_the_headroom() -> None:
    preemption, *_ = _full(noisy_flight=8, max_inflight=8, headroom=2)
    assert preemption.attempt(9, _can, {}) is not None  # one over: within 2
    assert preemption.attempt(10, _can, {}) is None  # two over: not within 2
    assert preemption.attempt(7, _can, {}) is None  # a place is free: no preemption


def test_a_light_tenant_pauses_the_heaviest_beyond_the_share_rules() -> None:
    preemption, _, noisy, quiet, service = _full(noisy_flight=8, max_inflight=8, window=10)
    service.use(noisy, 100.0)
    service.use(quiet, 10.0)
    *_, second, newest = noisy.flight.values()
    # The share rules stop at one paused request (no headroom); a light tenant goes on,
    # pausing the newest request again and again (resumed in between), four times at most.
    for over in range(LIGHT_PAUSES + 1):
        assert preemption.attempt(8 + over, _can, {}) == (quiet, quiet.queue[0])
    assert (newest.pauses, second.pauses) == (LIGHT_PAUSES, 1)
    assert preemption.attempt(16, _can, {}) is None  # over by the places' number: no more


def test_nothing_without_the_hook_a_queued_request_or_a_slot() -> None:
    preemption, engine, *_ = _full()
    assert preemption.active
    preemption.enabled = False
    assert not preemption.active
    preemption.enabled, preemption.hook = True, None
    assert not preemption.active and preemption.attempt(4, _can, {}) is None
    preemption.hook = engine
    assert preemption.attempt(4, lambda adapter, inflight: False, {}) is None
    assert engine.calls == []
