"""The pick's rule parts (lorapool.scheduler.rules), each alone."""

from __future__ import annotations

from lorapool.scheduler.handoff import Handoff, Handoffs
from lorapool.scheduler.places import RecentService
from lorapool.scheduler.preemption import Preemption
from lorapool.scheduler.rules import (
    HandoffFirst,
    Headroom,
    LightTenants,
    Pacing,
    SlotGivenUp,
    StarvationBound,
)
from lorapool.scheduler.vtc import TenantState
from lorapool.testing import ManualClock

from .test_scheduler_pick import fly, pick, places, queue, request, tenant


def _noisy_and_quiet(headroom: int = 2) -> tuple[TenantState, TenantState, Headroom, Preemption]:
    """8 places, ``headroom`` kept: noisy holds 5 (over its share of 3), quiet holds 1."""
    noisy, quiet = tenant("noisy", flight=5), tenant("quiet", flight=1)
    p = places(noisy, quiet, headroom=headroom)
    preemption = Preemption(True, p, RecentService(0.0, 1.25, ManualClock()), queue())
    return noisy, quiet, Headroom(p, preemption), preemption


# -- the headroom -------------------------------------------------------------------------


def test_the_headroom_applies_once_the_places_reach_into_it() -> None:
    _, _, rule, _ = _noisy_and_quiet()
    p = rule._places
    assert not rule.begin(pick(p, inflight=5))
    assert rule.begin(pick(p, inflight=6))


def test_without_preemption_the_headroom_keeps_out_anyone_holding_places() -> None:
    noisy, quiet, rule, _ = _noisy_and_quiet()
    k = pick(rule._places)
    assert rule.begin(k)
    assert rule.keeps_out(k, noisy) and rule.keeps_out(k, quiet)


def test_with_preemption_the_headroom_also_takes_tenants_under_their_share() -> None:
    noisy, quiet, rule, preemption = _noisy_and_quiet()
    preemption.hook = lambda request_id: True
    k = pick(rule._places)
    assert rule.begin(k)
    assert rule.keeps_out(k, noisy) and not rule.keeps_out(k, quiet)
    preemption.enabled = False  # turned off: the hook is not used
    assert rule.begin(k) and rule.keeps_out(k, quiet)


# -- pacing ----------------------------------------------------------------------------------


def test_pacing_keeps_out_tenants_over_their_share_for_one_interval() -> None:
    noisy, quiet, _, _ = _noisy_and_quiet()
    p = places(noisy, quiet, headroom=2, pace=0.5)
    rule = Pacing(p)
    p.last_over = 10.0
    k = pick(p, now=10.2)
    assert rule.begin(k)
    assert rule.keeps_out(k, noisy) and not rule.keeps_out(k, quiet)
    rule.kept_out(k)
    assert k.wake == 10.5  # pick again when the interval is up
    assert not rule.begin(pick(p, now=10.5))


def test_the_pace_is_measured_unless_given_and_zero_turns_it_off() -> None:
    noisy = tenant("noisy", flight=5)
    measured = places(noisy)
    measured.last_over = 0.0
    assert not Pacing(measured).begin(pick(measured, now=0.0))  # nothing measured yet
    measured.service_time = 0.8  # 0.8 s a request over 8 places: one place frees per 0.1 s
    assert Pacing(measured).begin(pick(measured, now=0.09))
    assert not Pacing(measured).begin(pick(measured, now=0.1))
    off = places(noisy, pace=0)
    off.last_over = 0.0
    off.service_time = 0.8
    assert not Pacing(off).begin(pick(off, now=0.0))


# -- light tenants ---------------------------------------------------------------------------


def test_a_light_tenant_is_exempt_and_the_heaviest_is_not() -> None:
    clock = ManualClock()
    service = RecentService(10.0, 1.25, clock)
    heavy, mid, light = tenant("heavy", flight=2), tenant("mid", flight=1), tenant("light")
    service.use(heavy, 100.0)
    service.use(mid, 90.0)  # within 1/1.25 of heavy's
    service.use(light, 10.0)
    rule = LightTenants(service, places(heavy, mid, light))
    k = pick(rule._places)
    assert rule.exempts(k, light)
    assert not rule.exempts(k, mid) and not rule.exempts(k, heavy)


def test_the_heaviest_is_found_once_per_pick() -> None:
    service = RecentService(10.0, 1.25, ManualClock())
    a, b = tenant("a", flight=1), tenant("b", flight=1)
    service.use(a, 100.0)
    service.use(b, 10.0)
    p = places(a, b)
    rule = LightTenants(service, p)
    k = pick(p)
    k.serial = 1
    assert rule.exempts(k, b)
    service.use(b, 1000.0)  # b is the heaviest now, but this pick goes on with a
    assert rule.exempts(k, b) is False  # b is not lighter than a's 100 any more ...
    assert not rule.exempts(k, a)  # ... and a is still taken as the heaviest
    k.serial = 2
    assert rule.exempts(k, a)  # the next pick finds b


def test_no_tenant_is_light_without_a_window() -> None:
    service = RecentService(0.0, 1.25, ManualClock())
    heavy, light = tenant("heavy", flight=2), tenant("light")
    service.use(heavy, 100.0)
    rule = LightTenants(service, places(heavy, light))
    assert not rule.exempts(pick(rule._places), light)


# -- the starvation bound --------------------------------------------------------------------


def test_the_oldest_request_goes_first_once_it_waited_max_wait() -> None:
    a, b = tenant("a"), tenant("b")
    old, new = request("a", "x", arrival=0.0), request("b", arrival=4.0)
    q = queue((a, old), (b, new))
    rule = StarvationBound(q, {"a": a, "b": b}, max_wait=5.0)
    p = places(a, b)
    assert rule.choose(pick(p, now=4.9)) is None
    assert rule.choose(pick(p, now=5.0)) == (a, old) and rule.picks == 1
    assert rule.choose(pick(p, now=5.0, free=False)) is None  # x cannot get a slot
    q.remove(a, old)
    assert rule.choose(pick(p, now=9.0)) == (b, new)


# -- hand-off --------------------------------------------------------------------------------


def _handoff() -> tuple[Handoffs, Handoff, TenantState]:
    """A hand-off made: b's running request gives its slot to c's waiting one."""
    b, c = tenant("b"), tenant("c")
    victim = fly(b, "b")
    beneficiary = request("c", "c")
    queue((c, beneficiary))
    handoffs = Handoffs(0.5)
    h = Handoff(beneficiary, "b", (victim,))
    handoffs._pending.append(h)
    return handoffs, h, c


def test_a_beneficiary_takes_its_slot_first() -> None:
    handoffs, h, c = _handoff()
    rule = HandoffFirst(handoffs, {"c": c})
    p = places(c)
    assert rule.choose(pick(p, free=False)) is None  # b has not given the slot up yet
    assert rule.choose(pick(p)) == (c, h.beneficiary)
    h.beneficiary.queued = False  # dispatched: the hand-off is done
    assert rule.choose(pick(p)) is None and handoffs.pending() == []


def test_nothing_for_the_adapter_giving_its_slot_up_while_the_beneficiary_waits() -> None:
    handoffs, h, c = _handoff()
    rule = SlotGivenUp(handoffs)
    k = pick(places(c))
    assert rule.begin(k)
    assert rule.keeps_out(k, request("b", "b", resumed=True))  # its own stopped request
    assert rule.keeps_out(k, request("b2", "b"))  # or a new one
    assert not rule.keeps_out(k, request("d", "d")) and not rule.keeps_out(k, request("e"))
    h.beneficiary.queued = False
    assert not rule.begin(pick(places(c)))
