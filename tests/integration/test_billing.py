"""Billing a stream its caller left, with the real TorchBackend and model: the tenant is billed
every token it received and its prompt as the engine counts it (the count a finished request
of the same prompt reports), in ``pool.usage``, in the audit of usage and in ``/metrics``;
through the pool's API and through the real server (uvicorn on loopback, httpx)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from lorapool import AdapterPool, SamplingParams, TenantUsage  # noqa: E402
from lorapool.server import ApiKeys, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."
ADAPTER = "acme/pirate"
K = 3  # chunks the caller reads before it leaves


@dataclass
class Served:
    url: str
    pool: AdapterPool
    prompt_tokens: int  # PROMPT's tokens, as the engine reports them for a finished request


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(model_dir: Path, adapters: dict[str, Path]) -> AsyncIterator[Served]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=4, max_seq_len=256)
    pool = AdapterPool(backend)
    app = create_app(
        pool, auth=ApiKeys({"key-acme": "acme", "key-ref": "reference"}), metrics_key="scrape"
    )
    async with serve_app(app) as running:
        await pool.register(ADAPTER, str(adapters["r8-attn"]), tenant="acme")
        done = await pool.complete(
            PROMPT, tenant="reference", params=SamplingParams(max_tokens=2, temperature=0)
        )
        yield Served(running.url, pool, done.usage.prompt_tokens)


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """``caplog``, capturing the audit of usage (logger ``lorapool.usage``)."""
    caplog.set_level(logging.INFO, logger="lorapool.usage")
    return caplog


async def billed_everywhere(
    served: Served, audit: pytest.LogCaptureFixture, before: TenantUsage
) -> tuple[int, int]:
    """What acme was billed since ``before``, once the audit's one line and /metrics agree."""
    after = served.pool.usage("acme")
    billed = (
        after.prompt_tokens - before.prompt_tokens,
        after.completion_tokens - before.completion_tokens,
    )
    [line] = [vars(r) for r in audit.records if r.name == "lorapool.usage"]
    assert (line["tenant"], line["adapter"], line["outcome"]) == ("acme", ADAPTER, "cancelled")
    assert (line["prompt_tokens"], line["completion_tokens"]) == billed
    totals = (after.prompt_tokens, after.completion_tokens)
    assert await tokens_in_metrics(served.url, "acme") == totals
    return billed


async def tokens_in_metrics(url: str, tenant: str) -> tuple[float, float]:
    """``lorapool_tokens_total`` of ``tenant`` as the server's /metrics says: (in, out)."""
    async with httpx.AsyncClient(base_url=url) as http:
        text = (await http.get("/metrics", headers={"Authorization": "Bearer scrape"})).text
    got = {
        s.labels["direction"]: s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "lorapool_tokens_total" and s.labels["tenant"] == tenant
    }
    return got.get("in", 0.0), got.get("out", 0.0)


async def test_a_stream_left_after_k_chunks_is_billed_what_it_received_and_its_prompt(
    served: Served, audit: pytest.LogCaptureFixture
) -> None:
    pool, before = served.pool, served.pool.usage("acme")
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    stream = pool.generate(PROMPT, adapter=ADAPTER, tenant="acme", params=params)
    received = [await stream.__anext__() for _ in range(K)]
    await stream.aclose()
    tokens = sum(len(c.token_ids) for c in received)
    assert tokens >= K
    assert await billed_everywhere(served, audit, before) == (served.prompt_tokens, tokens)


async def test_a_client_that_disconnects_is_billed_and_counted_in_metrics(
    served: Served, audit: pytest.LogCaptureFixture
) -> None:
    pool, before = served.pool, served.pool.usage("acme")
    body = {
        "model": ADAPTER,
        "prompt": PROMPT,
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": "Bearer key-acme"}
    received = 0
    async with (
        httpx.AsyncClient(base_url=served.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for event in response.aiter_lines():
            if event.startswith("data: ") and json.loads(event[6:])["choices"][0]["text"]:
                received += 1
            if received == K:
                break  # the client goes away: closing the response closes the connection
    async with asyncio.timeout(60):  # a hang guard: the server notices the disconnect
        while pool.usage("acme").failed == before.failed:
            await asyncio.sleep(0.05)
    prompt, completion = await billed_everywhere(served, audit, before)
    # The server streamed at least what the client read before it left.
    assert prompt == served.prompt_tokens and K <= completion < 200
