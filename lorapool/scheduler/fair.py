"""FairScheduler: per-tenant fairness (VTC), admission control and adapter affinity.

FairScheduler composes parts that each live in their own module:

* :mod:`~lorapool.scheduler.config`: its settings, a few pydantic models;
* :mod:`~lorapool.scheduler.vtc`: the virtual token counters (weighted service per tenant,
  the idle lift, burst credit) and the queue they order;
* :mod:`~lorapool.scheduler.pick` and :mod:`~lorapool.scheduler.rules`: which request goes
  next, as a composition of rule parts (hand-off beneficiaries and the starvation bound
  first; then the counters, with the headroom, pacing, light tenants, slots given up and
  adapter affinity);
* :mod:`~lorapool.scheduler.admission`: tiers, rate limits, queue caps and shedding;
* :mod:`~lorapool.scheduler.places`: the engine's places, each tenant's share of them, and
  recent service (light tenants); :mod:`~lorapool.scheduler.preemption`: pausing a running
  request when every place is taken;
* :mod:`~lorapool.scheduler.handoff`: slot hand-off.

Deadlines: a request still queued at its deadline leaves the queue with
``DeadlineExceeded``; it was charged nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Unpack

from lorapool.errors import DeadlineExceeded, Overloaded
from lorapool.scheduler.admission import Admission
from lorapool.scheduler.base import (
    ColdStart,
    DispatchCheck,
    DispatchState,
    HandoffHook,
    PreemptHook,
    ResidencyCheck,
    Ticket,
)
from lorapool.scheduler.config import (
    GROUP_MODELS,
    AdmissionConfig,
    FairnessConfig,
    HandoffConfig,
    LegacyKeywords,
    PlacesConfig,
    TenantConfig,
    TierPolicy,
    keyword_fields,
)
from lorapool.scheduler.handoff import Handoffs
from lorapool.scheduler.pick import Picker
from lorapool.scheduler.places import Places, RecentService
from lorapool.scheduler.preemption import Preemption
from lorapool.scheduler.rules import (
    HandoffFirst,
    Headroom,
    LightTenants,
    Pacing,
    SlotGivenUp,
    StarvationBound,
)
from lorapool.scheduler.vtc import CounterQueue, TenantState

__all__ = ["FairScheduler", "TierPolicy"]


class FairScheduler(DispatchState):
    """Weighted VTC fairness with admission control and adapter affinity.

    Configured by one model per concern, each optional (the defaults are the defaults of
    their fields)::

        FairScheduler(
            tenants=TenantConfig(tiers={"gold": TierPolicy(weight=2), "free": TierPolicy()}),
            admission=AdmissionConfig(max_queue=4096),
            fairness=FairnessConfig(affinity_slack=256, max_wait=30),
            places=PlacesConfig(headroom=None, pace=None, preemption=True),
            handoff=HandoffConfig(slot_wait=0.5),
        )

    ``places=PlacesConfig(pace=0, preemption=False, light_window=0)`` with
    ``fairness=FairnessConfig(credit=0)`` is plain VTC with the headroom. ``clock`` is the
    scheduler's time source (seconds).

    The older keyword form (``FairScheduler(max_wait=..., headroom=...)``, every field of
    these models as a keyword) still works and warns ``DeprecationWarning``.
    """

    def __init__(
        self,
        *,
        tenants: TenantConfig | None = None,
        admission: AdmissionConfig | None = None,
        fairness: FairnessConfig | None = None,
        places: PlacesConfig | None = None,
        handoff: HandoffConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        **keywords: Unpack[LegacyKeywords],
    ) -> None:
        super().__init__()
        if keywords:
            fields = _from_keywords(
                keywords,
                tenants=tenants,
                admission=admission,
                fairness=fairness,
                places=places,
                handoff=handoff,
            )
            if "tenants" in fields:
                tenants = TenantConfig.model_validate(fields["tenants"])
            if "admission" in fields:
                admission = AdmissionConfig.model_validate(fields["admission"])
            if "fairness" in fields:
                fairness = FairnessConfig.model_validate(fields["fairness"])
            if "places" in fields:
                places = PlacesConfig.model_validate(fields["places"])
            if "handoff" in fields:
                handoff = HandoffConfig.model_validate(fields["handoff"])
        self.tenants = tenants if tenants is not None else TenantConfig()
        self.admission = admission if admission is not None else AdmissionConfig()
        self.fairness = fairness if fairness is not None else FairnessConfig()
        self.places = places if places is not None else PlacesConfig()
        self.handoff = handoff if handoff is not None else HandoffConfig()
        self._clock = clock
        self._tenants: dict[str, TenantState] = {}
        self._counters = CounterQueue(self.fairness)
        self._places = Places(self.places)
        self._service = RecentService(self.places.light_window, self.places.light_ratio, clock)
        self._admission = Admission(
            self.tenants, self.admission, self._counters, self._places, clock
        )
        self._preemption = Preemption(
            self.places.preemption, self._places, self._service, self._counters
        )
        self._handoffs = Handoffs(self.handoff.slot_wait)
        self._starvation = StarvationBound(self._counters, self._tenants, self.fairness.max_wait)
        # The pick's rule parts, in the order they apply within their stage (see
        # lorapool.scheduler.pick); a new rule is a new part in one of these lists.
        self._picker = Picker(
            self._counters,
            self._places,
            clock,
            affinity_slack=self.fairness.affinity_slack,
            filters=[SlotGivenUp(self._handoffs)],
            shortcuts=[HandoffFirst(self._handoffs, self._tenants), self._starvation],
            place_rules=[Headroom(self._places, self._preemption), Pacing(self._places)],
            exemptions=[LightTenants(self._service, self._places)],
        )
        self._picker.bind(self._can_dispatch, self._on_device, self._adapters)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.shed = 0

    # -- what it reports -----------------------------------------------------------------

    @property
    def tiers(self) -> dict[str, TierPolicy]:
        """Tier names to policies, highest priority first."""
        return self._admission.tiers

    @property
    def default_tier(self) -> str:
        """The tier of tenants not assigned one."""
        return self._admission.default_tier

    @property
    def headroom(self) -> int:
        """Places kept for tenants with nothing in flight (sized at :meth:`bind`)."""
        return self._places.headroom

    @property
    def preemptions(self) -> int:
        """Requests paused (the backend accepted) to let another in."""
        return self._preemption.count

    @property
    def handoffs(self) -> int:
        """Slot hand-offs made."""
        return self._handoffs.count

    @property
    def affinity_picks(self) -> int:
        """Picks where adapter affinity chose another tenant than the counters would have."""
        return self._picker.affinity_picks

    @property
    def starvation_picks(self) -> int:
        """Picks made by the starvation bound."""
        return self._starvation.picks

    @property
    def queued(self) -> int:
        """Requests waiting for dispatch."""
        return self._counters.queued

    @property
    def queued_by_tier(self) -> dict[str, int]:
        """Requests waiting for dispatch, per tier."""
        by_tier = self._counters.by_tier
        return {tier: by_tier.get(tier, 0) for tier in self.tiers}

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (service received / weight)."""
        state = self._tenants.get(tenant)
        return 0.0 if state is None else state.counter

    def tier_of(self, tenant: str) -> str:
        """The tier a tenant belongs to."""
        return self._admission.tier_of(tenant)

    def cold_start(self, tenant: str) -> ColdStart:
        """The tenant's tier's cold-start policy."""
        return self.tiers[self.tier_of(tenant)].cold_start

    # -- the seam ------------------------------------------------------------------------

    def bind(
        self,
        *,
        max_inflight: int,
        can_dispatch: DispatchCheck,
        on_device: ResidencyCheck | None = None,
    ) -> None:
        """Take the engine's limits; size the headroom from the concurrency."""
        super().bind(max_inflight=max_inflight, can_dispatch=can_dispatch, on_device=on_device)
        self._places.bind(self._max_inflight)
        self._picker.bind(self._can_dispatch, self._on_device, self._adapters)

    def bind_preemption(self, preempt: PreemptHook | None) -> None:
        """The backend can pause running requests: preemption may use it."""
        super().bind_preemption(preempt)
        self._preemption.hook = preempt

    def bind_handoff(self, hand_off: HandoffHook | None) -> None:
        """The backend can resume handed-off requests: slot hand-off may use it."""
        super().bind_handoff(hand_off)
        self._handoffs.hook = hand_off

    async def acquire(self, ticket: Ticket) -> None:
        """Admit the ticket (or refuse it), queue it, and wait for its dispatch."""
        tenant = self._tenant(ticket.tenant)
        now = self._clock()
        ticket.arrival = now
        if ticket.resumed:  # admitted once already; it keeps going whatever the limits say
            ticket.timeout = None
        elif ticket.timeout is not None:
            if ticket.timeout <= 0:
                raise DeadlineExceeded(f"request {ticket.request_id} arrived after its deadline")
            ticket.deadline = now + ticket.timeout
        if not ticket.resumed:
            self._admission.admit(tenant, ticket, self._shed_below)
        ticket._ready = asyncio.get_running_loop().create_future()
        if not tenant.queue and not tenant.inflight:
            self._places.arrive(tenant)
        self._counters.enqueue(tenant, ticket)
        self.kick()
        try:
            if ticket.timeout is None:
                await ticket._ready
            else:
                async with asyncio.timeout(ticket.timeout):
                    await ticket._ready
        except TimeoutError:
            if ticket.dispatched:  # dispatched at the very last moment: keep it
                return
            self._withdraw(tenant, ticket)
            raise DeadlineExceeded(
                f"request {ticket.request_id} of tenant {ticket.tenant!r} waited past its "
                "deadline and left the queue"
            ) from None
        except BaseException:
            if ticket.dispatched:
                self.release(ticket)
            else:
                self._withdraw(tenant, ticket)
            raise

    def charge(self, ticket: Ticket, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add service to the ticket's tenant counter."""
        tenant = self._tenants.get(ticket.tenant)
        if tenant is None:
            return
        cost = self._counters.charge(tenant, input_tokens, output_tokens)
        if cost:
            self._service.use(tenant, cost)

    def release(self, ticket: Ticket) -> None:
        """Free the ticket's place and dispatch whoever goes next."""
        if not self._mark_released(ticket):
            return
        self._places.give_back(self._tenants.get(ticket.tenant), ticket, self._clock())
        self.kick()

    def kick(self) -> None:
        """Dispatch while there is room and a dispatchable request; then, with requests
        still queued, preempt or hand a slot over if the rules say so."""
        counters = self._counters
        picker = self._picker
        while counters.queued and self._inflight < self._max_inflight:
            picked = picker.pick(self._inflight)
            if picked is None:
                wake = picker.wake
                if wake is not None:
                    self._wake_at(wake)
                break
            self._dispatch(*picked)
        if counters.queued and self._preemption.active:
            found = self._preemption.attempt(self._inflight, self._can_dispatch, self._adapters)
            if found is not None:
                self._dispatch(*found)
        if counters.queued and self._handoffs.active:
            self._handoffs.attempt(
                counters.arrivals,
                self._running,
                self._adapters,
                self._can_dispatch,
                self._clock,
                self._wake_at,
            )

    # -- the parts' glue -----------------------------------------------------------------

    def _tenant(self, name: str) -> TenantState:
        state = self._tenants.get(name)
        if state is None:
            state = self._tenants[name] = self._admission.new_tenant(name)
        return state

    def _shed_below(self, rank: int) -> bool:
        """Refuse the newest queued request of the lowest tier below ``rank``, if any."""
        ticket = self._admission.shed_victim(rank)
        if ticket is None or ticket._ready is None:
            return False
        self._withdraw(self._tenants[ticket.tenant], ticket)
        self.shed += 1
        ticket._ready.set_exception(
            Overloaded(
                f"shed for a higher tier: the queue is full ({self._admission.max_queue})",
                retry_after=self._admission.retry_hint(),
            )
        )
        return True

    def _withdraw(self, tenant: TenantState, ticket: Ticket) -> None:
        if not ticket.queued:
            return
        self._counters.remove(tenant, ticket)
        if not tenant.queue and not tenant.inflight:
            self._places.leave(tenant)
        self.kick()

    def _dispatch(self, tenant: TenantState, ticket: Ticket) -> None:
        cost = self._counters.dispatched(tenant, ticket)
        self._service.use(tenant, cost)
        now = self._clock()
        places = self._places
        if places.over_share(tenant):
            places.last_over = now
        places.take(tenant, ticket, now)
        self._mark_dispatched(ticket)

    def _running(self) -> Iterator[Ticket]:
        return (t for tenant in self._places.flying.values() for t in tenant.flight.values())

    def _wake_at(self, when: float) -> None:
        """Kick again at ``when`` (pacing lets a tenant over its share go, or a request has
        waited ``slot_wait``); the earliest of the times asked for wins."""
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def wake() -> None:
            self._timer = None
            self._timer_at = math.inf
            self.kick()

        self._timer = loop.call_later(max(0.0, when - self._clock()), wake)
        self._timer_at = when


def _from_keywords(keywords: LegacyKeywords, **configs: object) -> dict[str, dict[str, object]]:
    """The older keywords' config fields, after a ``DeprecationWarning`` naming the new form;
    a keyword whose config is also given is a ``TypeError``."""
    fields = keyword_fields(keywords)
    clash = [group for group in fields if configs[group] is not None]
    if clash:
        names = ", ".join(f"{k}=" for k in keywords)
        raise TypeError(
            f"FairScheduler() got {names} and {', '.join(f'{g}=' for g in clash)}: give the "
            "keywords' values as fields of the config instead"
        )
    new_form = ", ".join(
        f"{group}={GROUP_MODELS[group].__name__}({', '.join(f'{k}=...' for k in given)})"
        for group, given in fields.items()
    )
    warnings.warn(
        f"FairScheduler({', '.join(f'{k}=...' for k in keywords)}) is deprecated; "
        f"use FairScheduler({new_form}) (from lorapool.scheduler)",
        DeprecationWarning,
        stacklevel=3,
    )
    return fields
