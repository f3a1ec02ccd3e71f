"""The virtual token counters and the queue they order (lorapool.scheduler.vtc)."""

from __future__ import annotations

import pytest

from lorapool.scheduler import FairnessConfig
from lorapool.scheduler.vtc import CounterQueue, valid

from .test_scheduler_pick import fly, queue, request, tenant


def test_costs_are_weighted_token_counts() -> None:
    q = CounterQueue(FairnessConfig(input_cost=1.0, output_cost=2.0))
    heavy = tenant("heavy", weight=2.0)
    assert q.charge(heavy, 10, 20) == pytest.approx((10 + 40) / 2)
    assert heavy.counter == pytest.approx(25.0)
    assert q.charge(heavy, 0, 0) == 0 and heavy.counter == pytest.approx(25.0)


def test_a_tenant_back_from_idle_is_lifted_to_the_lowest_queued_counter() -> None:
    busy, back = tenant("busy"), tenant("back")
    q = queue((busy, request("busy")))
    busy.counter = 500.0
    q.push(busy)
    q.enqueue(back, request("back"))
    assert back.counter == 500.0  # an hour of idling banks nothing
    back.counter = 800.0
    q.enqueue(back, request("back"))  # its queue was not empty: no lift
    assert back.counter == 800.0


def test_with_nobody_queued_a_tenant_restarts_at_the_last_dispatch() -> None:
    a, b = tenant("a"), tenant("b")
    first = request("a")
    q = queue((a, first))
    a.counter = 300.0
    q.dispatched(a, first)
    assert q.floor == 300.0 and q.queued == 0 and q.min_active() is None
    q.enqueue(b, request("b"))
    assert b.counter == 300.0


def test_a_tenant_with_requests_running_keeps_up_to_the_credit() -> None:
    busy, light = tenant("busy"), tenant("light")
    q = queue((busy, request("busy")))
    busy.counter = 2000.0
    q.push(busy)
    fly(light)
    q.enqueue(light, request("light"))
    assert light.counter == 2000.0 - 512.0  # the default credit
    plain = CounterQueue(FairnessConfig(credit=0))
    busy2, light2 = tenant("busy"), tenant("light")
    plain.enqueue(busy2, request("busy"))
    busy2.counter = 2000.0
    plain.push(busy2)
    fly(light2)
    plain.enqueue(light2, request("light"))
    assert light2.counter == 2000.0


def test_a_dispatch_charges_the_prompt_and_moves_the_tenant_in_the_order() -> None:
    a, b = tenant("a"), tenant("b")
    first, second = request("a", prompt_tokens=100), request("a")
    q = queue((a, first), (a, second), (b, request("b")))
    assert min(e for e in q.heap if valid(e))[-1] is a  # equal counters: arrival order
    assert q.dispatched(a, first) == 100.0 and a.counter == 100.0
    assert not first.queued and q.queued == 2 and q.by_tier["default"] == 2
    assert q.min_active() == 0.0  # b, now the lowest
    assert [e[-1].name for e in sorted(q.heap) if valid(e)] == ["b", "a"]


def test_ties_go_to_the_tenant_with_fewer_requests_in_flight() -> None:
    busy, back = tenant("busy"), tenant("back")
    fly(busy)
    q = queue((busy, request("busy")), (back, request("back")))
    assert busy.counter == back.counter
    assert min(e for e in q.heap if valid(e))[-1] is back


def test_removed_tickets_leave_the_arrival_order_and_stale_entries_are_skipped() -> None:
    a, b = tenant("a"), tenant("b")
    ta, tb = request("a"), request("b")
    q = queue((a, ta), (b, tb))
    assert q.oldest() is ta
    q.remove(a, ta)
    assert q.oldest() is tb and q.active == 1 and not any(valid(e) for e in q.heap if e[-1] is a)
    q.remove(b, tb)
    assert q.oldest() is None and q.min_active() is None and q.heap == []
