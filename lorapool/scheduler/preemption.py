"""Preemption: with every place taken, pause a running request so that a queued one starts.

Used only when the backend can (``Capabilities.preemption``; its engine resumes a paused
request later by recompute). Two rules choose whose request pauses:

* the share rules (:func:`share_victim`): a tenant under its share goes at once, pausing
  the newest request of the tenant holding the most places per weight, when that tenant
  is over its share and holds more places than the newcomer's. The places are
  over-committed by at most the headroom (one at least), and each request is paused once
  at most;
* light tenants: a tenant whose recent service is at most 1/``light_ratio`` of the
  heaviest in-flight tenant's pauses the heaviest's newest request, over-committing the
  places by up to their number; a request resumed after a pause may pause again for a
  light tenant, :data:`LIGHT_PAUSES` times at most (in a collective burst of light
  tenants the heaviest's requests are otherwise all spent).

The lowest-counter tenants are tried in order (:data:`TENANTS_TRIED` of them), so a tenant
over its share at the head does not keep one under it waiting.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping

from lorapool.scheduler.base import DispatchCheck, PreemptHook, Ticket
from lorapool.scheduler.places import Holders, Places, RecentService
from lorapool.scheduler.vtc import CounterQueue, Entry, TenantState, valid

__all__ = ["LIGHT_PAUSES", "PREEMPT_TRIES", "TENANTS_TRIED", "Preemption", "share_victim"]

TENANTS_TRIED = 8
"""Lowest-counter tenants tried for a place by preemption."""
PREEMPT_TRIES = 4
"""Newest requests of the victim offered to the backend (some may not be running yet)."""
LIGHT_PAUSES = 4
"""Times one request may be paused for light tenants (once for the share rules)."""


def share_victim(tenant: TenantState, holders: Holders, places: Places) -> TenantState | None:
    """Whose request ``tenant`` may pause for a place by the share rules, if anyone's: the
    other tenant holding the most places per weight, when it is over its share, ``tenant``
    is not, and the victim holds more places per weight than ``tenant``."""
    first, second = holders
    victim = second if first is tenant else first
    if (
        victim is None
        or places.over_share(tenant, holders)
        or not places.over_share(victim, holders)
    ):
        return None
    if victim.inflight / victim.weight <= tenant.inflight / tenant.weight:
        return None
    return victim


class Preemption:
    """Finds a queued request to start by pausing a running one (see the module).

    ``hook`` is the backend's ``preempt``, given by the pool; ``count`` counts the pauses
    the backend accepted.
    """

    def __init__(
        self, enabled: bool, places: Places, service: RecentService, counters: CounterQueue
    ) -> None:
        self.enabled = enabled
        self.hook: PreemptHook | None = None
        self.count = 0
        self._places = places
        self._service = service
        self._counters = counters

    @property
    def active(self) -> bool:
        """Turned on, and the backend can preempt."""
        return self.enabled and self.hook is not None

    def attempt(
        self, inflight: int, can_dispatch: DispatchCheck, adapters: Mapping[str, int]
    ) -> tuple[TenantState, Ticket] | None:
        """Pause a running request for a queued one, if the rules allow: returns the tenant
        and request to dispatch now (the backend accepted the pause), or ``None``."""
        hook = self.hook
        places = self._places
        over = inflight - places.max_inflight
        if hook is None or not 0 <= over < places.max_inflight:
            return None
        counters = self._counters
        if counters.min_active() is None:
            return None
        holders = places.holders()
        service = self._service
        heavy = service.heaviest(places.flying)
        heap = counters.heap
        popped: list[Entry] = []
        found: tuple[TenantState, Ticket, TenantState, bool] | None = None
        try:
            while heap and len(popped) < TENANTS_TRIED:
                entry = heapq.heappop(heap)
                if not valid(entry):
                    continue
                popped.append(entry)
                tenant = entry[-1]
                head = tenant.queue[0]
                if not can_dispatch(head.adapter_id, adapters):
                    continue
                light = service.light(tenant, heavy)
                if light:
                    victim = heavy
                elif over < places.overcommit:
                    victim = share_victim(tenant, holders, places)
                else:
                    continue
                if victim is not None:
                    found = (tenant, head, victim, light)
                    break
        finally:
            for entry in popped:
                heapq.heappush(heap, entry)
        if found is None:
            return None
        tenant, head, victim, light = found
        most, tries = (LIGHT_PAUSES, len(victim.flight)) if light else (1, PREEMPT_TRIES)
        # The newest first: the least work to redo.
        for ticket in itertools.islice(reversed(victim.flight.values()), tries):
            if ticket.pauses < most and hook(ticket.request_id):
                ticket.pauses += 1
                self.count += 1
                return tenant, head
        return None
