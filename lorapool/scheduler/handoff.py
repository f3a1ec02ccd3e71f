"""Slot hand-off: stop one adapter's running requests so that a waiting adapter gets a slot.

An engine with ``max_slots`` adapter slots serves a request only while its adapter
holds one, and a slot frees only when every request of its adapter has finished. With
more hot adapters than slots, a request for an adapter without a slot waits for a
whole request's lifetime (every running request of some adapter to end), however
short its own work. The engines do not shorten that wait: vLLM skips such a request
until an adapter leaves its running batch.

When the backend can continue a request from the tokens it already streamed
(``Capabilities.resume``), the scheduler can instead *hand off* a slot: the running
requests of one adapter stop in the engine, give back their places and their hold on
the slot, and queue again; the waiting request takes the slot and has its first token
within a step or two; the stopped requests go on later from where they were, by
recompute (greedy output unchanged; the caller's stream only pauses).

This module holds the scheduler's half: :func:`choose_handoff`, a pure decision (whom
to help, whose requests to stop), and :class:`Handoffs`, the hand-offs a scheduler made
and whose beneficiaries still wait (the pick's rules :class:`~lorapool.scheduler.rules.HandoffFirst`
and :class:`~lorapool.scheduler.rules.SlotGivenUp` read them). The pool's half, a backend
stream that a hand-off can stop without cancelling the caller, is
:class:`lorapool.request.Relay`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from lorapool.scheduler.base import HandoffHook, Ticket

__all__ = ["WAITING_LOOKED_AT", "Handoff", "Handoffs", "choose_handoff"]

WAITING_LOOKED_AT = 8
"""Oldest queued requests looked at for a hand-off, and hand-offs made, per attempt."""


@dataclass(frozen=True)
class Handoff:
    """The scheduler's decision: stop ``victims`` (every running request of ``adapter``)
    so that ``beneficiary`` can have ``adapter``'s slot."""

    beneficiary: Ticket
    adapter: str
    victims: tuple[Ticket, ...]


def choose_handoff(
    waiting: Iterable[Ticket],
    running: Iterable[Ticket],
    inflight: Mapping[str, int],
    can_dispatch: Callable[[str | None, Mapping[str, int]], bool],
    *,
    now: float,
    slot_wait: float,
    pending: Sequence[Handoff] = (),
    min_remaining: int = 4,
) -> Handoff | float | None:
    """Whether to hand a slot over now, and whose.

    ``waiting``: queued tickets, oldest first (only a few are looked at by the caller);
    ``running``: tickets in flight; ``inflight``: requests in flight per adapter, as the
    store's ``can_dispatch`` is asked about them; ``pending``: hand-offs made whose
    beneficiaries have not gone yet (their victims' slots are taken as already theirs).

    The beneficiary is the oldest waiting request that is not a resumed one, needs an
    adapter that cannot get a slot, and has waited ``slot_wait`` seconds or more. The
    victim is an adapter whose running requests have all streamed their first token,
    were never handed off or resumed (a request stops once at most), and whose leaving
    lets the beneficiary's adapter in (a pinned adapter's slot, say, never frees); of
    those, the one with the fewest requests, then the one with the most output still to
    come (it would free its slot last). An adapter whose requests have fewer than
    ``min_remaining`` tokens to go is left to finish.

    Returns the :class:`Handoff`, or the time to look again when a request waits for a
    slot but not yet ``slot_wait``, or ``None``.
    """
    helped = {id(h.beneficiary) for h in pending}
    beneficiary: Ticket | None = None
    wake: float | None = None
    for ticket in waiting:
        if ticket.resumed or ticket.adapter_id is None or id(ticket) in helped:
            continue
        if can_dispatch(ticket.adapter_id, inflight):
            continue
        due = ticket.arrival + slot_wait
        if due <= now:
            beneficiary = ticket
            break
        wake = due if wake is None else min(wake, due)
    if beneficiary is None:
        return wake
    by_adapter: defaultdict[str, list[Ticket]] = defaultdict(list)
    for ticket in running:
        if ticket.adapter_id is not None and ticket.adapter_id != beneficiary.adapter_id:
            by_adapter[ticket.adapter_id].append(ticket)
    # The slots as they will be once the pending hand-offs are done.
    leaving = {h.adapter for h in pending}
    after = {a: n for a, n in inflight.items() if a not in leaving}
    for h in pending:
        if h.beneficiary.adapter_id is not None:
            after[h.beneficiary.adapter_id] = after.get(h.beneficiary.adapter_id, 0) + 1
    best: tuple[int, int, str] | None = None
    for adapter, tickets in by_adapter.items():
        if any(t.resumed or t.handed_off or not t.streaming for t in tickets):
            continue
        remaining = max(t.max_tokens - t.output_tokens for t in tickets)
        if remaining < min_remaining:
            continue
        without = {a: n for a, n in after.items() if a != adapter}
        if not can_dispatch(beneficiary.adapter_id, without):
            continue
        key = (len(tickets), -remaining, adapter)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    adapter = best[2]
    return Handoff(beneficiary, adapter, tuple(by_adapter[adapter]))


class Handoffs:
    """A scheduler's hand-offs: makes them (:meth:`attempt`) and keeps those whose
    beneficiaries still wait for dispatch (:meth:`pending`).

    ``hook`` is the pool's ``hand_off``, given when the backend can resume requests;
    ``count`` counts the hand-offs made.
    """

    def __init__(self, slot_wait: float | None) -> None:
        self.slot_wait = slot_wait
        self.hook: HandoffHook | None = None
        self.count = 0
        self._pending: list[Handoff] = []

    @property
    def active(self) -> bool:
        """Turned on, and the backend can resume requests."""
        return self.hook is not None and self.slot_wait is not None

    def pending(self) -> list[Handoff]:
        """The hand-offs whose beneficiaries still wait for dispatch."""
        pending = self._pending
        if pending and any(not h.beneficiary.queued for h in pending):
            self._pending = pending = [h for h in pending if h.beneficiary.queued]
        return pending

    def attempt(
        self,
        arrivals: Iterable[Ticket],
        running: Callable[[], Iterable[Ticket]],
        inflight: Mapping[str, int],
        can_dispatch: Callable[[str | None, Mapping[str, int]], bool],
        clock: Callable[[], float],
        wake_at: Callable[[float], None],
    ) -> None:
        """Requests have waited ``slot_wait`` for an adapter slot: stop the running
        requests of other adapters so that they get theirs (:func:`choose_handoff`), one
        victim adapter per waiting request.

        ``arrivals``: queued tickets, oldest first (some that left, skipped);
        ``running()``: the tickets in flight; ``wake_at(t)`` is called with the time a
        request will have waited ``slot_wait``, when none has yet.
        """
        hook = self.hook
        slot_wait = self.slot_wait
        if hook is None or slot_wait is None:
            return
        for _ in range(WAITING_LOOKED_AT):
            waiting = itertools.islice((t for t in arrivals if t.queued), WAITING_LOOKED_AT)
            decision = choose_handoff(
                waiting,
                running(),
                inflight,
                can_dispatch,
                now=clock(),
                slot_wait=slot_wait,
                pending=self.pending(),
            )
            if decision is None:
                return
            if not isinstance(decision, Handoff):
                wake_at(decision)  # the time a request will have waited slot_wait
                return
            stopped = False
            for ticket in decision.victims:
                if hook(ticket.request_id):
                    ticket.handed_off = stopped = True
            if not stopped:
                return
            self._pending.append(decision)
            self.count += 1
