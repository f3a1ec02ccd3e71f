"""Continuous batching, cancellation and KV bounds, event-loop responsiveness."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lorapool.errors import InvalidRequest
from lorapool.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _req(rid: str, prompt: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))


async def _collect(backend: Any, request: GenerationRequest) -> list[int]:
    ids: list[int] = []
    async for chunk in backend.generate(request):
        ids.extend(chunk.token_ids)
    return ids


async def test_late_request_joins_running_batch(backend: Any) -> None:
    long_prompt, short_prompt = "Once upon a time, in a quiet village,", "The capital of France is"
    alone_long = await _collect(backend, _req("a0", long_prompt, 48))
    alone_short = await _collect(backend, _req("b0", short_prompt, 8))

    long_tokens: list[int] = []
    short_done_at: int | None = None
    started = asyncio.Event()

    async def run_long() -> None:
        async for chunk in backend.generate(_req("a1", long_prompt, 48)):
            long_tokens.extend(chunk.token_ids)
            if len(long_tokens) >= 6:
                started.set()

    async def run_short() -> list[int]:
        nonlocal short_done_at
        await started.wait()
        ids = await _collect(backend, _req("b1", short_prompt, 8))
        short_done_at = len(long_tokens)
        return ids

    _, short_ids = await asyncio.gather(run_long(), run_short())
    # The short request was admitted and finished while the long one was still decoding.
    assert short_done_at is not None and short_done_at < 48
    assert backend.stats.max_running >= 2
    # Joining mid-flight changes nobody's result.
    assert long_tokens == alone_long
    assert short_ids == alone_short

    # Nor does the order of arrival.
    reversed_results = await asyncio.gather(
        _collect(backend, _req("b2", short_prompt, 8)),
        _collect(backend, _req("a2", long_prompt, 48)),
    )
    assert reversed_results == [alone_short, alone_long]


async def test_cancelled_streams_free_sequences_and_kv(backend: Any) -> None:
    initial_free = backend.free_kv_rows
    assert initial_free == backend.max_batch

    async def read_some_then_leave(i: int) -> int:
        stream = backend.generate(_req(f"c{i}", f"Count slowly from {i}:", 64))
        got = 0
        async for chunk in stream:
            got += len(chunk.token_ids)
            if got >= 2:
                break
        await stream.aclose()
        return got

    counts = await asyncio.gather(*(read_some_then_leave(i) for i in range(200)))
    assert all(c >= 2 for c in counts)

    # A cancelled task, too, frees its sequence.
    task = asyncio.create_task(_collect(backend, _req("t", "Write a long essay:", 200)))
    while backend.live_sequences == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    steps_at_cancel = backend.stats.steps
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 30
    while (
        backend.live_sequences or backend.free_kv_rows != initial_free
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert backend.live_sequences == 0
    assert backend.free_kv_rows == initial_free
    # Freed within one step (plus the step that was running when it was cancelled).
    assert backend.stats.steps - steps_at_cancel <= 2


async def test_event_loop_stays_responsive_while_generating(backend: Any) -> None:
    # The tokenizer's first-use costs were paid at start: left to this burst, they held
    # the GIL long enough to stall the loop (106 ms in CI).
    assert backend._max_prompt_chars is not None
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t0 - 0.01)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(
        *(_collect(backend, _req(f"l{i}", f"Story number {i}:", 48)) for i in range(8))
    )
    done.set()
    await tick
    assert len(lags) > 20
    assert max(lags) < 0.1, f"event loop lagged {max(lags) * 1000:.0f} ms"


async def test_too_long_request_is_refused_and_engine_keeps_serving(backend: Any) -> None:
    with pytest.raises(InvalidRequest, match="max_seq_len"):
        await _collect(backend, _req("x", "hello " * 300, 16))
    assert len(await _collect(backend, _req("y", "hello", 4))) == 4


async def test_seeded_sampling_is_reproducible_and_stop_strings_cut(backend: Any) -> None:
    def sampled(rid: str, seed: int) -> GenerationRequest:
        params = SamplingParams(
            max_tokens=24, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True
        )
        return GenerationRequest(rid, "Write a sentence about the sea:", params)

    a, b, c = await asyncio.gather(
        _collect(backend, sampled("s1", 7)),
        _collect(backend, sampled("s2", 7)),
        _collect(backend, sampled("s3", 8)),
    )
    assert a == b
    assert a != c

    greedy = GenerationRequest(
        "g", "The capital of France is", SamplingParams(max_tokens=16, temperature=0)
    )
    text = "".join([ch.text async for ch in backend.generate(greedy)])
    stop = text.strip().split()[1]  # a word from the middle of the greedy answer
    request = GenerationRequest(
        "g2",
        "The capital of France is",
        SamplingParams(max_tokens=16, temperature=0, stop=[stop]),
    )
    chunks = [ch async for ch in backend.generate(request)]
    cut = "".join(ch.text for ch in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert stop not in cut and text.startswith(cut)


async def test_slot_reuse_leaves_nothing_of_the_previous_adapter(
    backend: Any, adapters: dict[str, Any]
) -> None:
    from lorapool.formats import WEIGHTS_FILE, inspect_adapter_dir
    from lorapool.types import LoadedAdapter

    def loaded(name: str) -> LoadedAdapter:
        files = inspect_adapter_dir(adapters[name])
        weights = (adapters[name] / WEIGHTS_FILE).read_bytes()
        return LoadedAdapter(name, files.config, weights, files.sha256)

    def req(rid: str) -> GenerationRequest:
        params = SamplingParams(max_tokens=12, **GREEDY)
        return GenerationRequest(rid, "Tell me about the sea.", params, "r8-attn", 0)

    small = loaded("r8-attn")
    await backend.load(await backend.prepare(small), 0)
    fresh = await _collect(backend, req("s0"))
    # A larger adapter on every linear (rank 32) takes the slot, then the small one returns:
    # the columns and modules only the large one wrote must be zero again.
    big = loaded("r32-all")
    await backend.load(big, 0)
    with_big = await _collect(
        backend,
        GenerationRequest(
            "b0", "Tell me about the sea.", SamplingParams(max_tokens=12, **GREEDY), "r32-all", 0
        ),
    )
    await backend.load(small, 0)
    again = await _collect(backend, req("s1"))
    assert with_big != fresh
    assert again == fresh


@pytest.mark.parametrize("interleave", [True, False])
async def test_an_arrival_is_prefilled_between_the_layers_of_a_running_decode(
    backend: Any, interleave: bool
) -> None:
    """A request submitted while a decode step runs gets its prefill (and first token)
    before that step ends, on its own rows, changing nobody's tokens; one that ends at its
    first token frees its row in the middle of the step."""
    engine = backend._engine
    long_prompt, short_prompt = "Once upon a time, in a quiet village,", "The capital of France is"
    alone = {
        "a": await _collect(backend, _req("a0", long_prompt, 6)),
        "b": await _collect(backend, _req("b0", short_prompt, 5)),
        "c": await _collect(backend, _req("c0", short_prompt, 1)),
    }
    loop = asyncio.get_running_loop()
    forwards: list[tuple[str, ...]] = []
    late: dict[str, asyncio.Task[list[int]]] = {}

    def submit_late(name: str, max_tokens: int) -> None:
        late[name] = asyncio.create_task(_collect(backend, _req(name, short_prompt, max_tokens)))

    def queue(name: str, max_tokens: int, queued: int) -> None:
        """Submit ``name`` from the loop and wait (on the engine thread) until it is queued:
        prompts are tokenized on worker threads, so two submitted together may be queued
        in either order."""
        loop.call_soon_threadsafe(submit_late, name, max_tokens)
        deadline = time.monotonic() + 120  # a hang guard only
        while len(engine._waiting) < queued and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(engine._waiting) == queued, f"{name} was not queued"

    def hook(ids: list[str], logits: Any) -> None:  # on the engine thread, after each forward
        forwards.append(tuple(ids))
        if ids == ["a"] and len(forwards) == 1:
            # a's prefill just ran and its decode comes next: hold the engine until b and c
            # are queued, so they arrive while that decode runs. c first: it takes the row
            # after a's and ends at its first token, so b's row moves into it while a's
            # decode is still running.
            queue("c", 1, queued=1)
            queue("b", 5, queued=2)

    engine.interleave_prefill = interleave
    engine.logits_hook = hook
    interleaved = backend.stats.interleaved_prefills
    try:
        a = await _collect(backend, _req("a", long_prompt, 6))
        results = {"a": a, "b": await late["b"], "c": await late["c"]}
    finally:
        engine.logits_hook = None
        engine.interleave_prefill = True
    assert results == alone
    if interleave:
        # b and c's prefill ran inside a's first decode step, which reports after it.
        assert forwards[:4] == [("a",), ("c", "b"), ("a",), ("a", "b")]
        assert backend.stats.interleaved_prefills == interleaved + 1
    else:
        assert forwards[:4] == [("a",), ("a",), ("c", "b"), ("a", "b")]
        assert backend.stats.interleaved_prefills == interleaved
    assert backend.free_kv_rows == backend.max_batch and backend.live_sequences == 0
