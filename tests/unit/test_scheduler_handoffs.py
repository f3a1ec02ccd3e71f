"""The scheduler's hand-offs (lorapool.scheduler.handoff.Handoffs): made through the hook,
kept while their beneficiaries wait. The decision itself is tested in test_handoff.py."""

from __future__ import annotations

from collections.abc import Mapping

from lorapool.scheduler import Ticket
from lorapool.scheduler.handoff import Handoffs

from .test_scheduler_pick import request


def _slots(adapter: str | None, inflight: Mapping[str, int]) -> bool:
    """Two adapter slots."""
    return adapter is None or adapter in inflight or len(inflight) < 2


def _running(adapter: str) -> Ticket:
    t = request(f"t-{adapter}", adapter, max_tokens=32)
    t.dispatched, t.output_tokens = True, 2
    return t


class Stage:
    """Two adapters running, a request for a third waiting since 0; the hook answers as told."""

    def __init__(self, answer: bool = True) -> None:
        self.a, self.b = _running("a"), _running("b")
        self.b2 = _running("b")
        self.waiting = request("t-c", "c", arrival=0.0, queued=True)
        self.answer = answer
        self.stopped: list[str] = []
        self.wakes: list[float] = []

    def hook(self, request_id: str) -> bool:
        self.stopped.append(request_id)
        return self.answer

    def attempt(self, handoffs: Handoffs, now: float) -> None:
        handoffs.attempt(
            [self.waiting],
            lambda: [self.a, self.b, self.b2],
            {"a": 1, "b": 2},
            _slots,
            lambda: now,
            self.wakes.append,
        )


def test_a_request_that_waited_slot_wait_gets_a_hand_off_made_once() -> None:
    stage = Stage()
    handoffs = Handoffs(0.5)
    handoffs.hook = stage.hook
    assert handoffs.active
    stage.attempt(handoffs, now=0.2)
    assert stage.stopped == [] and stage.wakes == [0.5]  # look again when it is due
    stage.attempt(handoffs, now=0.5)
    assert stage.stopped == [stage.a.request_id] and stage.a.handed_off
    assert handoffs.count == 1 and [h.beneficiary for h in handoffs.pending()] == [stage.waiting]
    stage.attempt(handoffs, now=0.6)
    assert handoffs.count == 1  # helped once
    stage.waiting.queued = False  # dispatched
    assert handoffs.pending() == []


def test_no_hand_off_when_the_hook_stops_nothing_or_is_missing_or_off() -> None:
    stage = Stage(answer=False)
    handoffs = Handoffs(0.5)
    handoffs.hook = stage.hook
    stage.attempt(handoffs, now=1.0)
    assert stage.stopped == [stage.a.request_id] and handoffs.count == 0
    assert handoffs.pending() == []
    for slot_wait, hook in ((0.5, None), (None, stage.hook)):
        off = Handoffs(slot_wait)
        off.hook = hook
        assert not off.active
        stage.attempt(off, now=1.0)
        assert off.count == 0
    assert stage.stopped == [stage.a.request_id]
