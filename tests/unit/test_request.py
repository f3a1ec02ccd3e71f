"""The request's lifecycle (lorapool.request.Lifecycle) over MockBackend and the real schedulers:
every exit path bills what was produced and gives back the store's reference and the
scheduler's place; a handed-off request resumes and is billed once; a cold-start fallback
says the base model answered."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lorapool import AdapterPool, FairScheduler, FCFSScheduler, SamplingParams, TierPolicy
from lorapool.errors import BackendError, ColdStartRejected
from lorapool.request import Ledger, Lifecycle, estimate_tokens
from lorapool.scheduler import HandoffConfig, PlacesConfig, TenantConfig
from lorapool.testing import MockBackend
from lorapool.types import AdapterInfo, Chunk, GenerationRequest, Prompt

from .test_store import make_adapters

ADAPTER = "t/a0"
PROMPT = "twelve chars"  # MockBackend counts one prompt token per character
_ids = itertools.count()


def numbered(request: GenerationRequest) -> list[str]:
    """The mock's answer: pieces numbered from 0, so a resumed request's output is checkable."""
    return [f"{request.adapter_id or 'base'}:{i} " for i in range(request.params.max_tokens)]


@dataclasses.dataclass
class FailsMidStream(MockBackend):
    """Streams ``fail_after`` tokens, then the engine fails."""

    fail_after: int = 2

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        sent = 0
        async for chunk in super().generate(request):
            if sent == self.fail_after:
                raise BackendError("the engine failed mid-stream")
            sent += len(chunk.token_ids)
            yield chunk


@dataclasses.dataclass
class StallsUntilHandedOff(MockBackend):
    """The first leg of a request for ``stall`` streams ``after`` tokens, then waits for
    ever: only a hand-off (which closes its stream) lets the request go on."""

    stall: str = "t/a0"
    after: int = 3

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        sent = 0
        async for chunk in super().generate(request):
            yield chunk
            sent += len(chunk.token_ids)
            if request.adapter_id == self.stall and not request.resume and sent == self.after:
                await asyncio.Event().wait()


@dataclasses.dataclass
class Rig:
    """A started pool (for registration and wiring) and a lifecycle of the test's own."""

    pool: AdapterPool
    backend: MockBackend
    scheduler: FCFSScheduler | FairScheduler
    ledger: Ledger
    life: Lifecycle

    def info(self, adapter: str = ADAPTER) -> AdapterInfo:
        return self.pool.registry.resolve(adapter, "t")

    def run(self, n: int, adapter: str | None = ADAPTER, tenant: str = "t") -> AsyncIterator[Chunk]:
        info = None if adapter is None else self.pool.registry.resolve(adapter, tenant)
        return self.life.run(
            f"req{next(_ids)}",
            PROMPT,
            info,
            tenant=tenant,
            params=SamplingParams(max_tokens=n),
        )

    def assert_released(self, adapter: str = ADAPTER) -> None:
        assert self.pool.store.refs(adapter) == 0
        assert self.scheduler.inflight == 0 and self.scheduler.queued == 0


async def rig(
    tmp_path: Path,
    backend: MockBackend,
    scheduler: FCFSScheduler | FairScheduler | None = None,
    *,
    n_adapters: int = 1,
    warm: bool = True,
) -> Rig:
    sched = scheduler if scheduler is not None else FCFSScheduler()
    pool = AdapterPool(backend, scheduler=sched)
    await pool.start()
    for name, path in make_adapters(tmp_path, n_adapters).items():
        await pool.register(name, str(path), tenant="t", shared=True)
        if warm:
            await pool.prefetch(name, tenant="t", wait=True)
    ledger = Ledger()
    life = Lifecycle(pool.backend, pool.store, pool.scheduler, ledger)
    if backend.resume:
        life.bind_handoff()  # the scheduler stops this lifecycle's requests, not the pool's
    return Rig(pool, backend, sched, ledger, life)


# -- every exit path ----------------------------------------------------------------------------


