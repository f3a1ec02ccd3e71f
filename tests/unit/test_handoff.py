"""Slot hand-off: the decision (choose_handoff), the scheduler's use of it, the relay, and
the pool going on with a handed-off request (MockBackend with resume; the real engine's
test is in tests/integration/test_vllm.py)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from lorapool import AdapterPool, FairScheduler, SamplingParams
from lorapool.request import Relay
from lorapool.scheduler import HandoffConfig, PlacesConfig, Ticket
from lorapool.scheduler.handoff import Handoff, choose_handoff
from lorapool.testing import MockBackend
from lorapool.types import Chunk

from .test_fair import Harness, fair, vtc
from .test_formats_peft import make_dir

_ids = itertools.count()


def running(adapter: str, *, streaming: bool = True, out: int = 2, **kw: object) -> Ticket:
    t = Ticket(f"r{next(_ids)}", f"t-{adapter}", adapter, max_tokens=32, **kw)  # type: ignore[arg-type]
    t.output_tokens, t.dispatched = (out if streaming else 0), True
    return t


def waiting(adapter: str | None, arrival: float = 0.0, **kw: object) -> Ticket:
    t = Ticket(f"w{next(_ids)}", f"t-{adapter}", adapter, max_tokens=32, **kw)  # type: ignore[arg-type]
    t.arrival, t.queued = arrival, True
    return t


def slots(n: int, pinned: frozenset[str] = frozenset()):  # type: ignore[no-untyped-def]
    def can(adapter: str | None, inflight: Mapping[str, int]) -> bool:
        if adapter is None or adapter in inflight:
            return True
        return len(set(inflight) | pinned | {adapter}) <= n

    return can


def counts(tickets: list[Ticket]) -> Counter[str]:
    return Counter(t.adapter_id for t in tickets if t.adapter_id is not None)


def decide(wait: list[Ticket], run: list[Ticket], *, n: int = 2, now: float = 1.0, **kw: object):  # type: ignore[no-untyped-def]
    return choose_handoff(
        wait,
        run,
        counts(run),
        slots(n, **kw),
        now=now,
        slot_wait=0.5,  # type: ignore[arg-type]
    )


# -- the decision -----------------------------------------------------------------------------


def test_the_adapter_with_the_fewest_running_requests_gives_its_slot_up() -> None:
    run = [running("a"), running("a"), running("b")]
    w = waiting("c")
    decision = decide([w], run)
    assert isinstance(decision, Handoff)
    assert decision.beneficiary is w and decision.adapter == "b"
    assert decision.victims == (run[2],)


def test_every_running_request_of_the_victim_stops() -> None:
    run = [running("a"), running("a"), running("b"), running("b"), running("b")]
    decision = decide([waiting("c")], run)
    assert isinstance(decision, Handoff) and decision.adapter == "a"
    assert set(decision.victims) == set(run[:2])


def test_a_request_that_has_not_waited_slot_wait_gets_a_time_to_look_again() -> None:
    assert decide([waiting("c", arrival=0.8)], [running("a"), running("b")]) == 1.3


def test_no_hand_off_when_the_adapter_can_get_a_slot() -> None:
    assert decide([waiting("a"), waiting(None)], [running("a"), running("b")]) is None
    assert decide([waiting("c")], [running("a")]) is None  # a slot is free


def test_resumed_requests_never_take_a_slot_by_hand_off() -> None:
    assert decide([waiting("c", resumed=True)], [running("a"), running("b")]) is None


def test_the_oldest_due_request_is_the_beneficiary() -> None:
    first, second = waiting("c", arrival=0.1), waiting("d", arrival=0.2)
    decision = decide([first, second], [running("a"), running("b")])
    assert isinstance(decision, Handoff) and decision.beneficiary is first


@pytest.mark.parametrize(
    "victim",
    [
        {"streaming": False},  # no first token yet: stopping it would cost its TTFT
        {"resumed": True},  # stopped once already
        {"handed_off": True},  # being stopped now
        {"out": 30},  # 2 tokens to go: it frees the slot soon by itself
    ],
)
def test_requests_that_should_not_stop_are_left_alone(victim: dict[str, object]) -> None:
    run = [running("a", **victim), running("b"), running("b")]  # type: ignore[arg-type]
    decision = decide([waiting("c")], run)
    assert isinstance(decision, Handoff) and decision.adapter == "b"
    run = [running("a", **victim)]  # type: ignore[arg-type]
    assert decide([waiting("c")], run, n=1) is None


def test_a_second_waiting_request_gets_another_adapters_slot() -> None:
    run = [running("a"), running("a"), running("b"), running("c"), running("c"), running("c")]
    first, second = waiting("x"), waiting("y")
    one = decide([first, second], run, n=3)
    assert isinstance(one, Handoff) and (one.beneficiary, one.adapter) == (first, "b")
    for t in one.victims:
        t.handed_off = True
    two = choose_handoff(
        [first, second], run, counts(run), slots(3), now=1.0, slot_wait=0.5, pending=[one]
    )
    assert isinstance(two, Handoff) and (two.beneficiary, two.adapter) == (second, "a")
    # Three slots, one pinned, a and b running: x gets a's slot. For y, a's slot counts as
    # x's already (even before a's requests are marked stopped): y gets b's.
    run2 = [running("a", out=1), running("b")]
    pinned = slots(3, pinned=frozenset({"p"}))
    one = choose_handoff([first, second], run2, counts(run2), pinned, now=1.0, slot_wait=0.5)
    assert isinstance(one, Handoff) and (one.beneficiary, one.adapter) == (first, "a")
    two = choose_handoff(
        [first, second], run2, counts(run2), pinned, now=1.0, slot_wait=0.5, pending=[one]
    )
    assert isinstance(two, Handoff) and (two.beneficiary, two.adapter) == (second, "b")


def test_between_equals_the_adapter_with_the_most_left_to_do_stops() -> None:
    run = [running("a", out=20), running("b", out=5)]
    decision = decide([waiting("c")], run)
    assert isinstance(decision, Handoff) and decision.adapter == "b"


def test_a_pinned_adapter_keeps_a_slot_so_only_a_hand_off_that_frees_one_counts() -> None:
    # 3 slots: "p" pinned (nothing running), "a" and "b" running. Stopping "a" frees one.
    run = [running("a"), running("b"), running("b")]
    decision = decide([waiting("c")], run, n=3, pinned=frozenset({"p"}))
    assert isinstance(decision, Handoff) and decision.adapter == "a"
    # 2 slots, "p" pinned and running, "a" running: only "a" leaving lets "c" in.
    run = [running("p"), running("a"), running("a")]
    decision = decide([waiting("c")], run, n=2, pinned=frozenset({"p"}))
    assert isinstance(decision, Handoff) and decision.adapter == "a"


# -- the scheduler ----------------------------------------------------------------------------


class Hook:
    """Stands in for the pool's hand-off: records the requests it was asked to stop."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, request_id: str) -> bool:
        self.calls.append(request_id)
        return True


