"""The pick's composition (lorapool.scheduler.pick): counter order, the stages a rule part
plugs into, adapter affinity. The parts themselves: test_scheduler_rules.py.

The helpers at the top build the parts' inputs by hand; the other test_scheduler_* files
use them too."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from lorapool.scheduler import FairnessConfig, PlacesConfig, Ticket
from lorapool.scheduler.pick import AFFINITY_SCAN, Candidate, Pick, Picker
from lorapool.scheduler.places import Places
from lorapool.scheduler.vtc import CounterQueue, TenantState
from lorapool.testing import ManualClock

_ids = itertools.count()


def request(tenant: str, adapter: str | None = None, **kw: object) -> Ticket:
    """A ticket of ``tenant`` (10 prompt tokens, 20 to produce)."""
    fields: dict[str, object] = {"prompt_tokens": 10, "max_tokens": 20, **kw}
    return Ticket(f"r{next(_ids)}", tenant, adapter, **fields)  # type: ignore[arg-type]


def tenant(
    name: str, *, weight: float = 1.0, flight: int = 0, tier: str = "default"
) -> TenantState:
    """A tenant holding ``flight`` places (nothing queued)."""
    t = TenantState(name, tier, 0, weight)
    for _ in range(flight):
        fly(t)
    return t


def fly(t: TenantState, adapter: str | None = None) -> Ticket:
    """Put one more request of ``t`` in flight."""
    ticket = request(t.name, adapter)
    ticket.dispatched = True
    t.flight[ticket.request_id] = ticket
    return ticket


def places(
    *tenants: TenantState, max_inflight: int = 8, headroom: int = 0, **config: object
) -> Places:
    """Places bound to ``max_inflight``, with ``tenants`` present and those holding places
    in flight."""
    p = Places(PlacesConfig(headroom=headroom, **config))  # type: ignore[arg-type]
    p.bind(max_inflight)
    for t in tenants:
        p.arrive(t)
        if t.flight:
            p.flying[t.name] = t
    return p


def pick(p: Places, *, now: float = 0.0, inflight: int | None = None, free: bool = True) -> Pick:
    """A pick at ``now`` with ``inflight`` places taken (by default what ``p``'s tenants
    hold); every adapter can get a slot when ``free``, only the base model otherwise."""
    k = Pick(p)
    k.now = now
    k.inflight = sum(t.inflight for t in p.flying.values()) if inflight is None else inflight
    k.bind(lambda adapter, inflight: free or adapter is None, {})
    return k


def queue(*entries: tuple[TenantState, Ticket]) -> CounterQueue:
    """A counter queue (default costs) holding these tickets, queued in this order."""
    q = CounterQueue(FairnessConfig())
    for t, ticket in entries:
        q.enqueue(t, ticket)
    return q


# -- test parts ----------------------------------------------------------------------------


class Always:
    """A shortcut that chooses the candidate it was given (or nothing)."""

    def __init__(self, chosen: Candidate | None) -> None:
        self.chosen = chosen
        self.asked = 0

    def choose(self, pick: Pick) -> Candidate | None:
        self.asked += 1
        return self.chosen


class KeepOut:
    """A place rule keeping out the tenants named; records the standing verdicts."""

    def __init__(self, *names: str, applies: bool = True) -> None:
        self.names = set(names)
        self.applies = applies
        self.asked: list[str] = []
        self.stood = 0

    def begin(self, pick: Pick) -> bool:
        return self.applies

    def keeps_out(self, pick: Pick, tenant: TenantState) -> bool:
        self.asked.append(tenant.name)
        return tenant.name in self.names

    def kept_out(self, pick: Pick) -> None:
        self.stood += 1
        pick.wake_at(5.0)


class LetIn:
    """An exemption for the tenants named."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def exempts(self, pick: Pick, tenant: TenantState) -> bool:
        return tenant.name in self.names


