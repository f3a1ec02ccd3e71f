"""The scheduler seam, and the first-come-first-served baseline.

A scheduler decides which queued request is dispatched next. Whatever its
policy, it keeps two bounds the pool relies on: at most ``max_inflight``
requests in flight, and never more distinct adapters in flight than the store
can hold on the device (``can_dispatch``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from lorapool.abc import Scheduler

__all__ = [
    "ColdStart",
    "DispatchCheck",
    "DispatchState",
    "HandoffHook",
    "PreemptHook",
    "ResidencyCheck",
    "Scheduler",
    "Ticket",
]

DispatchCheck = Callable[[str | None, Mapping[str, int]], bool]
"""``can_dispatch(adapter_id, inflight_per_adapter) -> bool``, given by the store."""

ResidencyCheck = Callable[[str], bool]
"""``on_device(adapter_id) -> bool``, given by the store."""

PreemptHook = Callable[[str], bool]
"""``preempt(request_id) -> bool``, given by the pool when the backend can preempt: asks the
engine to give the request's place to a waiting one (the request pauses, then resumes)."""

HandoffHook = Callable[[str], bool]
"""``hand_off(request_id) -> bool``, given by the pool when the backend can resume a request
from its output so far: the request stops in the engine, gives back its place and its
adapter's hold on a slot, and queues again (``Ticket.resumed``) to go on later. False when
the request is not streaming any more."""

ColdStart = Literal["wait", "fallback", "reject"]
"""What to do when a request's adapter is not on the device: wait for the load, serve
from the base model meanwhile, or refuse with ``ColdStartRejected``."""


@dataclass(eq=False)
class Ticket:
    """A request waiting for, or holding, a dispatch.

    ``prompt_tokens`` is an estimate until the backend reports the real
    count. ``timeout``: seconds the request may wait in the queue (its
    deadline), ``None`` for no limit. ``arrival`` and ``deadline`` are set by
    the scheduler on its own clock. ``pauses``: times the backend accepted to
    pause the request to let another in (an accepted pause the backend then
    found nobody needed, as the newcomer got a place otherwise, still counts).
    ``output_tokens``: tokens streamed under this ticket (kept by the pool). ``resumed``: the
    ticket continues a request that was handed off (it passes no admission check and
    is not handed off again). ``handed_off``: the scheduler asked the pool to stop the
    request so that another adapter can have its slot.
    """

    request_id: str
    tenant: str
    adapter_id: str | None
    prompt_tokens: int = 0
    max_tokens: int = 0
    timeout: float | None = None
    arrival: float = 0.0
    deadline: float | None = None
    queued: bool = False
    dispatched: bool = False
    pauses: int = 0
    output_tokens: int = 0
    resumed: bool = False
    handed_off: bool = False
    _ready: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def streaming(self) -> bool:
        """The request's first token (under this ticket) has reached the caller."""
        return self.output_tokens > 0

    @property
    def preempted(self) -> bool:
        """The request was paused at least once to let another in."""
        return self.pauses > 0


class DispatchState:
    """What every scheduler tracks: the engine's limits and what is in flight.

    Schedulers subclass it and call :meth:`_mark_dispatched` /
    :meth:`_mark_released`; ``_inflight`` and ``_adapters`` (requests in
    flight per adapter) are what ``can_dispatch`` is asked about.
    """

    def __init__(self) -> None:
        self._inflight = 0
        self._adapters: Counter[str] = Counter()
        self._max_inflight = 1
        self._can_dispatch: DispatchCheck = lambda adapter, inflight: True
        self._on_device: ResidencyCheck = lambda adapter: True
        self._preempt: PreemptHook | None = None
        self._hand_off: HandoffHook | None = None

    def bind(
        self,
        *,
        max_inflight: int,
        can_dispatch: DispatchCheck,
        on_device: ResidencyCheck | None = None,
    ) -> None:
        """Take the engine's concurrency limit and the store's slot and residency checks."""
        self._max_inflight = max(1, max_inflight)
        self._can_dispatch = can_dispatch
        if on_device is not None:
            self._on_device = on_device

    def bind_preemption(self, preempt: PreemptHook | None) -> None:
        """Called by the pool at start when its backend can preempt running requests.

        Schedulers that use it may dispatch one request beyond ``max_inflight``
        after preempting another; the default is to never call it.
        """
        self._preempt = preempt

    def bind_handoff(self, hand_off: HandoffHook | None) -> None:
        """Called by the pool at start when its backend can resume handed-off requests.

        Schedulers that use it may stop running requests of one adapter so that a
        request waiting for a slot gets one; the default is to never call it.
        """
        self._hand_off = hand_off

    def tier_of(self, tenant: str) -> str | None:
        """No service tiers by default."""
        return None

    @property
    def queued_by_tier(self) -> dict[str, int]:
        """No service tiers by default: empty."""
        return {}

    @property
    def inflight(self) -> int:
        """Requests dispatched and not yet released."""
        return self._inflight

    def _mark_dispatched(self, ticket: Ticket) -> None:
        ticket.dispatched = True
        self._inflight += 1
        if ticket.adapter_id is not None:
            self._adapters[ticket.adapter_id] += 1
        if ticket._ready is not None and not ticket._ready.done():
            ticket._ready.set_result(None)

    def _mark_released(self, ticket: Ticket) -> bool:
        """Forget a dispatched ticket; False if it was not dispatched."""
        if not ticket.dispatched:
            return False
        ticket.dispatched = False
        self._inflight -= 1
        if ticket.adapter_id is not None:
            self._adapters[ticket.adapter_id] -= 1
            if self._adapters[ticket.adapter_id] <= 0:
                del self._adapters[ticket.adapter_id]
        return True
