"""No silent base-model answers: a request for an adapter that the base model answered (a
cold start under ``cold_start = "fallback"``) names the base model in ``model`` and says
``x-lorapool-served-by: base``, streamed or not; under ``wait`` the adapter answers and says
``adapter``. Uvicorn on loopback, TorchBackend with the real model and real PEFT adapters,
the official ``openai`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool, FairScheduler, SamplingParams  # noqa: E402
from lorapool.scheduler import TenantConfig, TierPolicy  # noqa: E402
from lorapool.server import ApiKeys, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

PROMPT = "The three primary colours are"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
KEYS = {"key-fb": "fbco", "key-wait": "waitco"}
METRICS_KEY = "metrics-key"


@dataclass
class Served:
    url: str
    pool: AdapterPool
    base: str

    def client(self, key: str) -> Any:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest_asyncio.fixture(loop_scope="session")
async def served(model_dir: Path, adapters: dict[str, Path]) -> AsyncIterator[Served]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=4, max_rank=32, max_batch=8, max_seq_len=256)
    scheduler = FairScheduler(
        tenants=TenantConfig(
            tiers={"fb": TierPolicy(cold_start="fallback"), "wt": TierPolicy(cold_start="wait")},
            tenant_tiers={"fbco": "fb", "waitco": "wt"},
        )
    )
    pool = AdapterPool(backend, scheduler=scheduler)
    app = create_app(pool, auth=ApiKeys(KEYS), metrics_key=METRICS_KEY)
    async with serve_app(app) as running:
        await pool.register("fbco/a", str(adapters["r8-attn"]), tenant="fbco")
        await pool.register("fbco/b", str(adapters["r16-all"]), tenant="fbco")
        await pool.register("waitco/a", str(adapters["r32-attn"]), tenant="waitco")
        await pool.register("waitco/b", str(adapters["r32-all"]), tenant="waitco")
        yield Served(running.url, pool, backend.capabilities.base_model)


async def test_a_fallback_names_the_base_model_and_says_so_and_wait_is_the_adapter(
    served: Served,
) -> None:
    pool = served.pool
    for adapter in ("fbco/a", "fbco/b", "waitco/a", "waitco/b"):
        assert not pool.store.on_device(adapter)  # every request below is a cold start
    base = (await pool.complete(PROMPT, adapter=None, tenant="fbco", params=GREEDY)).text

    # fallback, not streamed
    fb = served.client("key-fb")
    raw = await fb.completions.with_raw_response.create(
        model="fbco/a", prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert raw.headers["x-lorapool-served-by"] == "base"
    done = raw.parse()
    assert done.model == served.base and done.choices[0].text == base
    assert done.system_fingerprint

    # fallback, streamed (chat: the role first, then the text)
    async with fb.completions.with_streaming_response.create(
        model="fbco/b", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    ) as response:
        assert response.headers["x-lorapool-served-by"] == "base"
        events = [event async for event in await response.parse()]
    assert {e.model for e in events} == {served.base}
    assert "".join(e.choices[0].text for e in events if e.choices) == base

    # wait: the adapter's own answer, its own name
    wt = served.client("key-wait")
    raw = await wt.completions.with_raw_response.create(
        model="waitco/a", prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert raw.headers["x-lorapool-served-by"] == "adapter"
    done = raw.parse()
    own = await pool.complete(PROMPT, adapter="waitco/a", tenant="waitco", params=GREEDY)
    assert done.model == "waitco/a" and done.choices[0].text == own.text != base

    async with wt.chat.completions.with_streaming_response.create(
        model="waitco/b",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=8,
        temperature=0,
        stream=True,
    ) as response:
        assert response.headers["x-lorapool-served-by"] == "adapter"
        chunks = [event async for event in await response.parse()]
    assert {c.model for c in chunks} == {"waitco/b"}
    own_chat = await pool.complete(
        [{"role": "user", "content": PROMPT}], adapter="waitco/b", tenant="waitco", params=GREEDY
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == own_chat.text

    # the fallbacks were counted as such, the waits not: in the ledger and on /metrics
    assert pool.usage("fbco").fallbacks == 2 and pool.usage("waitco").fallbacks == 0
    async with httpx.AsyncClient(base_url=served.url, timeout=300) as http:
        scraped = await http.get("/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"})
    assert scraped.status_code == 200
    fallbacks = {
        (sample.labels["tier"], sample.labels["tenant"]): sample.value
        for family in text_string_to_metric_families(scraped.text)
        if family.name == "lorapool_fallbacks"
        for sample in family.samples
    }
    assert fallbacks.get(("fb", "fbco")) == 2
    assert fallbacks.get(("wt", "waitco"), 0) == 0