async def test_a_request_that_ends_is_billed_the_engines_count_once(tmp_path: Path) -> None:
    r = await rig(tmp_path, MockBackend(numbered))
    chunks = [c async for c in r.run(5)]
    assert "".join(c.text for c in chunks) == "".join(f"{ADAPTER}:{i} " for i in range(5))
    usage = r.ledger.usage("t")
    assert (usage.requests, usage.completed, usage.failed) == (1, 1, 0)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 5)
    assert r.ledger.stats.completed == 1 and r.ledger.stats.completion_tokens == 5
    r.assert_released()
    await r.pool.aclose()


async def test_a_caller_that_stops_reading_is_billed_what_it_received(tmp_path: Path) -> None:
    r = await rig(tmp_path, MockBackend(numbered))
    stream = r.run(10)
    received = [await stream.__anext__() for _ in range(3)]
    assert r.pool.store.refs(ADAPTER) == 1
    await stream.aclose()  # type: ignore[attr-defined]
    usage = r.ledger.usage("t")
    assert (usage.completed, usage.failed) == (0, 1)
    assert usage.completion_tokens == sum(len(c.token_ids) for c in received) == 3
    # The engine's count never came and MockBackend cannot tokenize: the scheduler's estimate.
    assert usage.prompt_tokens == estimate_tokens(PROMPT)
    r.assert_released()
    await r.pool.aclose()


async def test_an_engine_failure_mid_stream_bills_the_tokens_streamed(tmp_path: Path) -> None:
    r = await rig(tmp_path, FailsMidStream(numbered, fail_after=4))
    received: list[Chunk] = []
    with pytest.raises(BackendError, match="mid-stream"):
        async for chunk in r.run(10):
            received.append(chunk)
    usage = r.ledger.usage("t")
    assert len(received) == 4 and usage.completion_tokens == 4
    assert (usage.completed, usage.failed) == (0, 1)
    r.assert_released()
    await r.pool.aclose()


async def test_a_cancelled_task_is_billed_what_it_received(tmp_path: Path) -> None:
    r = await rig(tmp_path, MockBackend(numbered, token_delay=0.01))
    received: list[Chunk] = []
    two = asyncio.Event()

    async def consume() -> None:
        async for chunk in r.run(1000):
            received.append(chunk)
            if len(received) == 2:
                two.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(30):  # a hang guard
        await two.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    usage = r.ledger.usage("t")
    assert (usage.completed, usage.failed) == (0, 1)
    assert usage.completion_tokens == sum(len(c.token_ids) for c in received) >= 2
    r.assert_released()
    await r.pool.aclose()


async def test_a_request_cancelled_in_the_queue_leaves_it_and_holds_nothing(
    tmp_path: Path,
) -> None:
    r = await rig(tmp_path, MockBackend(numbered, max_batch=1))
    first = r.run(3)
    await first.__anext__()  # dispatched: the only place is taken
    waiting = asyncio.create_task(anext(aiter(r.run(3, tenant="u"))))
    await asyncio.sleep(0)
    assert r.scheduler.queued == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert r.scheduler.queued == 0
    assert r.ledger.usage("u").completion_tokens == 0
    await first.aclose()  # type: ignore[attr-defined]
    r.assert_released()
    await r.pool.aclose()


async def test_one_requests_failure_leaves_the_others_whole(tmp_path: Path) -> None:
    r = await rig(tmp_path, FailsMidStream(numbered, fail_after=1, token_delay=0.001), n_adapters=2)

    async def whole(adapter: str | None, n: int) -> list[Chunk]:
        return [c async for c in r.run(n, adapter)]

    failed, ok = await asyncio.gather(whole("t/a0", 5), whole(None, 1), return_exceptions=True)
    assert isinstance(failed, BackendError)
    assert isinstance(ok, list) and ok[-1].usage is not None
    stats = r.ledger.stats
    assert (stats.requests, stats.completed, stats.failed) == (2, 1, 1)
    r.assert_released("t/a0")
    await r.pool.aclose()


# -- hand-off -----------------------------------------------------------------------------------


