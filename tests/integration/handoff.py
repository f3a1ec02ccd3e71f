"""The slot hand-off scenario, run on each real engine that offers resume (TorchBackend here,
VLLMBackend in test_vllm.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from lorapool import AdapterPool, FairScheduler, SamplingParams

PROMPT = "Write one sentence about the sea."
LONG = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


async def check_handoff(pool: AdapterPool, scheduler: FairScheduler, names: Sequence[str]) -> None:
    """Two slots, both held by long requests (a and b) already streaming. A request for a
    third adapter waits ``slot_wait``, gets a slot by hand-off and finishes while the
    stopped request waits; the stopped request then goes on from its streamed tokens
    (prompt + them, by recompute). Every output equals the adapter's solo greedy output,
    and the usage counts the request as one. ``names``: three adapters registered for
    tenants of the same names."""
    a, b, c = names
    solo: dict[str, tuple[int, ...]] = {}
    prompt_tokens = 0
    for n, params in ((a, LONG), (b, LONG), (c, SHORT)):
        done = await pool.complete(PROMPT, adapter=n, tenant=n, params=params)
        solo[n], prompt_tokens = done.token_ids, done.usage.prompt_tokens
    assert scheduler.handoffs == 0  # one at a time: a slot was always free
    loop = asyncio.get_running_loop()
    streaming = {n: asyncio.Event() for n in (a, b)}
    done: dict[str, float] = {}

    async def run(n: str, params: SamplingParams) -> tuple[tuple[int, ...], Any]:
        ids: list[int] = []
        usage = None
        async for chunk in pool.generate(PROMPT, adapter=n, tenant=n, params=params):
            ids.extend(chunk.token_ids)
            if n in streaming and chunk.token_ids:
                streaming[n].set()
            usage = chunk.usage or usage
        done[n] = loop.time()
        return tuple(ids), usage

    runs = {n: asyncio.create_task(run(n, LONG)) for n in (a, b)}
    await asyncio.gather(*(e.wait() for e in streaming.values()))
    out_c, usage_c = await run(c, SHORT)
    out = {n: await t for n, t in runs.items()}
    assert scheduler.handoffs == 1
    assert any(done[n] > done[c] for n in (a, b)), "no slot was handed over: c went last"
    assert out_c == solo[c] and usage_c.completion_tokens == SHORT.max_tokens
    for n in (a, b):
        ids, usage = out[n]
        assert ids == solo[n], n  # the stopped one too: its continuation is exact
        assert usage.completion_tokens == LONG.max_tokens
        assert usage.prompt_tokens == prompt_tokens  # the prompt, not prompt + resumed ids
    assert pool.stats.failed == 0
