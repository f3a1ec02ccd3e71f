"""The scheduler seam, and the first-come-first-served baseline.

A scheduler decides which queued request is dispatched next. Whatever its
policy, it keeps two bounds the pool relies on: at most ``max_inflight``
requests in flight, and never more distinct adapters in flight than the store
can hold on the device (``can_dispatch``).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["DispatchCheck", "FCFSScheduler", "Scheduler", "Ticket"]

DispatchCheck = Callable[[str | None, Mapping[str, int]], bool]
"""``can_dispatch(adapter_id, inflight_per_adapter) -> bool``, given by the store."""


@dataclass(eq=False)
class Ticket:
    """A request waiting for, or holding, a dispatch."""

    request_id: str
    tenant: str
    adapter_id: str | None
    prompt_tokens: int = 0
    max_tokens: int = 0
    dispatched: bool = False
    _ready: asyncio.Future[None] | None = field(default=None, repr=False)


@runtime_checkable
class Scheduler(Protocol):
    """Decides whose request runs next."""

    def bind(self, *, max_inflight: int, can_dispatch: DispatchCheck) -> None:
        """Called once by the pool at start with the engine's limits."""
        ...

    async def acquire(self, ticket: Ticket) -> None:
        """Wait until ``ticket`` is dispatched. Cancelling the wait withdraws it."""
        ...

    def release(self, ticket: Ticket) -> None:
        """The dispatched request finished (or failed); free its place."""
        ...

    def kick(self) -> None:
        """Something outside changed (a pin, an unload): try to dispatch again."""
        ...


class FCFSScheduler:
    """Dispatch strictly in arrival order: the baseline fair schedulers are measured against.

    The head of the queue waits when its adapter cannot get a device slot, and
    everything behind it waits too (head-of-line blocking is what FCFS means).
    """

    def __init__(self) -> None:
        self._queue: deque[Ticket] = deque()
        self._inflight = 0
        self._adapters: Counter[str] = Counter()
        self._max_inflight = 1
        self._can_dispatch: DispatchCheck = lambda adapter, inflight: True

    def bind(self, *, max_inflight: int, can_dispatch: DispatchCheck) -> None:
        """Take the engine's concurrency limit and the store's slot check."""
        self._max_inflight = max(1, max_inflight)
        self._can_dispatch = can_dispatch

    @property
    def queued(self) -> int:
        """Requests waiting for dispatch."""
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Requests dispatched and not yet released."""
        return self._inflight

    async def acquire(self, ticket: Ticket) -> None:
        """Queue the ticket and wait for its turn."""
        ticket._ready = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        self.kick()
        try:
            await ticket._ready
        except BaseException:
            if ticket.dispatched:
                self.release(ticket)
            elif ticket in self._queue:
                self._queue.remove(ticket)
                self.kick()
            raise

    def release(self, ticket: Ticket) -> None:
        """Free the ticket's place and dispatch whoever can go next."""
        if not ticket.dispatched:
            return
        ticket.dispatched = False
        self._inflight -= 1
        if ticket.adapter_id is not None:
            self._adapters[ticket.adapter_id] -= 1
            if self._adapters[ticket.adapter_id] <= 0:
                del self._adapters[ticket.adapter_id]
        self.kick()

    def kick(self) -> None:
        """Dispatch from the head of the queue while limits allow."""
        while self._queue and self._inflight < self._max_inflight:
            head = self._queue[0]
            if not self._can_dispatch(head.adapter_id, self._adapters):
                return
            self._queue.popleft()
            self._dispatch(head)

    def _dispatch(self, ticket: Ticket) -> None:
        ticket.dispatched = True
        self._inflight += 1
        if ticket.adapter_id is not None:
            self._adapters[ticket.adapter_id] += 1
        if ticket._ready is not None and not ticket._ready.done():
            ticket._ready.set_result(None)
