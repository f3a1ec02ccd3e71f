"""FairScheduler: per-tenant fairness (VTC), admission control and adapter affinity.

Dispatch follows the Virtual Token Counter of "Fairness in Serving Large
Language Models" (Sheng et al., OSDI '24): each tenant has a counter of the
service it received, ``input_cost * input_tokens + output_cost *
output_tokens`` divided by its weight, charged as tokens are produced; the
tenant with the lowest counter that has a queued request goes next. A tenant
whose queue was empty is lifted to the lowest counter among tenants with
queued requests (or to the counter of the last dispatch when none are), so
idling banks no credit.

Around that:

* admission: per-tenant token buckets on requests/s and tokens/min (sustained
  rate, burst), per-tier queue caps, and a global ``max_queue`` beyond which
  the lowest tier queued is shed first (``RateLimited`` / ``Overloaded``, both
  with ``retry_after``);
* affinity: among tenants within ``affinity_slack`` of the lowest counter, a
  request whose adapter is already on the device goes first; distinct adapters
  in flight never exceed the device slots (the store's check);
* starvation bound: a request queued for ``max_wait`` seconds goes before any
  affinity or counter choice;
* places: the last ``headroom`` places of the engine's concurrency go only to
  tenants with nothing in flight; tenants over their share of the places
  (holding their weighted share or more, and as many places per weight as any
  other tenant) are paced, one dispatch between them per ``pace`` seconds (by
  default the measured request time divided by the places), so a backlogged
  tenant's requests do not start and finish in waves that leave no place free;
* burst credit: a tenant whose queue empties but that still has requests
  running keeps up to ``credit`` of its lead over the lowest counter when its
  next request comes (a fully idle tenant keeps none);
* preemption (when the backend offers it): with every place taken, a tenant
  under its share goes at once, and the newest request of the tenant holding
  the most places pauses (its engine resumes it later by recompute) when that
  tenant is over its share and holds more places than the newcomer's; the
  places are over-committed by at most the headroom (one at least), each
  request is paused at most once; the headroom then also takes tenants under
  their share;
* light tenants: a tenant whose recent service (per weight, decaying over
  ``light_window`` seconds) is at most 1/``light_ratio`` of the heaviest
  tenant in flight's goes as if under its share of places whatever it holds:
  it is not paced, takes the headroom, and pauses the heaviest tenant's newest
  request when every place is taken (over-committing the places by up to their
  number, not only the headroom; a request resumed after a pause may pause
  again for a light tenant, four times at most). A light tenant's burst (several requests
  at once, above an equal share of the places) then starts as it would on an
  engine of its own, at the expense of the tenant using the most; the counters
  still order everyone, and a tenant stays light only while it uses clearly
  less than the heaviest;
* slot hand-off (when the backend can resume a request from its output, see
  :mod:`lorapool.scheduler.handoff`): a request that has waited ``slot_wait`` seconds for
  an adapter slot gets one at once: the running requests of one adapter (the
  fewest, every one already streaming) stop, give the slot up and queue again,
  to go on from where they were once a slot frees; a request stops this way
  once at most, and each waiting request gets its own adapter's slot;
* deadlines: a request still queued at its deadline leaves the queue with
  ``DeadlineExceeded``; it was charged nothing.

Tiers are given in priority order, highest first; the last one is shed first.
Per-request work is O(log n) in the number of tenants with queued requests
(a heap of counters with lazy deletion), plus the tenants inspected within the
affinity slack.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter

from lorapool.errors import DeadlineExceeded, InvalidRequest, Overloaded, RateLimited
from lorapool.ratelimit import TokenBucket
from lorapool.scheduler.base import ColdStart, DispatchCheck, DispatchState, ResidencyCheck, Ticket
from lorapool.scheduler.handoff import Handoff, choose_handoff

__all__ = ["FairScheduler", "TierPolicy"]

_SCAN_LIMIT = 64  # tenants inspected per pick when heads cannot get a slot
_AFFINITY_SCAN = 8  # tenants inspected per pick looking for a resident adapter
_PREEMPT_TRIES = 4  # newest requests of the victim offered to the backend (some not running yet)
_LIGHT_PAUSES = 4  # times one request may be paused for light tenants (once for the share rules)
_Entry = tuple[float, int, int, int, "_Tenant"]  # counter, in flight, seq, version, tenant
_Holders = tuple["_Tenant | None", "_Tenant | None"]  # the two holding the most places


@dataclass(frozen=True)
class TierPolicy:
    """What a tier of tenants gets.

    ``weight``: share of service relative to other tenants. ``requests_per_s``
    / ``request_burst`` and ``tokens_per_min`` / ``token_burst`` (prompt plus
    ``max_tokens``, counted at admission): per-tenant token buckets, ``None``
    for no limit; a burst defaults to one second of requests (at least 1) and
    one minute of tokens. ``max_queue``: queued requests of this tier, all
    tenants together. ``cold_start``: see :data:`~lorapool.scheduler.ColdStart`.
    """

    weight: float = 1.0
    requests_per_s: float | None = None
    request_burst: float | None = None
    tokens_per_min: float | None = None
    token_burst: float | None = None
    max_queue: int | None = None
    cold_start: ColdStart = "wait"

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError("weight must be > 0")
        if self.cold_start not in ("wait", "fallback", "reject"):
            raise ValueError("cold_start must be 'wait', 'fallback' or 'reject'")


@dataclass(eq=False)
class _Tenant:
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


_heat = attrgetter("heat")


def _gave_up(ticket: Ticket, pending: list[Handoff]) -> bool:
    """A request for an adapter that is giving its slot up, while the beneficiary waits:
    another dispatch for it would keep the slot (its own stopped requests, or a new one)."""
    return any(ticket.adapter_id == h.adapter for h in pending)


class FairScheduler(DispatchState):
    """Weighted VTC fairness with admission control and adapter affinity.

    ``tiers`` maps tier names to :class:`TierPolicy`, highest priority first;
    ``tenant_tiers`` puts tenants in tiers (others go to ``default_tier``, by
    default the last tier); ``tenant_weights`` overrides a tenant's weight.
    ``affinity_slack`` and ``credit`` are in counter units (weighted token
    costs). ``headroom``: places kept for tenants with nothing in flight (by
    default one in eight). ``pace``: seconds between dispatches to tenants over
    their share of the places (see ``_over_share``); ``None`` measures it (mean request time /
    places), ``0`` turns pacing off. ``preemption``: pause a request of the
    tenant holding the most places for a queued one when every place is taken
    (used only with a backend that can, see
    ``Capabilities.preemption``). ``light_window`` (seconds,
    ``0`` turns the rule off) and ``light_ratio``: a tenant whose recent
    service is at most 1/``light_ratio`` of the heaviest tenant's goes as if
    under its share of places (see the module docstring). ``slot_wait``:
    seconds a request may wait for an adapter slot before one is handed over
    to it (``None`` never; used only with a backend that can resume requests,
    ``Capabilities.resume``).
    ``pace=0, credit=0, preemption=False, light_window=0`` is plain VTC with the
    headroom.
    """

    def __init__(
        self,
        *,
        tiers: Mapping[str, TierPolicy] | None = None,
        tenant_tiers: Mapping[str, str] | None = None,
        default_tier: str | None = None,
        tenant_weights: Mapping[str, float] | None = None,
        input_cost: float = 1.0,
        output_cost: float = 2.0,
        max_queue: int = 4096,
        max_wait: float = 30.0,
        affinity_slack: float = 256.0,
        headroom: int | None = None,
        pace: float | None = None,
        credit: float = 512.0,
        preemption: bool = True,
        light_window: float = 10.0,
        light_ratio: float = 1.25,
        slot_wait: float | None = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.tiers: dict[str, TierPolicy] = dict(tiers or {"default": TierPolicy()})
        if not self.tiers:
            raise ValueError("give at least one tier")
        self._rank = {name: i for i, name in enumerate(self.tiers)}
        self.default_tier = default_tier if default_tier is not None else list(self.tiers)[-1]
        for name in [self.default_tier, *(tenant_tiers or {}).values()]:
            if name not in self.tiers:
                raise ValueError(f"unknown tier {name!r}; tiers are {list(self.tiers)}")
        self._tenant_tiers = dict(tenant_tiers or {})
        self._tenant_weights = dict(tenant_weights or {})
        if any(w <= 0 for w in self._tenant_weights.values()):
            raise ValueError("tenant weights must be > 0")
        self.input_cost = input_cost
        self.output_cost = output_cost
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.affinity_slack = affinity_slack
        if headroom is not None and headroom < 0:
            raise ValueError("headroom must be >= 0")
        self._headroom_arg = headroom
        self.headroom = 0 if headroom is None else headroom
        if pace is not None and pace < 0:
            raise ValueError("pace must be >= 0 (0 turns pacing off)")
        self.pace = pace
        if credit < 0:
            raise ValueError("credit must be >= 0")
        self.credit = credit
        self.preemption = preemption
        if light_window < 0:
            raise ValueError("light_window must be >= 0 (0 turns the light rule off)")
        if light_ratio < 1:
            raise ValueError("light_ratio must be >= 1")
        self.light_window = light_window
        self.light_ratio = light_ratio
        self._light_margin = math.log(light_ratio)
        if slot_wait is not None and slot_wait < 0:
            raise ValueError("slot_wait must be >= 0 seconds, or None for no hand-off")
        self.slot_wait = slot_wait
        self._handoffs: list[Handoff] = []  # hand-offs whose beneficiaries have not gone yet
        self._overcommit = 1  # paused requests the share rules may over-commit the places by
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._active = 0  # tenants with queued requests
        self._present_weight = 0.0  # weights of tenants with queued or in-flight requests
        self._present = 0
        self._last_over = -float("inf")  # when a tenant over its share of places last went
        self._paced_until: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._arrivals: deque[Ticket] = deque()
        self._queued = 0
        self._queued_by_tier: Counter[str] = Counter()
        self._floor = 0.0  # the counter of the last dispatch: where idle tenants restart
        self._service_time: float | None = None  # EWMA of dispatch-to-release seconds
        self._started: dict[int, float] = {}
        self._flying: dict[str, _Tenant] = {}  # tenants with requests in flight
        self.shed = 0
        self.preemptions = 0
        self.handoffs = 0
        self.affinity_picks = 0
        self.starvation_picks = 0

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
        if self._headroom_arg is None:
            self.headroom = self._max_inflight // 8 if self._max_inflight >= 4 else 0
        self.headroom = min(self.headroom, self._max_inflight - 1)
        self._overcommit = max(1, self.headroom)

    @property
    def queued(self) -> int:
        """Requests waiting for dispatch."""
        return self._queued

    @property
    def queued_by_tier(self) -> dict[str, int]:
        """Requests waiting for dispatch, per tier."""
        return {tier: self._queued_by_tier.get(tier, 0) for tier in self.tiers}

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (service received / weight)."""
        state = self._tenants.get(tenant)
        return 0.0 if state is None else state.counter

    def tier_of(self, tenant: str) -> str:
        """The tier a tenant belongs to."""
        return self._tenant_tiers.get(tenant, self.default_tier)

    def cold_start(self, tenant: str) -> ColdStart:
        """The tenant's tier's cold-start policy."""
        return self.tiers[self.tier_of(tenant)].cold_start

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
            self._admit(tenant, ticket)
        ticket._ready = asyncio.get_running_loop().create_future()
        self._enqueue(tenant, ticket)
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
        cost = (self.input_cost * input_tokens + self.output_cost * output_tokens) / tenant.weight
        if cost:
            tenant.counter += cost
            self._use(tenant, cost)
            if tenant.queue:
                self._push(tenant)

    def release(self, ticket: Ticket) -> None:
        """Free the ticket's place and dispatch whoever goes next."""
        if not self._mark_released(ticket):
            return
        state = self._tenants.get(ticket.tenant)
        if state is not None:
            state.flight.pop(ticket.request_id, None)
            if not state.inflight:
                self._flying.pop(state.name, None)
                if not state.queue:
                    self._leave(state)
        started = self._started.pop(id(ticket), None)
        if started is not None:
            took = self._clock() - started
            last = self._service_time
            self._service_time = took if last is None else 0.9 * last + 0.1 * took
        self.kick()

    def kick(self) -> None:
        """Dispatch while there is room and a dispatchable request."""
        while self._queued and self._inflight < self._max_inflight:
            self._paced_until = None
            picked = self._pick()
            if picked is None:
                if self._paced_until is not None:
                    self._wake_at(self._paced_until)
                break
            tenant, ticket = picked
            self._dispatch(tenant, ticket)
        if self._queued and self._preempt is not None and self.preemption:
            self._try_preempt()
        if self._queued and self._hand_off is not None and self.slot_wait is not None:
            self._try_handoff()

    def _try_handoff(self) -> None:
        """Requests have waited ``slot_wait`` for an adapter slot: stop the running
        requests of other adapters so that they get theirs (:func:`choose_handoff`), one
        victim adapter per waiting request."""
        assert self._hand_off is not None and self.slot_wait is not None
        for _ in range(_AFFINITY_SCAN):
            waiting = itertools.islice((t for t in self._arrivals if t.queued), _AFFINITY_SCAN)
            running = (t for tenant in self._flying.values() for t in tenant.flight.values())
            decision = choose_handoff(
                waiting,
                running,
                self._adapters,
                self._can_dispatch,
                now=self._clock(),
                slot_wait=self.slot_wait,
                pending=self._pending_handoffs(),
            )
            if decision is None:
                return
            if not isinstance(decision, Handoff):
                self._wake_at(decision)  # the time a request will have waited slot_wait
                return
            stopped = False
            for ticket in decision.victims:
                if self._hand_off(ticket.request_id):
                    ticket.handed_off = stopped = True
            if not stopped:
                return
            self._handoffs.append(decision)
            self.handoffs += 1

    def _pending_handoffs(self) -> list[Handoff]:
        """The hand-offs whose beneficiaries still wait for dispatch."""
        if any(not h.beneficiary.queued for h in self._handoffs):
            self._handoffs = [h for h in self._handoffs if h.beneficiary.queued]
        return self._handoffs

    def _try_preempt(self) -> None:
        """Every place is taken: let a queued tenant under its share in by pausing the
        newest request of the tenant holding the most places per weight (:meth:`_victim`),
        or a light tenant (:meth:`_light`) by pausing the heaviest tenant's.

        The lowest-counter tenants are tried in order (a few of them), so a tenant over
        its share at the head does not keep one under it waiting. The share rules
        over-commit the places by at most ``_overcommit`` paused requests and pause each
        request once; light tenants over-commit by at most the places' number and pause a
        request up to ``_LIGHT_PAUSES`` times (the engine refuses one not running, or already
        asked to pause and not paused yet).
        """
        over = self._inflight - self._max_inflight
        if not 0 <= over < self._max_inflight:
            return
        if self._min_active() is None:
            return
        holders = self._holders()
        heavy = self._heaviest()
        popped: list[_Entry] = []
        found: tuple[_Tenant, Ticket, _Tenant, bool] | None = None
        try:
            while self._heap and len(popped) < _AFFINITY_SCAN:
                entry = heapq.heappop(self._heap)
                if not self._valid(entry):
                    continue
                popped.append(entry)
                tenant = entry[-1]
                head = tenant.queue[0]
                if not self._can_dispatch(head.adapter_id, self._adapters):
                    continue
                light = self._light(tenant, heavy)
                if light:
                    victim = heavy
                elif over < self._overcommit:
                    victim = self._victim(tenant, holders)
                else:
                    continue
                if victim is not None:
                    found = (tenant, head, victim, light)
                    break
        finally:
            for entry in popped:
                heapq.heappush(self._heap, entry)
        if found is None:
            return
        tenant, head, victim, light = found
        assert self._preempt is not None
        # For a light tenant the heaviest's requests may pause again once resumed: in a
        # collective burst of light tenants its requests are otherwise all spent.
        most, tries = (_LIGHT_PAUSES, len(victim.flight)) if light else (1, _PREEMPT_TRIES)
        for ticket in itertools.islice(reversed(victim.flight.values()), tries):
            if ticket.pauses < most and self._preempt(ticket.request_id):
                ticket.pauses += 1
                self.preemptions += 1
                self._dispatch(tenant, head)
                return

    def _victim(self, tenant: _Tenant, holders: _Holders) -> _Tenant | None:
        """Whose request ``tenant`` may pause for a place, if anyone's: the other tenant
        holding the most places per weight, when it is over its share, ``tenant`` is
        not, and the victim holds more places per weight than ``tenant``."""
        first, second = holders
        victim = second if first is tenant else first
        if (
            victim is None
            or self._over_share(tenant, holders)
            or not self._over_share(victim, holders)
        ):
            return None
        if victim.inflight / victim.weight <= tenant.inflight / tenant.weight:
            return None
        return victim

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

    # -- admission -----------------------------------------------------------------------

    def _tenant(self, name: str) -> _Tenant:
        state = self._tenants.get(name)
        if state is None:
            tier = self.tier_of(name)
            policy = self.tiers[tier]
            state = _Tenant(
                name, tier, self._rank[tier], self._tenant_weights.get(name, policy.weight)
            )
            if policy.requests_per_s is not None:
                burst = policy.request_burst or max(1.0, policy.requests_per_s)
                state.requests = TokenBucket(policy.requests_per_s, burst, self._clock)
            if policy.tokens_per_min is not None:
                burst = policy.token_burst or policy.tokens_per_min
                state.tokens = TokenBucket(policy.tokens_per_min / 60.0, burst, self._clock)
            self._tenants[name] = state
        return state

    def _admit(self, tenant: _Tenant, ticket: Ticket) -> None:
        cost = ticket.prompt_tokens + ticket.max_tokens
        waits = []
        if tenant.requests is not None:
            waits.append(("requests", tenant.requests.wait_time(1)))
        if tenant.tokens is not None:
            if cost > tenant.tokens.burst:
                raise InvalidRequest(
                    f"request needs {cost} tokens (prompt + max_tokens), above tenant "
                    f"{tenant.name!r}'s token burst of {tenant.tokens.burst:g}; lower max_tokens"
                )
            waits.append(("tokens", tenant.tokens.wait_time(cost)))
        refused = [(what, w) for what, w in waits if w > 0]
        if refused:
            what = " and ".join(w for w, _ in refused)
            raise RateLimited(
                f"tenant {tenant.name!r} is over its {what} rate",
                retry_after=max(w for _, w in refused),
            )
        policy = self.tiers[tenant.tier]
        if policy.max_queue is not None and self._queued_by_tier[tenant.tier] >= policy.max_queue:
            raise Overloaded(
                f"the {tenant.tier!r} tier's queue is full ({policy.max_queue} requests)",
                retry_after=self._retry_hint(),
            )
        if self._queued >= self.max_queue and not self._shed_below(tenant.rank):
            raise Overloaded(
                f"the queue is full ({self.max_queue} requests) and no lower tier can be shed",
                retry_after=self._retry_hint(),
            )
        if tenant.requests is not None:
            tenant.requests.try_take(1)
        if tenant.tokens is not None:
            tenant.tokens.try_take(cost)

    def _retry_hint(self) -> float:
        backlog = (self._queued + 1) / self._max_inflight
        return max(0.1, backlog * (1.0 if self._service_time is None else self._service_time))

    def _shed_below(self, rank: int) -> bool:
        """Refuse the newest queued request of the lowest tier below ``rank``, if any."""
        for tier in reversed(list(self.tiers)):
            if self._rank[tier] <= rank:
                return False
            if self._queued_by_tier[tier] == 0:
                continue
            for ticket in reversed(self._arrivals):
                ready = ticket._ready
                if (
                    ticket.queued
                    and ready is not None
                    and not ready.done()
                    and self.tier_of(ticket.tenant) == tier
                ):
                    self._withdraw(self._tenants[ticket.tenant], ticket)
                    self.shed += 1
                    ready.set_exception(
                        Overloaded(
                            f"shed for a higher tier: the queue is full ({self.max_queue})",
                            retry_after=self._retry_hint(),
                        )
                    )
                    return True
        return False

    # -- the queue -----------------------------------------------------------------------

    def _enqueue(self, tenant: _Tenant, ticket: Ticket) -> None:
        if not tenant.queue:
            # Returning from idle: lifted to the lowest active counter, so no credit is banked.
            # A tenant with requests still running keeps up to `credit` of its lead, so a short
            # burst from a light tenant is not queued behind a heavy one's backlog.
            floor = self._min_active()
            lift = self._floor if floor is None else floor
            if tenant.inflight:
                lift -= self.credit
            tenant.counter = max(tenant.counter, lift)
            self._active += 1
            if not tenant.inflight:
                self._present += 1
                self._present_weight += tenant.weight
        tenant.queue.append(ticket)
        ticket.queued = True
        self._arrivals.append(ticket)
        self._queued += 1
        self._queued_by_tier[tenant.tier] += 1
        self._push(tenant)

    def _withdraw(self, tenant: _Tenant, ticket: Ticket) -> None:
        if not ticket.queued:
            return
        ticket.queued = False
        tenant.queue.remove(ticket)
        self._queued -= 1
        self._queued_by_tier[tenant.tier] -= 1
        if not tenant.queue:
            self._active -= 1
            tenant.version += 1
            if not tenant.inflight:
                self._leave(tenant)
        self.kick()

    def _leave(self, tenant: _Tenant) -> None:
        """The tenant has nothing queued or in flight any more."""
        self._present -= 1
        self._present_weight = self._present_weight - tenant.weight if self._present else 0.0

    def _push(self, tenant: _Tenant) -> None:
        tenant.version += 1
        # Ties go to the tenant with fewer requests in flight: one just back from idle is lifted
        # to exactly the busy tenant's counter and should not lose to it.
        entry = (tenant.counter, tenant.inflight, next(self._seq), tenant.version, tenant)
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * self._active + 64:
            self._heap = [e for e in self._heap if self._valid(e)]
            heapq.heapify(self._heap)

    def _over_share(self, tenant: _Tenant, holders: _Holders | None = None) -> bool:
        """Whether the tenant holds its weighted share of the places or more and, with one
        more, would hold more places per weight than any other tenant.

        The second half lets a tenant whose burst is above the equal share go on while
        another tenant holds even more (the share counts every tenant present, also
        those using less than it, so the places they leave go to the others evenly).
        """
        places = self._max_inflight - self.headroom
        if tenant.inflight * self._present_weight < places * tenant.weight:
            return False
        first, second = self._holders() if holders is None else holders
        other = second if first is tenant else first
        most = 0.0 if other is None else other.inflight / other.weight
        return (tenant.inflight + 1) / tenant.weight > most

    def _use(self, tenant: _Tenant, cost: float) -> None:
        """Add service to the tenant's recent service (its ``heat``)."""
        if self.light_window <= 0 or cost <= 0:
            return
        x = math.log(cost) + self._clock() / self.light_window
        h = tenant.heat
        tenant.heat = x if h == -math.inf else max(h, x) + math.log1p(math.exp(-abs(h - x)))

    def _heaviest(self) -> _Tenant | None:
        """The tenant in flight with the most recent service per weight (O(tenants in
        flight))."""
        if self.light_window <= 0 or not self._flying:
            return None
        heavy = max(self._flying.values(), key=_heat)
        return heavy if heavy.heat > -math.inf else None

    def _light(self, tenant: _Tenant, heavy: _Tenant | None) -> bool:
        """Whether the tenant used at most 1/``light_ratio`` of the heaviest tenant's
        recent service (per weight): it then goes as if under its share of places."""
        if heavy is None or heavy is tenant:
            return False
        return tenant.heat + self._light_margin <= heavy.heat

    def _holders(self) -> _Holders:
        """The two tenants holding the most places per weight (O(tenants in flight), at
        most the places)."""
        first: _Tenant | None = None
        second: _Tenant | None = None
        most = runner_up = -1.0
        for t in self._flying.values():
            held = len(t.flight) / t.weight
            if held > most:
                first, second, most, runner_up = t, first, held, most
            elif held > runner_up:
                second, runner_up = t, held
        return first, second

    def _pace(self) -> float:
        """Seconds between dispatches to tenants over their share (0: no pacing)."""
        if self.pace is not None:
            return self.pace
        service = self._service_time
        return 0.0 if service is None else service / self._max_inflight

    @staticmethod
    def _valid(entry: _Entry) -> bool:
        _, _, _, version, tenant = entry
        return version == tenant.version and bool(tenant.queue)

    def _min_active(self) -> float | None:
        while self._heap and not self._valid(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def _oldest(self) -> Ticket | None:
        while self._arrivals:
            head = self._arrivals[0]
            if head.queued:
                return head
            self._arrivals.popleft()
        return None

    def _pick(self) -> tuple[_Tenant, Ticket] | None:
        pending = self._pending_handoffs()
        for handoff in pending:
            # A hand-off's beneficiary takes the slot it was made for; the requests that
            # gave it up wait for another (their adapter is not in flight any more).
            beneficiary = handoff.beneficiary
            if self._can_dispatch(beneficiary.adapter_id, self._adapters):
                return self._tenants[beneficiary.tenant], beneficiary
        oldest = self._oldest()
        if (
            oldest is not None
            and self._clock() - oldest.arrival >= self.max_wait
            and not _gave_up(oldest, pending)
            and self._can_dispatch(oldest.adapter_id, self._adapters)
        ):
            self.starvation_picks += 1
            return self._tenants[oldest.tenant], oldest
        # The last `headroom` places go only to tenants with nothing in flight, so a tenant
        # that was idle starts at once even when a busy one keeps every other place full.
        # Tenants over their share of the places (see `_over_share`) get one place per pace
        # interval between them: their requests then start, and end, spread over the engine's
        # steps instead of in waves that leave no place free for anyone for a whole request.
        reserved = self._inflight >= self._max_inflight - self.headroom
        # With preemption the headroom also takes tenants under their share: a newcomer that
        # finds every place full then gets one by preemption instead.
        preempting = self.preemption and self._preempt is not None
        wait_until = self._last_over + self._pace()
        paced = self._clock() < wait_until
        holders: _Holders | None = None  # found on first need: most tenants looked at hold none
        heavy: _Tenant | None = None
        heavy_known = False
        popped: list[_Entry] = []
        first: tuple[_Tenant, Ticket] | None = None
        chosen: tuple[_Tenant, Ticket] | None = None
        lowest: float | None = None
        looked_before = 0
        try:
            while self._heap and len(popped) < _SCAN_LIMIT:
                entry = heapq.heappop(self._heap)
                if not self._valid(entry):
                    continue
                popped.append(entry)
                counter, _, _, _, tenant = entry
                if lowest is None:
                    lowest = counter
                within = counter <= lowest + self.affinity_slack
                if first is not None and (
                    not within
                    or self.affinity_slack <= 0
                    or len(popped) > looked_before + _AFFINITY_SCAN
                ):
                    break
                head = tenant.queue[0]
                kept_out = held = False
                if tenant.flight and (reserved or paced):  # holding none, never over its share
                    if holders is None:
                        holders = self._holders()
                    over = self._over_share(tenant, holders)
                    kept_out = reserved and (not preempting or over)
                    held = not kept_out and paced and over
                if kept_out or held:
                    if not heavy_known:
                        heavy, heavy_known = self._heaviest(), True
                    if not self._light(tenant, heavy):
                        if held:
                            self._paced_until = wait_until
                        continue
                if _gave_up(head, pending) or not self._can_dispatch(
                    head.adapter_id, self._adapters
                ):
                    continue
                if first is None:
                    first = (tenant, head)
                    looked_before = len(popped)
                if within and (head.adapter_id is None or self._on_device(head.adapter_id)):
                    chosen = (tenant, head)
                    break
        finally:
            for entry in popped:
                heapq.heappush(self._heap, entry)
        if chosen is not None and first is not None and chosen[0] is not first[0]:
            self.affinity_picks += 1
        return chosen or first

    def _dispatch(self, tenant: _Tenant, ticket: Ticket) -> None:
        tenant.queue.remove(ticket)  # the head of its tenant's queue (O(1)) but for a hand-off's
        ticket.queued = False
        self._queued -= 1
        self._queued_by_tier[tenant.tier] -= 1
        if not tenant.queue:
            self._active -= 1
            tenant.version += 1
        self._floor = max(self._floor, tenant.counter)
        # Input is charged at dispatch (an estimate, corrected when the backend reports it).
        cost = self.input_cost * ticket.prompt_tokens / tenant.weight
        tenant.counter += cost
        self._use(tenant, cost)
        if tenant.queue:
            self._push(tenant)
        if self._over_share(tenant):
            self._last_over = self._clock()
        tenant.flight[ticket.request_id] = ticket
        self._flying[tenant.name] = tenant
        self._started[id(ticket)] = self._clock()
        self._mark_dispatched(ticket)
