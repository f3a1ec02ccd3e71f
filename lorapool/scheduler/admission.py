"""Admission: who may queue. Tiers, per-tenant rate limits, queue caps, shedding.

* rate limits: per-tenant token buckets on requests/s and tokens/min (sustained rate,
  burst), from the tenant's tier; a request over either is refused with ``RateLimited``
  and the time until it would fit (``retry_after``). A request counts as its prompt plus
  ``max_tokens``; one larger than the token burst can never fit and is refused with
  ``InvalidRequest``;
* queue caps: per tier (``TierPolicy.max_queue``) and in all (``AdmissionConfig.max_queue``),
  beyond which the lowest tier queued is shed first: the newest queued request of the
  lowest tier below the arriving one's leaves with ``Overloaded``; with none, the arriving
  request is refused with ``Overloaded``.

Tiers are given in priority order, highest first; the last one is shed first and is the
default tier.
"""

from __future__ import annotations

from collections.abc import Callable

from lorapool.errors import InvalidRequest, Overloaded, RateLimited
from lorapool.ratelimit import TokenBucket
from lorapool.scheduler.base import Ticket
from lorapool.scheduler.config import AdmissionConfig, TenantConfig, TierPolicy
from lorapool.scheduler.places import Places
from lorapool.scheduler.vtc import CounterQueue, TenantState

__all__ = ["Admission"]


class Admission:
    """Tiers, each tenant's tier, weight and rate limits, and the admission checks."""

    def __init__(
        self,
        tenants: TenantConfig,
        config: AdmissionConfig,
        counters: CounterQueue,
        places: Places,
        clock: Callable[[], float],
    ) -> None:
        self.tiers: dict[str, TierPolicy] = dict(tenants.tiers)
        self.rank = {name: i for i, name in enumerate(self.tiers)}
        self.default_tier = tenants.default
        self._tenant_tiers = dict(tenants.tenant_tiers)
        self._tenant_weights = dict(tenants.tenant_weights)
        self.max_queue = config.max_queue
        self._counters = counters
        self._places = places
        self._clock = clock

    def tier_of(self, tenant: str) -> str:
        """The tier a tenant belongs to."""
        return self._tenant_tiers.get(tenant, self.default_tier)

    def new_tenant(self, name: str) -> TenantState:
        """A tenant's accounts as it first arrives: its tier, weight and token buckets (full)."""
        tier = self.tier_of(name)
        policy = self.tiers[tier]
        state = TenantState(
            name, tier, self.rank[tier], self._tenant_weights.get(name, policy.weight)
        )
        if policy.requests_per_s is not None:
            burst = policy.request_burst or max(1.0, policy.requests_per_s)
            state.requests = TokenBucket(policy.requests_per_s, burst, self._clock)
        if policy.tokens_per_min is not None:
            burst = policy.token_burst or policy.tokens_per_min
            state.tokens = TokenBucket(policy.tokens_per_min / 60.0, burst, self._clock)
        return state

    def retry_hint(self) -> float:
        """``retry_after`` for a request refused because the queue is full."""
        return self._places.retry_hint(self._counters.queued)

    def admit(self, tenant: TenantState, ticket: Ticket, shed: Callable[[int], bool]) -> None:
        """Admit the ticket (taking its tokens) or raise why not.

        ``shed(rank)`` sheds a queued request of a tier below ``rank`` (see
        :meth:`shed_victim`), returning whether it did.
        """
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
        counters = self._counters
        if policy.max_queue is not None and counters.by_tier[tenant.tier] >= policy.max_queue:
            raise Overloaded(
                f"the {tenant.tier!r} tier's queue is full ({policy.max_queue} requests)",
                retry_after=self.retry_hint(),
            )
        if counters.queued >= self.max_queue and not shed(tenant.rank):
            raise Overloaded(
                f"the queue is full ({self.max_queue} requests) and no lower tier can be shed",
                retry_after=self.retry_hint(),
            )
        if tenant.requests is not None:
            tenant.requests.try_take(1)
        if tenant.tokens is not None:
            tenant.tokens.try_take(cost)

    def shed_victim(self, rank: int) -> Ticket | None:
        """The newest queued request of the lowest tier below ``rank``, if any (still
        waiting for its dispatch)."""
        counters = self._counters
        for tier in reversed(self.tiers):
            if self.rank[tier] <= rank:
                return None
            if counters.by_tier[tier] == 0:
                continue
            for ticket in reversed(counters.arrivals):
                ready = ticket._ready
                if (
                    ticket.queued
                    and ready is not None
                    and not ready.done()
                    and self.tier_of(ticket.tenant) == tier
                ):
                    return ticket
        return None