async def _handed_off(
    tmp_path: Path, stop_after: int | None
) -> tuple[Rig, list[Chunk], list[GenerationRequest]]:
    """One slot. A 40-token request for t/a0 streams 3 tokens and stalls; a request for t/a1
    waits slot_wait, gets the slot by hand-off and finishes; the first goes on in a second
    leg (and, with ``stop_after``, its caller leaves after that many tokens)."""
    backend = StallsUntilHandedOff(numbered, max_slots=1, resume=True)
    scheduler = FairScheduler(
        places=PlacesConfig(light_window=0), handoff=HandoffConfig(slot_wait=0.05)
    )
    r = await rig(tmp_path, backend, scheduler, n_adapters=2, warm=False)
    received: list[Chunk] = []
    streaming = asyncio.Event()

    async def long() -> None:
        async with contextlib.aclosing(r.run(40, "t/a0", tenant="a")) as stream:
            async for chunk in stream:
                received.append(chunk)
                streaming.set()
                if len(received) == stop_after:
                    break

    task = asyncio.create_task(long())
    async with asyncio.timeout(30):  # a hang guard
        await streaming.wait()
        short = [c async for c in r.run(3, "t/a1", tenant="b")]
        await task
    assert short[-1].usage is not None and scheduler.handoffs == 1
    legs = [q for q in backend.requests if q.adapter_id == "t/a0"]
    return r, received, legs


async def test_a_handed_off_request_resumes_and_is_billed_once(tmp_path: Path) -> None:
    r, received, legs = await _handed_off(tmp_path, stop_after=None)
    assert "".join(c.text for c in received) == "".join(f"t/a0:{i} " for i in range(40))
    assert len(legs) == 2 and legs[0].resume == ()
    assert list(legs[1].resume) == [t for c in received[:3] for t in c.token_ids]
    assert legs[1].request_id == f"{legs[0].request_id}.1"
    usage = r.ledger.usage("a")
    assert (usage.requests, usage.completed, usage.failed) == (1, 1, 0)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 40)
    r.assert_released("t/a0")
    r.assert_released("t/a1")
    await r.pool.aclose()


async def test_a_caller_leaving_in_the_second_leg_is_billed_both_legs(tmp_path: Path) -> None:
    r, received, legs = await _handed_off(tmp_path, stop_after=10)
    assert len(legs) == 2 and len(legs[1].resume) == 3  # it left 7 tokens into the second leg
    usage = r.ledger.usage("a")
    assert (usage.requests, usage.completed, usage.failed) == (1, 0, 1)
    assert usage.completion_tokens == len(received) == 10
    r.assert_released("t/a0")
    await r.pool.aclose()


# -- cold start ---------------------------------------------------------------------------------


def _tiers(policy: str) -> FairScheduler:
    return FairScheduler(tenants=TenantConfig(tiers={"only": TierPolicy(cold_start=policy)}))  # type: ignore[arg-type]


async def _until_on_device(r: Rig, adapter: str) -> None:
    async with asyncio.timeout(30):  # a hang guard: the store loads it in the background
        while not r.pool.store.on_device(adapter):
            await asyncio.sleep(0.01)


async def test_a_cold_start_fallback_says_the_base_model_answered(tmp_path: Path) -> None:
    r = await rig(tmp_path, MockBackend(numbered), _tiers("fallback"), warm=False)
    assert not r.pool.store.on_device(ADAPTER)
    chunks = [c async for c in r.run(3)]
    assert {(c.served_by, c.adapter_id) for c in chunks} == {("base", None)}
    assert "".join(c.text for c in chunks) == "base:0 base:1 base:2 "
    assert r.backend.requests[-1].adapter_id is None
    usage = r.ledger.usage("t")
    assert (usage.fallbacks, usage.completed, usage.completion_tokens) == (1, 1, 3)
    await _until_on_device(r, ADAPTER)  # the fallback started the load
    chunks = [c async for c in r.run(3)]
    assert {(c.served_by, c.adapter_id) for c in chunks} == {("adapter", ADAPTER)}
    assert r.ledger.usage("t").fallbacks == 1
    r.assert_released()
    await r.pool.aclose()


async def test_a_rejected_cold_start_takes_no_place_and_loads_the_adapter(tmp_path: Path) -> None:
    r = await rig(tmp_path, MockBackend(numbered), _tiers("reject"), warm=False)
    with pytest.raises(ColdStartRejected):
        await anext(aiter(r.run(3)))
    usage = r.ledger.usage("t")
    assert (usage.requests, usage.refused, usage.completed, usage.failed) == (1, 1, 0, 0)
    r.assert_released()
    await _until_on_device(r, ADAPTER)
    await r.pool.aclose()


