"""The engine's places (its concurrency): who holds them, each tenant's share, the headroom,
pacing, and each tenant's recent service (the light-tenant rule).

* share: the places beyond the headroom times a tenant's weight over the weights of the
  tenants present (anything queued or in flight). A tenant is *over its share* when it
  holds its share or more and, with one more place, would hold more places per weight than
  any other tenant (an approximation of max-min fairness that needs only the two largest
  holders, O(places));
* headroom: the last places of the engine's concurrency, kept for tenants with nothing in
  flight (by default one in eight);
* pacing: tenants over their share get one dispatch between them per ``pace`` seconds (by
  default the measured request time divided by the places), so a backlogged tenant's
  requests do not start and finish in waves that leave no place free;
* recent service (:class:`RecentService`): per weight, decaying over ``light_window``
  seconds; a tenant with at most 1/``light_ratio`` of the heaviest in-flight tenant's is
  *light* and goes as if under its share of places whatever it holds.

The rules that use these in a pick are in :mod:`lorapool.scheduler.rules`; preemption in
:mod:`lorapool.scheduler.preemption`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from operator import attrgetter

from lorapool.scheduler.base import Ticket
from lorapool.scheduler.config import PlacesConfig
from lorapool.scheduler.vtc import TenantState

__all__ = ["Holders", "Places", "RecentService"]

Holders = tuple[TenantState | None, TenantState | None]
"""The two tenants holding the most places per weight, the most first."""


class Places:
    """Who holds the engine's places, and each tenant's share of them."""

    def __init__(self, config: PlacesConfig) -> None:
        self.config = config
        self.max_inflight = 1
        self.headroom = 0 if config.headroom is None else config.headroom
        self.overcommit = 1  # paused requests the share rules may over-commit the places by
        self._pace = config.pace
        self.flying: dict[str, TenantState] = {}  # tenants with requests in flight
        self.present = 0  # tenants with queued or in-flight requests
        self.present_weight = 0.0  # their weights
        self.last_over = -math.inf  # when a tenant over its share of places last went
        self.service_time: float | None = None  # EWMA of dispatch-to-release seconds
        self._started: dict[int, float] = {}

    def bind(self, max_inflight: int) -> None:
        """Take the engine's concurrency; size the headroom from it."""
        self.max_inflight = max_inflight
        if self.config.headroom is None:
            self.headroom = max_inflight // 8 if max_inflight >= 4 else 0
        self.headroom = min(self.headroom, max_inflight - 1)
        self.overcommit = max(1, self.headroom)

    def arrive(self, tenant: TenantState) -> None:
        """The tenant had nothing queued or in flight, and now has."""
        self.present += 1
        self.present_weight += tenant.weight

    def leave(self, tenant: TenantState) -> None:
        """The tenant has nothing queued or in flight any more."""
        self.present -= 1
        self.present_weight = self.present_weight - tenant.weight if self.present else 0.0

    def take(self, tenant: TenantState, ticket: Ticket, now: float) -> None:
        """The ticket was dispatched: it holds a place from ``now``."""
        tenant.flight[ticket.request_id] = ticket
        self.flying[tenant.name] = tenant
        self._started[id(ticket)] = now

    def give_back(self, tenant: TenantState | None, ticket: Ticket, now: float) -> None:
        """The ticket's place is free again; its time in flight feeds the measured request
        time."""
        if tenant is not None:
            tenant.flight.pop(ticket.request_id, None)
            if not tenant.inflight:
                self.flying.pop(tenant.name, None)
                if not tenant.queue:
                    self.leave(tenant)
        started = self._started.pop(id(ticket), None)
        if started is not None:
            took = now - started
            last = self.service_time
            self.service_time = took if last is None else 0.9 * last + 0.1 * took

    def holders(self) -> Holders:
        """The two tenants holding the most places per weight (O(tenants in flight), at
        most the places)."""
        first: TenantState | None = None
        second: TenantState | None = None
        most = runner_up = -1.0
        for t in self.flying.values():
            held = len(t.flight) / t.weight
            if held > most:
                first, second, most, runner_up = t, first, held, most
            elif held > runner_up:
                second, runner_up = t, held
        return first, second

    def over_share(self, tenant: TenantState, holders: Holders | None = None) -> bool:
        """Whether the tenant holds its weighted share of the places or more and, with one
        more, would hold more places per weight than any other tenant.

        The second half lets a tenant whose burst is above the equal share go on while
        another tenant holds even more (the share counts every tenant present, also
        those using less than it, so the places they leave go to the others evenly).
        """
        places = self.max_inflight - self.headroom
        if tenant.inflight * self.present_weight < places * tenant.weight:
            return False
        first, second = self.holders() if holders is None else holders
        other = second if first is tenant else first
        most = 0.0 if other is None else other.inflight / other.weight
        return (tenant.inflight + 1) / tenant.weight > most

    def pace(self) -> float:
        """Seconds between dispatches to tenants over their share (0: no pacing)."""
        if self._pace is not None:
            return self._pace
        service = self.service_time
        return 0.0 if service is None else service / self.max_inflight

    def retry_hint(self, queued: int) -> float:
        """Seconds after which a refused request may find room: the queue over the places,
        times the measured request time."""
        backlog = (queued + 1) / self.max_inflight
        return max(0.1, backlog * (1.0 if self.service_time is None else self.service_time))


_heat = attrgetter("heat")


class RecentService:
    """Each tenant's recent service per weight (its ``heat``), decaying over ``window``
    seconds, and whether a tenant is light against the heaviest.

    Kept in the log domain with the decay folded in, ``log(service) + t / window``, so
    comparing two tenants needs no clock and no ``exp``. ``window=0`` turns it off: nobody
    is light.
    """

    def __init__(self, window: float, ratio: float, clock: Callable[[], float]) -> None:
        self.window = window
        self.margin = math.log(ratio)
        self._clock = clock

    def use(self, tenant: TenantState, cost: float) -> None:
        """Add service to the tenant's recent service."""
        if self.window <= 0 or cost <= 0:
            return
        x = math.log(cost) + self._clock() / self.window
        h = tenant.heat
        tenant.heat = x if h == -math.inf else max(h, x) + math.log1p(math.exp(-abs(h - x)))

    def heaviest(self, flying: Mapping[str, TenantState]) -> TenantState | None:
        """The tenant in flight with the most recent service per weight (O(tenants in
        flight))."""
        if self.window <= 0 or not flying:
            return None
        heavy = max(flying.values(), key=_heat)
        return heavy if heavy.heat > -math.inf else None

    def light(self, tenant: TenantState, heavy: TenantState | None) -> bool:
        """Whether the tenant used at most 1/``ratio`` of the heaviest tenant's recent
        service (per weight)."""
        if heavy is None or heavy is tenant:
            return False
        return tenant.heat + self.margin <= heavy.heat