def harness(hook: Hook | None, *, slot_wait: float | None) -> Harness:
    s = fair(
        fairness=vtc(max_wait=1e9),
        places=PlacesConfig(headroom=0, pace=0, light_window=0),
        handoff=HandoffConfig(slot_wait=slot_wait),
    )
    h = Harness(s, max_inflight=8)  # 2 adapter slots (Harness.slots)
    if hook is not None:
        h.s.bind_handoff(hook)
    return h


def ticket(tenant: str, adapter: str, **kw: object) -> Ticket:
    return Ticket(f"r{next(_ids)}", tenant, adapter, prompt_tokens=8, max_tokens=32, **kw)  # type: ignore[arg-type]


async def _two_slots_busy(h: Harness) -> tuple[Ticket, Ticket, Ticket]:
    a1, a2, b = ticket("ta", "a"), ticket("ta", "a"), ticket("tb", "b")
    for t in (a1, a2, b):
        await h.submit(t)
        t.output_tokens = 1
    assert all(t.dispatched for t in (a1, a2, b))
    return a1, a2, b


async def test_a_request_waiting_slot_wait_for_a_slot_gets_one_by_hand_off() -> None:
    hook = Hook()
    h = harness(hook, slot_wait=0.5)
    clock = h.s._clock
    _, _, b = await _two_slots_busy(h)
    c = ticket("tc", "c")
    await h.submit(c)
    assert not c.dispatched and hook.calls == []  # not waited long enough
    clock.advance(0.5)  # type: ignore[attr-defined]
    h.s.kick()
    assert hook.calls == [b.request_id] and b.handed_off and h.s.handoffs == 1
    h.s.kick()
    assert hook.calls == [b.request_id], "c is helped once"
    # The pool stops b, releases it and queues its continuation; c takes the slot first.
    resumed = ticket("tb", "b", resumed=True)
    h.s.release(b)
    h.tasks = [(x, k) for x, k in h.tasks if x is not b]
    await h.submit(resumed)
    assert c.dispatched and not resumed.dispatched
    clock.advance(10.0)  # type: ignore[attr-defined]
    h.s.kick()
    assert hook.calls == [b.request_id], "a resumed request neither takes nor gives a slot so"
    await h.close()


