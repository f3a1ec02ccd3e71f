"""Billing on every exit path, as a property: whatever way a request ends, the tenant is
billed every token the engine produced for it (and its prompt once the engine has worked on
it), and the ledger's totals are the sum of the audit of usage (logger ``lorapool.usage``).

Hypothesis draws runs of requests, each with a prompt, a length and an exit path:

* ``finish``: the caller reads the whole stream;
* ``aclose``: the caller closes the stream after ``k`` chunks;
* ``raise``: the caller's loop raises after ``k`` chunks (the stream is closed under it);
* ``cancel``: the engine stalls after ``k`` tokens and the caller's task is cancelled while
  it waits for the next one (``k = 0``: dispatched, nothing produced yet);
* ``error``: the engine fails after ``k`` tokens;
* ``preempt``: the engine stalls after ``k`` tokens, the scheduler pauses the request
  (through the backend's ``preempt``), then the caller's task is cancelled;
* ``handoff``: the engine stalls after ``k`` tokens, the request is handed off (its stream
  stopped, its place given back) and resumes in a second leg, which the caller reads to
  the end or leaves after ``leave`` chunks;
* ``expired``: the request leaves the queue at its deadline (never dispatched).

The real :class:`~lorapool.request.Lifecycle` runs them over the real store and a test-double
backend (MockBackend, scripted per request) and a FCFS scheduler that can pause a request on
demand as FairScheduler's preemption does. Every step waits on an event, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorapool import AdapterPool, FCFSScheduler, SamplingParams
from lorapool.errors import BackendError, DeadlineExceeded
from lorapool.request import Ledger, Lifecycle
from lorapool.scheduler import PreemptHook, Ticket
from lorapool.testing import MockBackend
from lorapool.types import Capabilities, Chunk, GenerationRequest, Prompt

from .test_store import make_adapters

ADAPTER = "t/a0"
TENANTS = ("acme", "globex")
STALLING = {"cancel", "preempt", "handoff"}


def numbered(request: GenerationRequest) -> list[str]:
    return [f"{i} " for i in range(request.params.max_tokens)]


@dataclass
class Scripted(MockBackend):
    """MockBackend whose request ``rid`` follows ``scripts[rid]`` in its first leg: ``("fail",
    k)`` raises after k tokens, ``("stall", k)`` waits for ever after k tokens (until its
    stream is closed). Offers preemption (the stream goes on, as after a recompute) and counts
    a prompt one token a character, as its usage does."""

    scripts: dict[str, tuple[str, int]] = field(default_factory=dict)
    stalled: dict[str, asyncio.Event] = field(default_factory=dict)
    paused: list[str] = field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, preemption=True)

    def preempt(self, request_id: str) -> bool:
        self.paused.append(request_id)
        return True

    def encode(self, prompt: Prompt) -> list[int]:
        assert isinstance(prompt, str)
        return [ord(c) for c in prompt]

    async def _act(self, rid: str, script: tuple[str, int] | None, sent: int) -> None:
        if script is None or script[1] != sent:
            return
        if script[0] == "fail":
            raise BackendError("the engine failed")
        self.stalled[rid].set()
        await asyncio.Event().wait()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        first_leg = "." not in request.request_id
        script = self.scripts.get(request.request_id) if first_leg else None
        sent = 0
        await self._act(request.request_id, script, sent)
        async for chunk in super().generate(request):
            yield chunk
            sent += len(chunk.token_ids)
            await self._act(request.request_id, script, sent)


class PausingFCFS(FCFSScheduler):
    """FCFS that pauses a running request on demand, as FairScheduler's preemption does
    (the backend's ``preempt`` asked, the pause counted on the ticket); a ticket whose
    deadline is 0 leaves the queue at once, as FairScheduler's does."""

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[str, Ticket] = {}
        self.hook: PreemptHook | None = None

    def bind_preemption(self, preempt: PreemptHook | None) -> None:
        self.hook = preempt

    async def acquire(self, ticket: Ticket) -> None:
        if ticket.timeout is not None and ticket.timeout <= 0:
            raise DeadlineExceeded(f"request {ticket.request_id} arrived after its deadline")
        await super().acquire(ticket)
        self.running[ticket.request_id] = ticket

    def pause(self, request_id: str) -> None:
        assert self.hook is not None and self.hook(request_id)
        self.running[request_id].pauses += 1


@dataclass
class World:
    loop: asyncio.AbstractEventLoop
    pool: AdapterPool
    backend: Scripted
    scheduler: PausingFCFS


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    loop = asyncio.new_event_loop()
    backend = Scripted(numbered, resume=True, max_batch=4)
    scheduler = PausingFCFS()
    pool = AdapterPool(backend, scheduler=scheduler)

    async def setup(tmp: Path) -> None:
        await pool.start()
        for name, path in make_adapters(tmp, 1).items():
            await pool.register(name, str(path), tenant="t", shared=True)
            await pool.prefetch(name, tenant="t", wait=True)

    loop.run_until_complete(setup(tmp_path_factory.mktemp("billing")))
    try:
        yield World(loop, pool, backend, scheduler)
    finally:
        loop.run_until_complete(pool.aclose())
        loop.close()


class Audit(logging.Handler):
    """Keeps the records of the audit of usage."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def audited() -> Iterator[Audit]:
    logger = logging.getLogger("lorapool.usage")
    handler, level = Audit(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Boom(Exception):
    """The caller's own error, raised in its loop."""


@dataclass(frozen=True)
class Case:
    path: str
    tenant: str
    prompt: str
    n: int  # max_tokens
    k: int  # chunks before the exit (the first leg's, for a hand-off)
    base: bool  # the base model (the backend's stream read directly) or the adapter
    leave: int | None = None  # hand-off: the caller leaves after this many chunks in all

    @property
    def finishes(self) -> bool:
        return self.path == "finish" or (self.path == "handoff" and self.leave is None)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    path = draw(
        st.sampled_from(
            ["finish", "aclose", "raise", "cancel", "error", "preempt", "handoff", "expired"]
        )
    )
    n = draw(st.integers(1, 6))
    low = 1 if path in ("aclose", "raise") else 0  # 0 chunks: the stream never started
    k = draw(st.integers(low, n - 1)) if path not in ("finish", "expired") and n > low else 0
    if path in ("aclose", "raise") and n == 1:
        path = "finish"  # nothing to leave before the last chunk
    leave = None
    if path == "handoff":
        leave = draw(st.none() | st.integers(k + 1, n))
        leave = None if leave == n else leave
    return Case(
        path=path,
        tenant=draw(st.sampled_from(TENANTS)),
        prompt=draw(st.text("abcdefghij ", min_size=1, max_size=20)),
        n=n,
        k=k,
        base=path != "handoff" and draw(st.booleans()),  # a hand-off is for an adapter
        leave=leave,
    )


async def drive(w: World, life: Lifecycle, rid: str, case: Case) -> list[Chunk]:
    """Run one request along its path; returns the chunks its caller received."""
    if case.path in ("error", "cancel", "preempt", "handoff"):
        kind = "fail" if case.path == "error" else "stall"
        w.backend.scripts[rid] = (kind, case.k)
        w.backend.stalled[rid] = asyncio.Event()
    info = None if case.base else w.pool.registry.resolve(ADAPTER, case.tenant)
    stream = life.run(
        rid,
        case.prompt,
        info,
        tenant=case.tenant,
        params=SamplingParams(max_tokens=case.n),
        deadline=0 if case.path == "expired" else None,
    )
    got: list[Chunk] = []
    reached = asyncio.Event()
    leave_at = case.k if case.path in ("aclose", "raise") else case.leave

    async def consume() -> None:
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                got.append(chunk)
                if len(got) == case.k:
                    reached.set()
                if len(got) == leave_at:
                    if case.path == "raise":
                        raise Boom()
                    return

    task = asyncio.create_task(consume())
    if case.k == 0:
        reached.set()
    async with asyncio.timeout(30):  # a hang guard, not a timing
        if case.path in STALLING:
            await w.backend.stalled[rid].wait()
            await reached.wait()  # everything the engine produced has reached the caller
            if case.path == "handoff":
                assert life.hand_off(rid)
            elif case.path == "preempt":
                w.scheduler.pause(rid)
                task.cancel()
            else:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Boom, BackendError, DeadlineExceeded):
            await task
    return got


