"""The pick: which queued request is dispatched next, as a composition of rule parts.

A pick goes in three stages, each a list of parts (the parts are in
:mod:`lorapool.scheduler.rules`):

1. *shortcuts* (:class:`Shortcut`) may choose a request outright, ahead of the counters
   (a hand-off's beneficiary, the starvation bound); the first that does wins;
2. the counters: tenants with queued requests in counter order, lowest first, each
   offering its head request (so a tenant's own requests stay in order). A tenant holding
   places may be kept out by a *place rule* (:class:`PlaceRule`: the headroom, pacing)
   unless an *exemption* (:class:`Exemption`: a light tenant) lets it in; a head request
   may be kept out by a *ticket filter* (:class:`TicketFilter`: an adapter giving its slot
   up) or because its adapter cannot get a device slot now (the store's bound, never
   lifted: no head-of-line blocking, the next tenant goes);
3. adapter affinity: among the tenants within ``affinity_slack`` of the lowest counter, a
   head request whose adapter is already on the device goes first; at most
   :data:`AFFINITY_SCAN` tenants past the first dispatchable one are looked at (none with
   no slack), so a pick stays O(log n) in the tenants with queued requests.

Adding a rule is adding a part to one of these lists (see ``FairScheduler``), not an edit of
the loop.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from lorapool.scheduler.base import DispatchCheck, ResidencyCheck, Ticket
from lorapool.scheduler.places import Holders, Places
from lorapool.scheduler.vtc import CounterQueue, Entry, TenantState

__all__ = [
    "AFFINITY_SCAN",
    "SCAN_LIMIT",
    "Candidate",
    "Exemption",
    "Pick",
    "PlaceRule",
    "Picker",
    "Shortcut",
    "TicketFilter",
]

SCAN_LIMIT = 64
"""Tenants inspected per pick when heads cannot get a slot."""
AFFINITY_SCAN = 8
"""Tenants inspected per pick past the first dispatchable one, looking for a resident
adapter."""

Candidate = tuple[TenantState, Ticket]
"""A tenant and the queued request of it to dispatch."""


class Pick:
    """What one pick knows: the time, the places taken, facts found on first need (the two
    largest holders of places), and the earliest time a rule asked to look again.

    ``serial`` changes with every pick, for parts that keep a fact of their own per pick.
    """

    __slots__ = (
        "_adapters",
        "_can_dispatch",
        "_filters",
        "_holders",
        "_places",
        "inflight",
        "now",
        "serial",
        "wake",
    )

    def __init__(self, places: Places) -> None:
        self.serial = 0
        self.now = 0.0
        self.inflight = 0
        self.wake: float | None = None
        self._places = places
        self._holders: Holders | None = None
        self._filters: list[TicketFilter] = []
        self._can_dispatch: DispatchCheck = lambda adapter, inflight: True
        self._adapters: Mapping[str, int] = {}

    def bind(self, can_dispatch: DispatchCheck, adapters: Mapping[str, int]) -> None:
        """Take the store's slot check and the requests in flight per adapter (a live
        mapping)."""
        self._can_dispatch = can_dispatch
        self._adapters = adapters

    def holders(self) -> Holders:
        """The two tenants holding the most places per weight (found once per pick)."""
        if self._holders is None:
            self._holders = self._places.holders()
        return self._holders

    def over(self, tenant: TenantState) -> bool:
        """Whether the tenant is over its share of the places
        (:meth:`~lorapool.scheduler.places.Places.over_share`)."""
        return self._places.over_share(tenant, self.holders())

    def slot_free(self, ticket: Ticket) -> bool:
        """Whether the ticket's adapter can get a device slot now."""
        return self._can_dispatch(ticket.adapter_id, self._adapters)

    def dispatchable(self, ticket: Ticket) -> bool:
        """Whether no ticket filter keeps the ticket out and its adapter can get a slot."""
        for f in self._filters:
            if f.keeps_out(self, ticket):
                return False
        return self._can_dispatch(ticket.adapter_id, self._adapters)

    def wake_at(self, when: float) -> None:
        """Ask to pick again at ``when`` if nothing is dispatched now (the earliest asked
        for wins)."""
        if self.wake is None or when < self.wake:
            self.wake = when


class Shortcut(Protocol):
    """A rule that may choose a request ahead of the counters."""

    def choose(self, pick: Pick) -> Candidate | None:
        """The request to dispatch now, or ``None`` to leave the pick to the next part."""
        ...


class PlaceRule(Protocol):
    """A rule that may keep a tenant holding places out of a pick.

    A tenant holding none is never kept out by a place rule (it is never over its share),
    so rules are asked only about tenants with requests in flight. A rule may keep what
    :meth:`begin` found for the rest of the pick (picks do not overlap).
    """

    def begin(self, pick: Pick) -> bool:
        """Whether the rule applies in this pick at all."""
        ...

    def keeps_out(self, pick: Pick, tenant: TenantState) -> bool:
        """Whether the tenant is kept out of this pick."""
        ...

    def kept_out(self, pick: Pick) -> None:
        """The rule kept a tenant out and no exemption let it in."""
        ...