class NoAdapter:
    """A ticket filter keeping out requests for one adapter."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter

    def begin(self, pick: Pick) -> bool:
        return True

    def keeps_out(self, pick: Pick, ticket: Ticket) -> bool:
        return ticket.adapter_id == self.adapter


def picker(
    q: CounterQueue,
    p: Places,
    *,
    slack: float = 0.0,
    resident: frozenset[str] = frozenset(),
    slots: int = 100,
    **parts: object,
) -> Picker:
    """A Picker over ``q`` with these parts; ``slots`` distinct adapters may be in flight."""
    k = Picker(q, p, ManualClock(), affinity_slack=slack, **parts)  # type: ignore[arg-type]

    def can(adapter: str | None, inflight: Mapping[str, int]) -> bool:
        return adapter is None or adapter in inflight or len(inflight) < slots

    k.bind(can, resident.__contains__, {})
    return k


def counters(*spec: tuple[str, float, str | None]) -> tuple[CounterQueue, list[TenantState]]:
    """Tenants (name, counter, head adapter) each with one queued request."""
    q = CounterQueue(FairnessConfig())
    tenants = []
    for name, counter, adapter in spec:
        t = tenant(name)
        q.enqueue(t, request(name, adapter))
        t.counter = counter
        q.push(t)
        tenants.append(t)
    return q, tenants


# -- the composition -----------------------------------------------------------------------


def test_the_lowest_counter_goes_first_and_the_heap_is_left_whole() -> None:
    q, (a, b, c) = counters(("a", 30.0, None), ("b", 10.0, None), ("c", 20.0, None))
    k = picker(q, places(a, b, c))
    chosen = k.pick(0)
    assert chosen is not None and chosen[0] is b and chosen[1] is b.queue[0]
    assert sorted(e[-1].name for e in q.heap if e[3] == e[-1].version) == ["a", "b", "c"]
    assert k.pick(0) == chosen  # a pick dispatches nothing by itself


def test_shortcuts_go_first_in_order_and_the_first_choice_wins() -> None:
    q, (a, b) = counters(("a", 0.0, None), ("b", 10.0, None))
    nothing, first, second = Always(None), Always((b, b.queue[0])), Always((a, a.queue[0]))
    k = picker(q, places(a, b), shortcuts=[nothing, first, second])
    assert k.pick(0) == (b, b.queue[0])
    assert (nothing.asked, first.asked, second.asked) == (1, 1, 0)


def test_a_place_rule_is_asked_only_about_tenants_holding_places() -> None:
    q, (a, b) = counters(("a", 0.0, None), ("b", 10.0, None))
    fly(b)
    rule = KeepOut("a", "b")
    k = picker(q, places(a, b), place_rules=[rule])
    assert k.pick(1) == (a, a.queue[0])
    assert rule.asked == []  # a holds no place: never kept out, never asked
    a.counter = 20.0
    q.push(a)
    assert k.pick(1) == (a, a.queue[0]) and rule.asked == ["b"] and rule.stood == 1


def test_an_exemption_lets_a_tenant_in_and_the_verdict_does_not_stand() -> None:
    q, (a, b) = counters(("a", 0.0, None), ("b", 10.0, None))
    fly(a)
    rule = KeepOut("a")
    k = picker(q, places(a, b), place_rules=[rule], exemptions=[LetIn("a")])
    assert k.pick(1) == (a, a.queue[0]) and rule.stood == 0


def test_a_rule_that_does_not_apply_in_a_pick_is_not_asked() -> None:
    q, (a,) = counters(("a", 0.0, None))
    fly(a)
    rule = KeepOut("a", applies=False)
    assert picker(q, places(a), place_rules=[rule]).pick(1) == (a, a.queue[0])
    assert rule.asked == []


def test_a_pick_that_finds_nothing_keeps_the_earliest_wake_up_asked_for() -> None:
    q, (a,) = counters(("a", 0.0, None))
    fly(a)
    k = picker(q, places(a), place_rules=[KeepOut("a")])
    assert k.pick(1) is None and k.wake == 5.0


def test_filters_and_slots_skip_a_head_without_blocking_the_others() -> None:
    q, (a, b, c) = counters(("a", 0.0, "x"), ("b", 10.0, "y"), ("c", 20.0, "z"))
    k = picker(q, places(a, b, c), filters=[NoAdapter("x")], slots=0)
    assert k.pick(0) is None  # x filtered; y and z find no slot
    k = picker(q, places(a, b, c), filters=[NoAdapter("x")], slots=1)
    assert k.pick(0) == (b, b.queue[0])


def test_affinity_prefers_a_resident_adapter_within_the_slack() -> None:
    q, (a, b, c) = counters(("a", 0.0, "cold"), ("b", 100.0, "warm"), ("c", 300.0, "warm2"))
    k = picker(q, places(a, b, c), slack=256.0, resident=frozenset({"warm", "warm2"}))
    assert k.pick(0) == (b, b.queue[0]) and k.affinity_picks == 1
    k = picker(q, places(a, b, c), slack=50.0, resident=frozenset({"warm", "warm2"}))
    assert k.pick(0) == (a, a.queue[0]) and k.affinity_picks == 0  # b is past the slack
    k = picker(q, places(a, b, c), slack=0.0, resident=frozenset({"warm"}))
    assert k.pick(0) == (a, a.queue[0])  # no slack: the counters alone


def test_affinity_looks_at_a_bounded_number_of_tenants() -> None:
    spec = [(f"t{i}", float(i), f"cold{i}") for i in range(AFFINITY_SCAN + 2)]
    q, ts = counters(*spec)
    far = ts[AFFINITY_SCAN + 1]
    k = picker(q, places(*ts), slack=1e9, resident=frozenset({far.queue[0].adapter_id or ""}))
    assert k.pick(0) == (ts[0], ts[0].queue[0])  # the resident one is too far down
    near = ts[AFFINITY_SCAN]
    k = picker(q, places(*ts), slack=1e9, resident=frozenset({near.queue[0].adapter_id or ""}))
    assert k.pick(0) == (near, near.queue[0])
