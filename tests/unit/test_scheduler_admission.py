"""Admission (lorapool.scheduler.admission): tiers, rate limits, queue caps, shedding."""

from __future__ import annotations

import asyncio

import pytest

from lorapool.errors import InvalidRequest, Overloaded, RateLimited
from lorapool.scheduler import AdmissionConfig, FairnessConfig, TenantConfig, Ticket, TierPolicy
from lorapool.scheduler.admission import Admission
from lorapool.scheduler.vtc import CounterQueue
from lorapool.testing import ManualClock

from .test_scheduler_pick import places, request

TIERS = {
    "gold": TierPolicy(weight=4.0),
    "std": TierPolicy(requests_per_s=2.0, request_burst=3, tokens_per_min=600, max_queue=2),
    "free": TierPolicy(),
}


def admission(
    max_queue: int = 100, clock: ManualClock | None = None
) -> tuple[Admission, CounterQueue]:
    q = CounterQueue(FairnessConfig())
    tenants = TenantConfig(
        tiers=TIERS, tenant_tiers={"g": "gold", "s": "std"}, tenant_weights={"g2": 0.5}
    )
    a = Admission(
        tenants, AdmissionConfig(max_queue=max_queue), q, places(), clock or ManualClock()
    )
    return a, q


def _never(rank: int) -> bool:
    raise AssertionError("nothing should be shed")


def test_tenants_get_their_tier_weight_and_buckets() -> None:
    a, _ = admission()
    assert (a.tier_of("g"), a.tier_of("s"), a.tier_of("anyone")) == ("gold", "std", "free")
    g, s, g2 = a.new_tenant("g"), a.new_tenant("s"), a.new_tenant("g2")
    assert (g.weight, g.rank, g.requests) == (4.0, 0, None)
    assert g2.weight == 0.5 and g2.tier == "free"
    assert s.requests is not None and s.requests.burst == 3 and s.requests.rate == 2.0
    assert s.tokens is not None and s.tokens.burst == 600 and s.tokens.rate == 10.0


def test_a_request_over_a_rate_is_refused_with_the_time_it_would_fit() -> None:
    clock = ManualClock()
    a, _ = admission(clock=clock)
    s = a.new_tenant("s")
    for _ in range(3):
        a.admit(s, request("s"), _never)
    with pytest.raises(RateLimited, match="requests rate") as err:
        a.admit(s, request("s"), _never)
    assert err.value.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    a.admit(s, request("s"), _never)
    with pytest.raises(InvalidRequest, match="token burst"):
        a.admit(s, request("s", max_tokens=1000), _never)


def test_a_tier_queue_cap_refuses_with_overloaded() -> None:
    a, q = admission()
    s = a.new_tenant("s")
    for _ in range(2):
        t = request("s")
        a.admit(s, t, _never)
        q.enqueue(s, t)
    with pytest.raises(Overloaded, match="'std' tier's queue is full") as err:
        a.admit(s, request("s"), _never)
    assert err.value.retry_after > 0


def test_past_the_queue_cap_a_lower_tier_is_shed_or_the_request_refused() -> None:
    a, q = admission(max_queue=1)
    g, f = a.new_tenant("g"), a.new_tenant("f")
    queued = request("f")
    q.enqueue(f, queued)
    asked: list[int] = []

    def shed(rank: int) -> bool:
        asked.append(rank)
        return rank == 0

    a.admit(g, request("g"), shed)  # gold sheds
    with pytest.raises(Overloaded, match="no lower tier can be shed"):
        a.admit(f, request("f"), shed)
    assert asked == [0, 2]


async def test_the_newest_waiting_request_of_the_lowest_tier_below_is_shed() -> None:
    a, q = admission()
    loop = asyncio.get_running_loop()
    tenants = {name: a.new_tenant(name) for name in ("g", "s", "f")}

    def queued(name: str) -> Ticket:
        t = request(name)
        t._ready = loop.create_future()
        q.enqueue(tenants[name], t)
        return t

    s1, f1, f2, s2 = queued("s"), queued("f"), queued("f"), queued("s")
    assert a.shed_victim(0) is f2  # the lowest tier first, its newest request
    f2._ready.set_result(None)  # type: ignore[union-attr]
    assert a.shed_victim(0) is f1  # only requests still waiting
    q.remove(tenants["f"], f1)
    assert a.shed_victim(0) is s2 and a.shed_victim(1) is None  # never its own tier
    assert a.shed_victim(2) is None and s1.queued
