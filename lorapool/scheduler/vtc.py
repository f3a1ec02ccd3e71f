"""Virtual token counters: the service each tenant received, and the queue they order.

Dispatch follows the Virtual Token Counter of "Fairness in Serving Large Language Models"
(Sheng et al., OSDI '24): each tenant has a counter of the service it received,
``input_cost * input_tokens + output_cost * output_tokens`` divided by its weight, charged
as tokens are produced; the tenant with the lowest counter that has a queued request goes
next. A tenant whose queue was empty is lifted to the lowest counter among tenants with
queued requests (or to the counter of the last dispatch when none are), so idling banks no
credit; one that still has requests running keeps up to ``credit`` of its lead, so a short
burst from a light tenant is not queued behind a heavy one's backlog.

:class:`CounterQueue` keeps each tenant's queued requests and a heap of the tenants'
counters with lazy deletion: O(log n) per request in the number of tenants with queued
requests.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from lorapool.ratelimit import TokenBucket
from lorapool.scheduler.base import Ticket
from lorapool.scheduler.config import FairnessConfig

__all__ = ["CounterQueue", "Entry", "TenantState", "valid"]


@dataclass(eq=False)
class TenantState:
    """One tenant's accounts: its counter, queue, requests in flight, rate limits and
    recent service."""

    name: str
    tier: str
    rank: int  # tier priority: 0 is the highest
    weight: float
    counter: float = 0.0
    queue: deque[Ticket] = field(default_factory=deque)
    version: int = 0  # bumps whenever a heap entry for this tenant goes stale
    flight: dict[str, Ticket] = field(default_factory=dict)  # in flight, in dispatch order
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    # Recent service per weight, decaying over the light window, in the log domain with the
    # decay folded in: log(service at t) + t / window, so tenants compare without a clock.
    heat: float = -math.inf

    @property
    def inflight(self) -> int:
        """Requests of this tenant dispatched and not yet released."""
        return len(self.flight)


Entry = tuple[float, int, int, int, TenantState]
"""A heap entry: counter, requests in flight, sequence number, version, tenant."""


def valid(entry: Entry) -> bool:
    """Whether a heap entry is current (lazy deletion: stale entries are skipped)."""
    _, _, _, version, tenant = entry
    return version == tenant.version and bool(tenant.queue)


class CounterQueue:
    """Queued requests per tenant, the tenants ordered by their virtual token counters.

    ``heap`` holds an entry per tenant with queued requests (and stale ones, skipped with
    :func:`valid`); ``arrivals`` every queued ticket in arrival order (and some that left,
    skipped); ``floor`` the counter of the last dispatch, where idle tenants restart.
    """

    def __init__(self, config: FairnessConfig) -> None:
        self.input_cost = config.input_cost
        self.output_cost = config.output_cost
        self.credit = config.credit
        self.heap: list[Entry] = []
        self._seq = itertools.count()
        self.active = 0  # tenants with queued requests
        self.arrivals: deque[Ticket] = deque()
        self.queued = 0
        self.by_tier: Counter[str] = Counter()
        self.floor = 0.0

    def enqueue(self, tenant: TenantState, ticket: Ticket) -> None:
        """Queue the ticket; a tenant whose queue was empty is lifted (see the module)."""
        if not tenant.queue:
            floor = self.min_active()
            lift = self.floor if floor is None else floor
            if tenant.inflight:
                lift -= self.credit
            tenant.counter = max(tenant.counter, lift)
            self.active += 1
        tenant.queue.append(ticket)
        ticket.queued = True
        self.arrivals.append(ticket)
        self.queued += 1
        self.by_tier[tenant.tier] += 1
        self.push(tenant)

    def remove(self, tenant: TenantState, ticket: Ticket) -> None:
        """Take a queued ticket out of the queue (withdrawn, or on its way to dispatch)."""
        tenant.queue.remove(ticket)  # the head of its tenant's queue (O(1)) but for a hand-off's
        ticket.queued = False
        self.queued -= 1
        self.by_tier[tenant.tier] -= 1
        if not tenant.queue:
            self.active -= 1
            tenant.version += 1

    def dispatched(self, tenant: TenantState, ticket: Ticket) -> float:
        """The ticket leaves the queue for the engine: its prompt is charged at once (an
        estimate, corrected when the backend reports it). Returns the cost charged."""
        self.remove(tenant, ticket)
        self.floor = max(self.floor, tenant.counter)
        cost = self.input_cost * ticket.prompt_tokens / tenant.weight
        tenant.counter += cost
        if tenant.queue:
            self.push(tenant)
        return cost

    def charge(self, tenant: TenantState, input_tokens: int, output_tokens: int) -> float:
        """Add service to the tenant's counter; returns the cost charged."""
        cost = (self.input_cost * input_tokens + self.output_cost * output_tokens) / tenant.weight
        if cost:
            tenant.counter += cost
            if tenant.queue:
                self.push(tenant)
        return cost

    def push(self, tenant: TenantState) -> None:
        """(Re)place the tenant's heap entry at its current counter."""
        tenant.version += 1
        # Ties go to the tenant with fewer requests in flight: one just back from idle is lifted
        # to exactly the busy tenant's counter and should not lose to it.
        entry = (tenant.counter, tenant.inflight, next(self._seq), tenant.version, tenant)
        heapq.heappush(self.heap, entry)
        if len(self.heap) > 2 * self.active + 64:
            self.heap = [e for e in self.heap if valid(e)]
            heapq.heapify(self.heap)

    def min_active(self) -> float | None:
        """The lowest counter among tenants with queued requests."""
        heap = self.heap
        while heap and not valid(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def oldest(self) -> Ticket | None:
        """The queued ticket that arrived first."""
        arrivals = self.arrivals
        while arrivals:
            head = arrivals[0]
            if head.queued:
                return head
            arrivals.popleft()
        return None