@pytest.mark.parametrize("resumed", [True, False])
async def test_no_request_for_the_adapter_giving_its_slot_up_goes_before_the_beneficiary(
    resumed: bool,
) -> None:
    """b gives its slot to c. Neither b's own stopped request (resumed) nor a new one may
    take it back: b still holds the slot, so without the rule the new one would go now."""
    hook = Hook()
    h = harness(hook, slot_wait=0.0)
    _, _, b = await _two_slots_busy(h)
    c = ticket("tc", "c")
    await h.submit(c)
    assert hook.calls == [b.request_id]
    other = ticket("tb", "b", resumed=resumed)
    await h.submit(other)
    assert not other.dispatched
    h.s.release(b)
    await asyncio.sleep(0)
    assert c.dispatched and not other.dispatched  # and then it waits for a slot like anyone
    await h.close()


async def test_two_waiting_requests_get_the_slots_of_two_adapters() -> None:
    hook = Hook()
    h = harness(hook, slot_wait=0.0)
    a1, a2, b = await _two_slots_busy(h)
    c, d = ticket("tc", "c"), ticket("td", "d")
    await h.submit(c)
    await h.submit(d)
    assert hook.calls[0] == b.request_id  # c first: b has the fewest requests
    assert sorted(hook.calls[1:]) == sorted([a1.request_id, a2.request_id])  # d: a's slot
    assert h.s.handoffs == 2
    resumed = [ticket("ta", "a", resumed=True), ticket("tb", "b", resumed=True)]
    for t in (a1, a2, b):
        h.s.release(t)
    h.tasks = [(x, k) for x, k in h.tasks if x not in (a1, a2, b)]
    for t in resumed:
        await h.submit(t)
    assert c.dispatched and d.dispatched
    assert not any(t.dispatched for t in resumed)  # both slots went to c and d
    await h.close()


async def test_no_hand_off_without_slot_wait_or_without_the_hook() -> None:
    for hook, wait in ((Hook(), None), (None, 0.0)):
        h = harness(hook, slot_wait=wait)
        await _two_slots_busy(h)
        c = ticket("tc", "c")
        await h.submit(c)
        h.s._clock.advance(100.0)  # type: ignore[attr-defined]
        h.s.kick()
        assert not c.dispatched and h.s.handoffs == 0
        assert hook is None or hook.calls == []
        await h.close()


async def test_the_scheduler_wakes_itself_when_slot_wait_is_up() -> None:
    hook = Hook()
    h = Harness(
        FairScheduler(places=PlacesConfig(light_window=0), handoff=HandoffConfig(slot_wait=0.05)),
        max_inflight=8,
    )
    h.s.bind_handoff(hook)
    _, _, b = await _two_slots_busy(h)
    await h.submit(ticket("tc", "c"))
    assert hook.calls == []
    for _ in range(100):  # no kick from outside: its own timer
        await asyncio.sleep(0.01)
        if hook.calls:
            break
    assert hook.calls == [b.request_id]
    await h.close()


def test_slot_wait_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="slot_wait"):
        FairScheduler(handoff=HandoffConfig(slot_wait=-1.0))


