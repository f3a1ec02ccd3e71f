"""Preemption on the real engine: a paused request gives its KV row to a waiting one and
resumes by recompute with exactly the output it would have had; through the pool, a quiet
tenant's request starts while a noisy tenant holds every row."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, FairScheduler, SamplingParams
from lorapool.scheduler import PlacesConfig
from lorapool.types import GenerationRequest

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _request(rid: str, prompt: str) -> GenerationRequest:
    return GenerationRequest(rid, [{"role": "user", "content": prompt}], PARAMS)


async def _collect(
    backend: Any, request: GenerationRequest, log: list[tuple[str, int]]
) -> list[int]:
    ids: list[int] = []
    async for chunk in backend.generate(request):
        for tok in chunk.token_ids:
            ids.append(tok)
            log.append((request.request_id, len(ids)))
    return ids


async def _submit(
    backend: Any, request: GenerationRequest, log: list[tuple[str, int]]
) -> asyncio.Task[list[int]]:
    """Start collecting ``request`` and return once the engine holds it (waiting or
    running): prompts are tokenized on worker threads, so two requests started together
    may reach the engine in either order."""
    engine = backend._engine
    rid = request.request_id
    task = asyncio.create_task(_collect(backend, request, log))

    def known() -> bool:
        with engine._cond:
            return any(s.request_id == rid for s in (*engine._waiting, *engine._running))

    deadline = time.monotonic() + 120  # a hang guard only
    while not known() and not task.done():
        assert time.monotonic() < deadline, f"{rid} never reached the engine"
        await asyncio.sleep(0.001)
    return task


async def test_a_preempted_request_resumes_with_the_same_output(model_dir: Path) -> None:
    from lorapool.backends.torch import TorchBackend

    prompts = {
        "a": "Write a limerick about a cat.",
        "b": "Explain photosynthesis briefly.",
        "c": "List five fruits.",
    }
    backend = TorchBackend(model_dir, max_slots=1, max_rank=8, max_batch=2, max_seq_len=128)
    await backend.start()
    try:
        alone: dict[str, list[int]] = {}
        for name, prompt in prompts.items():
            alone[name] = await _collect(backend, _request(f"ref-{name}", prompt), [])
        assert backend.preempt("ref-a") is False  # finished: nothing to preempt

        log: list[tuple[str, int]] = []
        a = await _submit(backend, _request("a", prompts["a"]), log)
        b = await _submit(backend, _request("b", prompts["b"]), log)
        while sum(1 for rid, _ in log if rid == "b") < 4:
            await asyncio.sleep(0.005)
        c = await _submit(backend, _request("c", prompts["c"]), log)  # before b gives up its row
        assert backend.preempt("b") is True
        assert backend.preempt("nope") is False
        results = dict(zip("abc", await asyncio.gather(a, b, c), strict=True))

        assert backend.stats.preemptions == 1
        # Two rows, a and b running 24 tokens each: c could only start before both finished
        # because b gave up its row.
        first_c = log.index(("c", 1))
        assert first_c < log.index(("a", 24)) and first_c < log.index(("b", 24))
        for name in "abc":  # recompute restored b's KV exactly: greedy output unchanged
            assert results[name] == alone[name], name
        assert backend.free_kv_rows == 2 and backend.live_sequences == 0
    finally:
        await backend.aclose()


async def test_through_the_pool_a_quiet_request_starts_while_a_noisy_tenant_holds_every_row(
    model_dir: Path,
) -> None:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=1, max_rank=8, max_batch=2, max_seq_len=128)
    scheduler = FairScheduler(places=PlacesConfig(headroom=0, pace=0))  # preemption: on
    async with AdapterPool(backend, scheduler=scheduler) as pool:
        first_token: dict[str, float] = {}
        done: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        async def run(name: str, tenant: str) -> None:
            stream = pool.generate("Tell me a story.", tenant=tenant, params=PARAMS)
            async for chunk in stream:
                if chunk.token_ids and name not in first_token:
                    first_token[name] = loop.time()
            done[name] = loop.time()

        noisy = [asyncio.create_task(run(f"n{i}", "noisy")) for i in range(4)]
        while len(first_token) < 2:
            await asyncio.sleep(0.005)
        quiet = asyncio.create_task(run("q", "quiet"))
        await asyncio.gather(quiet, *noisy)
        assert scheduler.preemptions >= 1 and backend.stats.preemptions >= 1
        # Both rows were held by noisy requests of 24 tokens; quiet started before either ended.
        assert first_token["q"] < min(done["n0"], done["n1"])
        assert pool.usage("noisy").completion_tokens == 4 * PARAMS.max_tokens


async def test_a_pause_is_asked_once_and_dropped_when_no_newcomer_needs_it(
    model_dir: Path,
) -> None:
    """One ask frees one row: asking again for the same request is refused until the ask
    is applied or dropped, so two newcomers never count on one pause (the scheduler then
    asks another request). An ask no newcomer needed is dropped at the second step start
    after it, and nobody pauses."""
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=1, max_rank=8, max_batch=2, max_seq_len=128)
    await backend.start()
    try:
        log: list[tuple[str, int]] = []
        a = asyncio.create_task(_collect(backend, _request("a", "List five fruits."), log))
        while len(log) < 2:
            await asyncio.sleep(0.002)
        assert backend.preempt("a") is True
        assert backend.preempt("a") is False  # already asked, not applied yet
        seen = len(log)
        # Four more tokens: four more steps, so at least two step starts after the ask
        # (one token of the step running at the ask may arrive late).
        while len(log) < seen + 4:
            await asyncio.sleep(0.002)
        assert backend.preempt("a") is True  # the unneeded ask was dropped
        assert len(await a) == PARAMS.max_tokens
        assert backend.stats.preemptions == 0
    finally:
        await backend.aclose()


@pytest.mark.parametrize("spare_rows", [1, 0])
async def test_a_newcomer_let_in_by_a_preemption_is_prefilled_in_a_spare_row_mid_step(
    model_dir: Path, spare_rows: int
) -> None:
    """Both rows busy, a preemption asked for while a decode step runs: with a spare row
    the newcomer's prefill (and first token) runs between that step's layers, and the
    paused sequence leaves at the step's end; without, the newcomer waits for the step
    to end. Nobody's tokens change, and no decode runs more than ``max_batch`` rows."""
    from lorapool.backends.torch import TorchBackend

    prompts = {"a": "Write a limerick about a cat.", "b": "Explain photosynthesis briefly."}
    prompts["c"] = "List five fruits."
    backend = TorchBackend(
        model_dir, max_slots=1, max_rank=8, max_batch=2, max_seq_len=128, spare_rows=spare_rows
    )
    await backend.start()
    try:
        engine = backend._engine
        alone = {
            n: await _collect(backend, _request(f"ref-{n}", p), []) for n, p in prompts.items()
        }
        loop = asyncio.get_running_loop()
        log: list[tuple[str, int]] = []
        forwards: list[tuple[str, ...]] = []
        late: dict[str, asyncio.Task[list[int]]] = {}
        between = engine._between_decode_layers

        def let_c_in() -> None:  # what the pool does for a preemption: pause, then submit
            assert backend.preempt("b") is True
            late["c"] = asyncio.create_task(_collect(backend, _request("c", prompts["c"]), log))

        def between_layers() -> None:  # on the engine thread, inside a decode step
            if not late and sum(1 for rid, _ in log if rid == "b") >= 3:
                loop.call_soon_threadsafe(let_c_in)
                deadline = time.monotonic() + 30
                while not engine._waiting and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert engine._waiting and engine._preempt, "c was not let in"
                forwards.append(("<c arrives>",))
            between()

        engine._between_decode_layers = between_layers
        engine.logits_hook = lambda ids, _: forwards.append(tuple(ids))
        a = await _submit(backend, _request("a", prompts["a"]), log)  # a's row, then b's
        b = await _submit(backend, _request("b", prompts["b"]), log)
        results = {"a": await a, "b": await b}
        results["c"] = await late["c"]

        assert results == alone  # b resumed by recompute: greedy output unchanged
        assert backend.stats.preemptions == 1
        at = forwards.index(("<c arrives>",))
        if spare_rows:
            # c's prefill inside the running decode of a and b; then a and c decode.
            assert forwards[at + 1 : at + 4] == [("c",), ("a", "b"), ("a", "c")]
        else:
            assert forwards[at + 1 : at + 4] == [("a", "b"), ("c",), ("a", "c")]
        assert max(len(f) for f in forwards) == 2
        assert backend.free_kv_rows == 2 and backend.live_sequences == 0
    finally:
        await backend.aclose()
