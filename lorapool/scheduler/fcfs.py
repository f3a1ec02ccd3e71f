"""First come, first served: the baseline the fair scheduler is measured against."""

from __future__ import annotations

import asyncio
from collections import deque

from lorapool.scheduler.base import ColdStart, DispatchState, Ticket

__all__ = ["FCFSScheduler"]


class FCFSScheduler(DispatchState):
    """Dispatch strictly in arrival order: the baseline fair schedulers are measured against.

    The head of the queue waits when its adapter cannot get a device slot, and
    everything behind it waits too (head-of-line blocking is what FCFS means).
    """

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Ticket] = deque()

    def charge(self, ticket: Ticket, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """FCFS keeps no accounts."""

    def cold_start(self, tenant: str) -> ColdStart:
        """Always wait for the adapter."""
        return "wait"

    @property
    def queued(self) -> int:
        """Requests waiting for dispatch."""
        return len(self._queue)

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
        if self._mark_released(ticket):
            self.kick()

    def kick(self) -> None:
        """Dispatch from the head of the queue while limits allow."""
        while self._queue and self._inflight < self._max_inflight:
            head = self._queue[0]
            if not self._can_dispatch(head.adapter_id, self._adapters):
                return
            self._queue.popleft()
            self._mark_dispatched(head)
