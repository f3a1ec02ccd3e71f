"""The engine's places and recent service (lorapool.scheduler.places)."""

from __future__ import annotations

import math

import pytest

from lorapool.scheduler import PlacesConfig
from lorapool.scheduler.places import Places, RecentService
from lorapool.testing import ManualClock

from .test_scheduler_pick import places, request, tenant


@pytest.mark.parametrize(
    ("headroom", "max_inflight", "bound", "overcommit"),
    [(None, 16, 2, 2), (None, 8, 1, 1), (None, 3, 0, 1), (5, 4, 3, 3), (0, 16, 0, 1)],
)
def test_the_headroom_is_sized_from_the_places(
    headroom: int | None, max_inflight: int, bound: int, overcommit: int
) -> None:
    p = Places(PlacesConfig(headroom=headroom))
    p.bind(max_inflight)
    assert (p.headroom, p.overcommit) == (bound, overcommit)


def test_the_two_largest_holders_per_weight() -> None:
    a, b, c = tenant("a", flight=2), tenant("b", flight=3, weight=2.0), tenant("c", flight=1)
    assert places(a, b, c).holders() == (a, b)  # 2 > 1.5 > 1
    assert places().holders() == (None, None)


def test_over_its_share_means_at_its_share_and_ahead_of_everyone_else() -> None:
    # 8 places, two tenants present: a share is 4.
    a, b = tenant("a", flight=4), tenant("b", flight=3)
    p = places(a, b)
    assert p.over_share(a) and not p.over_share(b)
    # At its share but another holds more: a burst above the equal share may go on.
    a, b = tenant("a", flight=5), tenant("b", flight=6)
    assert not places(a, b, max_inflight=10).over_share(a)
    # A heavier weight has a larger share.
    a, b = tenant("a", flight=4, weight=3.0), tenant("b", flight=2)
    assert not places(a, b).over_share(a) and places(a, b).over_share(b)


def test_presence_counts_tenants_with_anything_queued_or_in_flight() -> None:
    a, b = tenant("a", weight=2.0), tenant("b")
    p = places(a, b)
    assert (p.present, p.present_weight) == (2, 3.0)
    p.leave(a)
    assert (p.present, p.present_weight) == (1, 1.0)
    p.leave(b)
    assert (p.present, p.present_weight) == (0, 0.0)


def test_a_place_given_back_feeds_the_measured_request_time() -> None:
    a = tenant("a")
    p = places(a)
    first, second = request("a"), request("a")
    p.take(a, first, 0.0)
    p.take(a, second, 0.0)
    assert p.flying == {"a": a} and a.inflight == 2
    p.give_back(a, first, 1.0)
    assert p.service_time == 1.0 and p.flying == {"a": a}
    p.give_back(a, second, 3.0)
    assert p.service_time == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    assert p.flying == {} and p.present == 0  # nothing queued either: a left
    assert p.pace() == pytest.approx(p.service_time / 8)
    assert p.retry_hint(queued=15) == pytest.approx(16 / 8 * p.service_time)


def test_the_pace_given_wins_and_the_retry_hint_has_a_floor() -> None:
    p = places(pace=0.25)
    p.service_time = 10.0
    assert p.pace() == 0.25
    assert places().retry_hint(queued=0) == 1 / 8  # nothing measured: 1 s a request
    fast = places()
    fast.service_time = 0.001
    assert fast.retry_hint(queued=0) == 0.1


def test_recent_service_adds_up_and_decays_over_the_window() -> None:
    clock = ManualClock()
    service = RecentService(10.0, 1.25, clock)
    a = tenant("a")
    service.use(a, 100.0)
    service.use(a, 100.0)
    assert a.heat == pytest.approx(math.log(200.0))
    b = tenant("b")
    clock.advance(10.0)
    service.use(b, 200.0 / math.e)  # a's 200, one window later, is worth 200 / e
    assert b.heat == pytest.approx(a.heat)
    assert not service.light(b, a) and not service.light(a, b)


def test_light_means_at_most_one_ratio_below_the_heaviest() -> None:
    service = RecentService(10.0, 2.0, ManualClock())
    heavy, half, more = tenant("heavy", flight=1), tenant("half", flight=1), tenant("more")
    service.use(heavy, 100.0)
    service.use(half, 49.0)
    service.use(more, 51.0)
    assert service.heaviest({"heavy": heavy, "half": half}) is heavy
    assert service.light(half, heavy) and not service.light(more, heavy)
    assert not service.light(heavy, heavy) and not service.light(half, None)
    assert service.heaviest({}) is None
    assert RecentService(0.0, 2.0, ManualClock()).heaviest({"heavy": heavy}) is None