OUTCOMES = {
    "finish": "finished",
    "aclose": "cancelled",
    "raise": "cancelled",
    "cancel": "cancelled",
    "error": "error",
    "preempt": "preempted-then-cancelled",
    "handoff": "cancelled",
    "expired": "expired",
}


_ids = itertools.count()
FIELDS = (
    "tenant",
    "adapter",
    "prompt_tokens",
    "completion_tokens",
    "outcome",
    "handoffs",
    "preemptions",
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(cases(), min_size=1, max_size=4))
def test_every_token_produced_is_billed_on_every_exit_path(world: World, run: list[Case]) -> None:
    ledger = Ledger()
    life = Lifecycle(world.pool.backend, world.pool.store, world.pool.scheduler, ledger)
    life.bind_handoff()
    produced: dict[str, dict[str, object]] = {}
    with audited() as audit:
        for case in run:
            rid = f"r{next(_ids)}"
            got = world.loop.run_until_complete(drive(world, life, rid, case))
            tokens = sum(len(c.token_ids) for c in got)
            if case.finishes:
                assert tokens == case.n and got[-1].usage is not None
            else:
                assert tokens == (case.leave if case.leave is not None else case.k)
            produced[rid] = {
                "tenant": case.tenant,
                "adapter": None if case.base else ADAPTER,
                "prompt_tokens": len(case.prompt) if tokens else 0,  # the engine worked on it
                "completion_tokens": tokens,
                "outcome": "finished" if case.finishes else OUTCOMES[case.path],
                "handoffs": int(case.path == "handoff"),
                "preemptions": int(case.path == "preempt"),
            }
            assert world.pool.store.refs(ADAPTER) == 0
            assert world.scheduler.inflight == 0 and world.scheduler.queued == 0

    lines = [vars(r) for r in audit.records]
    assert len(lines) == len(run)  # one line of the audit per request
    billed = {line["request_id"]: {k: line.get(k) for k in FIELDS} for line in lines}
    assert billed == produced
    for tenant in TENANTS:
        usage = ledger.usage(tenant)
        mine = [line for line in lines if line["tenant"] == tenant]
        assert usage.requests == len(mine)
        assert usage.prompt_tokens == sum(line["prompt_tokens"] for line in mine)
        assert usage.completion_tokens == sum(line["completion_tokens"] for line in mine)
    stats = ledger.stats
    assert stats.requests == len(lines)
    assert stats.prompt_tokens == sum(line["prompt_tokens"] for line in lines)
    assert stats.completion_tokens == sum(line["completion_tokens"] for line in lines)