# -- the relay --------------------------------------------------------------------------------


class Source:
    """A backend stream: ``n`` chunks, one per ``gate`` release; records being closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.gate: asyncio.Queue[None] = asyncio.Queue()
        self.closed = False

    async def stream(self) -> AsyncIterator[Chunk]:
        try:
            for i in range(self.n):
                await self.gate.get()
                if i == self.fail_at:
                    raise RuntimeError("engine failed")
                yield Chunk(text=str(i), token_ids=(i,))
        finally:
            self.closed = True


async def test_the_relay_passes_chunks_then_ends() -> None:
    src = Source(3)
    for _ in range(3):
        src.gate.put_nowait(None)
    relay = Relay(src.stream())
    assert [c.token_ids for c in [c async for c in relay]] == [(0,), (1,), (2,)]
    assert not relay.handed_off and src.closed
    assert not relay.hand_off()  # ended: nothing to stop


async def test_a_hand_off_ends_the_iteration_after_what_was_produced() -> None:
    src = Source(10)
    relay = Relay(src.stream())
    src.gate.put_nowait(None)
    src.gate.put_nowait(None)
    got = [await relay.__anext__(), await relay.__anext__()]
    assert relay.hand_off() and not relay.hand_off()
    assert [c async for c in relay] == []
    assert relay.handed_off and src.closed and [c.token_ids for c in got] == [(0,), (1,)]


async def test_the_relay_raises_the_streams_error_and_aclose_stops_it() -> None:
    src = Source(5, fail_at=1)
    src.gate.put_nowait(None)
    src.gate.put_nowait(None)
    relay = Relay(src.stream())
    with pytest.raises(RuntimeError, match="engine failed"):
        async for _ in relay:
            pass
    src = Source(5)
    relay = Relay(src.stream())
    await asyncio.sleep(0)
    await relay.aclose()
    assert src.closed and not relay.handed_off


# -- the pool ---------------------------------------------------------------------------------


async def test_the_pool_goes_on_with_a_handed_off_request_and_the_caller_sees_one_stream(
    tmp_path: Path,
) -> None:
    """One slot. A long request for "a" streams; a request for "b" waits slot_wait, gets the
    slot by hand-off and finishes; "a" goes on after its tokens and its whole output is what
    it would have been (the mock's pieces are numbered)."""

    def handler(request: object) -> list[str]:
        return [f"{request.adapter_id}{i} " for i in range(request.params.max_tokens)]  # type: ignore[attr-defined]

    backend = MockBackend(handler, max_slots=1, token_delay=0.01, resume=True)
    scheduler = FairScheduler(
        places=PlacesConfig(light_window=0), handoff=HandoffConfig(slot_wait=0.05)
    )
    async with AdapterPool(backend, scheduler=scheduler) as pool:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            path = make_dir(tmp_path / name, {})
            await pool.register(f"{name}/x", str(path), tenant=name)

        async def run(name: str, n: int) -> tuple[str, list[Chunk], float]:
            chunks = []
            loop = asyncio.get_running_loop()
            async for chunk in pool.generate(
                "hi", adapter=f"{name}/x", tenant=name, params=SamplingParams(max_tokens=n)
            ):
                chunks.append(chunk)
            return name, chunks, loop.time()

        long = asyncio.create_task(run("a", 40))
        await asyncio.sleep(0.1)  # "a" streams
        short = await run("b", 3)
        _, a_chunks, a_done = await long
    assert short[2] < a_done, "b finished while a was still to go on"
    assert "".join(c.text for c in a_chunks) == "".join(f"a/x{i} " for i in range(40))
    assert sum(len(c.token_ids) for c in a_chunks) == 40
    final = a_chunks[-1]
    assert final.usage is not None and final.usage.completion_tokens == 40
    assert scheduler.handoffs == 1
    legs = [r for r in backend.requests if r.adapter_id == "a/x"]
    assert len(legs) == 2 and legs[0].resume == () and 0 < len(legs[1].resume) < 40
    assert legs[1].request_id.startswith(legs[0].request_id)
    assert pool.stats.completed == 2 and pool.stats.failed == 0
    assert pool.usage("a").completion_tokens == 40
