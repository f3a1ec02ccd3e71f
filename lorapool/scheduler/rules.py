"""The pick's rule parts (the stages they plug into are described in
:mod:`lorapool.scheduler.pick`).

=========================  ==============  ==================================================
part                       stage           what it does
=========================  ==============  ==================================================
:class:`HandoffFirst`      shortcut        a hand-off's beneficiary takes the slot it was
                                           made for
:class:`StarvationBound`   shortcut        a request queued ``max_wait`` seconds goes first
:class:`Headroom`          place rule      the last ``headroom`` places go only to tenants
                                           with nothing in flight (with preemption, also to
                                           tenants under their share)
:class:`Pacing`            place rule      tenants over their share get one dispatch between
                                           them per pace interval
:class:`LightTenants`      exemption       a light tenant goes as if under its share
:class:`SlotGivenUp`       ticket filter   nothing for an adapter giving its slot up while
                                           the beneficiary waits
=========================  ==============  ==================================================

Preemption itself (pausing a request when every place is taken) happens after the pick,
:mod:`lorapool.scheduler.preemption`; in the pick it only widens the headroom.
"""

from __future__ import annotations

from collections.abc import Mapping

from lorapool.scheduler.base import Ticket
from lorapool.scheduler.handoff import Handoff, Handoffs
from lorapool.scheduler.pick import Candidate, Pick
from lorapool.scheduler.places import Places, RecentService
from lorapool.scheduler.preemption import Preemption
from lorapool.scheduler.vtc import CounterQueue, TenantState

__all__ = [
    "HandoffFirst",
    "Headroom",
    "LightTenants",
    "Pacing",
    "SlotGivenUp",
    "StarvationBound",
]


class HandoffFirst:
    """Shortcut: a hand-off's beneficiary takes the slot it was made for as soon as its
    adapter can get one; the requests that gave it up wait for another (their adapter is
    not in flight any more)."""

    def __init__(self, handoffs: Handoffs, tenants: Mapping[str, TenantState]) -> None:
        self._handoffs = handoffs
        self._tenants = tenants

    def choose(self, pick: Pick) -> Candidate | None:
        """The first pending beneficiary whose adapter can get a slot."""
        for handoff in self._handoffs.pending():
            beneficiary = handoff.beneficiary
            if pick.slot_free(beneficiary):
                return self._tenants[beneficiary.tenant], beneficiary
        return None


class StarvationBound:
    """Shortcut: the oldest queued request goes before any counter or affinity choice once
    it has waited ``max_wait`` seconds (if it can go now). ``picks`` counts them."""

    def __init__(
        self, counters: CounterQueue, tenants: Mapping[str, TenantState], max_wait: float
    ) -> None:
        self._counters = counters
        self._tenants = tenants
        self.max_wait = max_wait
        self.picks = 0

    def choose(self, pick: Pick) -> Candidate | None:
        """The oldest request, when it has waited long enough and may go."""
        oldest = self._counters.oldest()
        if (
            oldest is not None
            and pick.now - oldest.arrival >= self.max_wait
            and pick.dispatchable(oldest)
        ):
            self.picks += 1
            return self._tenants[oldest.tenant], oldest
        return None


class Headroom:
    """Place rule: the last ``headroom`` places go only to tenants with nothing in flight,
    so a tenant that was idle starts at once even when a busy one keeps every other place
    full. With preemption available they also go to tenants under their share: a newcomer
    that finds every place full then gets one by preemption instead."""

    def __init__(self, places: Places, preemption: Preemption) -> None:
        self._places = places
        self._preemption = preemption
        self._preempting = False

    def begin(self, pick: Pick) -> bool:
        """Whether the places in flight reach into the headroom."""
        places = self._places
        if pick.inflight < places.max_inflight - places.headroom:
            return False
        self._preempting = self._preemption.active
        return True

    def keeps_out(self, pick: Pick, tenant: TenantState) -> bool:
        """A tenant with requests in flight, over its share when preemption is available."""
        return not self._preempting or pick.over(tenant)

    def kept_out(self, pick: Pick) -> None:
        """Nothing to do: a freed place brings the next pick."""


class Pacing:
    """Place rule: tenants over their share of the places get one dispatch between them per
    pace interval, so their requests start, and end, spread over the engine's steps instead
    of in waves that leave no place free for anyone for a whole request. When it keeps a
    tenant out it asks to pick again when the interval is up."""

    def __init__(self, places: Places) -> None:
        self._places = places
        self._until = 0.0

    def begin(self, pick: Pick) -> bool:
        """Whether a tenant over its share went less than a pace interval ago."""
        places = self._places
        self._until = places.last_over + places.pace()
        return pick.now < self._until

    def keeps_out(self, pick: Pick, tenant: TenantState) -> bool:
        """A tenant over its share."""
        return pick.over(tenant)

    def kept_out(self, pick: Pick) -> None:
        """Pick again when the interval is up."""
        pick.wake_at(self._until)


class LightTenants:
    """Exemption: a tenant whose recent service is at most 1/``light_ratio`` of the
    heaviest in-flight tenant's goes as if under its share of places whatever it holds (not
    paced, takes the headroom)."""

    def __init__(self, service: RecentService, places: Places) -> None:
        self._service = service
        self._places = places
        self._serial = -1
        self._heavy: TenantState | None = None

    def exempts(self, pick: Pick, tenant: TenantState) -> bool:
        """Whether the tenant is light (the heaviest is found once per pick)."""
        if self._serial != pick.serial:
            self._heavy = self._service.heaviest(self._places.flying)
            self._serial = pick.serial
        return self._service.light(tenant, self._heavy)


class SlotGivenUp:
    """Ticket filter: while a hand-off's beneficiary waits, no request for the adapter
    giving its slot up goes (its own stopped requests, or a new one): it would keep the
    slot."""

    def __init__(self, handoffs: Handoffs) -> None:
        self._handoffs = handoffs
        self._pending: list[Handoff] = []

    def begin(self, pick: Pick) -> bool:
        """Whether any hand-off's beneficiary waits."""
        self._pending = self._handoffs.pending()
        return bool(self._pending)

    def keeps_out(self, pick: Pick, ticket: Ticket) -> bool:
        """A request for an adapter giving its slot up."""
        return any(ticket.adapter_id == h.adapter for h in self._pending)