class Exemption(Protocol):
    """A rule that lets a tenant in whatever the place rules say."""

    def exempts(self, pick: Pick, tenant: TenantState) -> bool:
        """Whether the tenant goes as if no place rule applied to it."""
        ...


class TicketFilter(Protocol):
    """A rule that keeps a request out of a pick (shortcuts' choices included); like a
    place rule it may keep what :meth:`begin` found for the rest of the pick."""

    def begin(self, pick: Pick) -> bool:
        """Whether the filter applies in this pick at all."""
        ...

    def keeps_out(self, pick: Pick, ticket: Ticket) -> bool:
        """Whether the ticket may not go now."""
        ...


class Picker:
    """The pick, composed of the rule parts given (see the module).

    ``affinity_picks`` counts the picks where affinity chose another tenant than the
    counters would have.
    """

    def __init__(
        self,
        counters: CounterQueue,
        places: Places,
        clock: Callable[[], float],
        *,
        affinity_slack: float,
        shortcuts: Sequence[Shortcut] = (),
        place_rules: Sequence[PlaceRule] = (),
        exemptions: Sequence[Exemption] = (),
        filters: Sequence[TicketFilter] = (),
    ) -> None:
        self._counters = counters
        self._clock = clock
        self.affinity_slack = affinity_slack
        self._shortcuts = tuple(shortcuts)
        self._place_rules = tuple(place_rules)
        self._exemptions = tuple(exemptions)
        self._filters = tuple(filters)
        self._pick = Pick(places)
        self._on_device: ResidencyCheck = lambda adapter: True
        self.affinity_picks = 0

    def bind(
        self, can_dispatch: DispatchCheck, on_device: ResidencyCheck, adapters: Mapping[str, int]
    ) -> None:
        """Take the store's slot and residency checks and the requests in flight per
        adapter (a live mapping)."""
        self._pick.bind(can_dispatch, adapters)
        self._on_device = on_device

    @property
    def wake(self) -> float | None:
        """When the last pick, which chose nothing, asked to pick again."""
        return self._pick.wake

    def pick(self, inflight: int) -> Candidate | None:
        """The tenant and request to dispatch next, or ``None``."""
        p = self._pick
        p.serial += 1
        p.now = self._clock()
        p.inflight = inflight
        p.wake = None
        p._holders = None
        filters = [f for f in self._filters if f.begin(p)]
        p._filters = filters
        for shortcut in self._shortcuts:
            chosen = shortcut.choose(p)
            if chosen is not None:
                return chosen
        rules: list[PlaceRule] | None = None  # begun on first need: most tenants hold no place
        can_dispatch = p._can_dispatch
        adapters = p._adapters
        on_device = self._on_device
        slack = self.affinity_slack
        heap = self._counters.heap
        heappop = heapq.heappop
        popped: list[Entry] = []
        first: Candidate | None = None
        found: Candidate | None = None
        lowest: float | None = None
        looked_before = 0
        try:
            while heap and len(popped) < SCAN_LIMIT:
                entry = heappop(heap)
                counter, _, _, version, tenant = entry
                if version != tenant.version or not tenant.queue:
                    continue  # stale
                popped.append(entry)
                if lowest is None:
                    lowest = counter
                within = counter <= lowest + slack
                if first is not None and (
                    not within or slack <= 0 or len(popped) > looked_before + AFFINITY_SCAN
                ):
                    break
                if tenant.flight:
                    if rules is None:
                        rules = [r for r in self._place_rules if r.begin(p)]
                    if rules and self._kept_out(p, rules, tenant):
                        continue
                head = tenant.queue[0]
                if filters and not _passes(p, filters, head):
                    continue
                if not can_dispatch(head.adapter_id, adapters):
                    continue
                if first is None:
                    first = (tenant, head)
                    looked_before = len(popped)
                if within and (head.adapter_id is None or on_device(head.adapter_id)):
                    found = (tenant, head)
                    break
        finally:
            for entry in popped:
                heapq.heappush(heap, entry)
        if found is not None and first is not None and found[0] is not first[0]:
            self.affinity_picks += 1
        return found or first

    def _kept_out(self, p: Pick, rules: list[PlaceRule], tenant: TenantState) -> bool:
        """Whether a place rule keeps the tenant out (the first that would, unless an
        exemption lets the tenant in)."""
        for rule in rules:
            if rule.keeps_out(p, tenant):
                for exemption in self._exemptions:
                    if exemption.exempts(p, tenant):
                        return False
                rule.kept_out(p)
                return True
        return False


def _passes(p: Pick, filters: list[TicketFilter], ticket: Ticket) -> bool:
    return all(not f.keeps_out(p, ticket) for f in filters)