async def test_a_waiting_cold_start_is_served_by_its_adapter(tmp_path: Path) -> None:
    r = await rig(tmp_path, MockBackend(numbered), _tiers("wait"), warm=False)
    chunks = [c async for c in r.run(2)]
    assert {(c.served_by, c.adapter_id) for c in chunks} == {("adapter", ADAPTER)}
    assert r.ledger.usage("t").fallbacks == 0
    r.assert_released()
    await r.pool.aclose()


# -- through the pool ---------------------------------------------------------------------------


async def test_leaving_pool_generate_early_ends_the_request_at_once(tmp_path: Path) -> None:
    """The pool's stream wraps the lifecycle's: closing it closes the lifecycle's now, not
    when it is garbage collected."""
    pool = AdapterPool(MockBackend(numbered))
    for name, path in make_adapters(tmp_path, 1).items():
        await pool.register(name, str(path), tenant="t")
    stream = pool.generate(PROMPT, adapter=ADAPTER, tenant="t", params=SamplingParams(max_tokens=9))
    first = await stream.__anext__()
    assert pool.store.refs(ADAPTER) == 1
    await stream.aclose()
    assert pool.store.refs(ADAPTER) == 0
    usage = pool.usage("t")
    assert (usage.failed, usage.completion_tokens) == (1, len(first.token_ids))
    assert pool.stats.failed == 1
    await pool.aclose()


# -- the bill on every exit path ----------------------------------------------------------------


@dataclasses.dataclass
class Tokenizes(MockBackend):
    """MockBackend with a tokenizer that counts as its engine does (a token a character)."""

    def encode(self, prompt: Prompt) -> list[int]:
        assert isinstance(prompt, str)
        return [ord(c) for c in prompt]


async def test_a_caller_that_leaves_is_billed_its_prompt_as_the_engine_counts_it(
    tmp_path: Path,
) -> None:
    """The same prompt costs the same whether its request finished or its caller left."""
    r = await rig(tmp_path, Tokenizes(numbered))
    [c async for c in r.run(2, tenant="done")]
    stream = r.run(10, tenant="left")
    await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    done, left = r.ledger.usage("done"), r.ledger.usage("left")
    assert done.prompt_tokens == left.prompt_tokens == len(PROMPT)
    assert (left.completion_tokens, left.failed) == (1, 1)
    await r.pool.aclose()


async def test_every_request_writes_one_line_of_the_audit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finished, left, failed, refused: one line each on lorapool.usage, and the ledger's
    totals are their sums; a request that never reached the engine is billed nothing."""
    r = await rig(tmp_path, FailsMidStream(numbered, fail_after=2), _tiers("reject"), warm=False)
    caplog.set_level(logging.INFO, logger="lorapool.usage")
    with pytest.raises(ColdStartRejected):
        await anext(aiter(r.run(3)))
    await _until_on_device(r, ADAPTER)
    [c async for c in r.run(2)]
    with pytest.raises(BackendError):
        [c async for c in r.run(5)]
    stream = r.run(5, adapter=None)
    await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    lines = [vars(rec) for rec in caplog.records if rec.name == "lorapool.usage"]
    got = [(x["outcome"], x["adapter"], x["prompt_tokens"], x["completion_tokens"]) for x in lines]
    estimate = estimate_tokens(PROMPT)
    assert got == [
        ("refused", ADAPTER, 0, 0),
        ("finished", ADAPTER, len(PROMPT), 2),
        ("error", ADAPTER, estimate, 2),
        ("cancelled", None, estimate, 1),
    ]
    assert {x["tenant"] for x in lines} == {"t"} and len({x["request_id"] for x in lines}) == 4
    usage = r.ledger.usage("t")
    assert (usage.requests, usage.completed, usage.failed, usage.refused) == (4, 1, 2, 1)
    assert usage.prompt_tokens == sum(x["prompt_tokens"] for x in lines)
    assert usage.completion_tokens == sum(x["completion_tokens"] for x in lines) == 5
    assert r.ledger.stats.by_tenant() == {"t": usage}
    r.assert_released()
    await r.pool.aclose()
