"""The OpenAI-compatible server end to end: uvicorn on 127.0.0.1, TorchBackend with the real
model and real adapters, driven by the official ``openai`` client (AsyncOpenAI)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool, FairScheduler, SamplingParams  # noqa: E402
from lorapool.scheduler import TenantConfig, TierPolicy  # noqa: E402
from lorapool.server import ApiKeys, Caller, Registration, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

METRICS_KEY = "metrics-secret"
"""The credential /metrics asks for (it names tenants)."""

KEYS = {
    "key-acme": "acme",
    "key-globex": "globex",
    "key-admin": Caller("platform", admin=True),
    "key-slow": "slowco",
    "key-cold": "coldco",
}
PROMPT = "The three primary colours are"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@dataclass
class Served:
    url: str
    pool: AdapterPool
    server: Any

    def client(self, key: str | None) -> Any:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(model_dir: Path, adapters: dict[str, Path]) -> AsyncIterator[Served]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=3, max_rank=32, max_batch=8, max_seq_len=256)
    scheduler = FairScheduler(
        tenants=TenantConfig(
            tiers={
                "paid": TierPolicy(),
                "limited": TierPolicy(requests_per_s=0.01, request_burst=1),
                "no-cold-starts": TierPolicy(cold_start="reject"),
            },
            tenant_tiers={"slowco": "limited", "coldco": "no-cold-starts"},
            default_tier="paid",
        )
    )
    pool = AdapterPool(backend, scheduler=scheduler)
    root = str(adapters["r8-attn"].parent)  # where the test adapters live
    registration = Registration(tenant_sources=(root,), admin_sources=(root,))
    app = create_app(
        pool,
        auth=ApiKeys(KEYS),
        shutdown_timeout=30,
        registration=registration,
        metrics_key=METRICS_KEY,
    )
    async with serve_app(app) as running:
        await pool.register("acme/pirate", str(adapters["r8-attn"]), tenant="acme")
        await pool.register("acme/french", str(adapters["r16-all"]), tenant="acme")
        await pool.register("globex/legal", str(adapters["r32-attn"]), tenant="globex")
        await pool.register(
            "platform/summary", str(adapters["r16-qv-rslora"]), tenant="platform", shared=True
        )
        yield Served(running.url, pool, running.server)


async def test_chat_and_completions_stream_and_not_on_three_adapters_and_the_base(
    served: Served,
) -> None:
    client = served.client("key-acme")
    pool = served.pool
    base = served.pool.backend.capabilities.base_model
    for model, adapter in [
        ("acme/pirate", "acme/pirate"),
        ("acme/french", "acme/french"),
        (f"{base}:platform/summary", "platform/summary"),
        (base, None),
    ]:
        want = await pool.complete(PROMPT, adapter=adapter, tenant="acme", params=GREEDY)
        done = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=8, temperature=0
        )
        assert done.choices[0].text == want.text, model
        assert done.usage.completion_tokens == want.usage.completion_tokens
        stream = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        parts, usage = [], None
        async for event in stream:
            parts.extend(c.text for c in event.choices)
            usage = event.usage or usage
        assert "".join(parts) == want.text
        assert usage is not None and usage.completion_tokens == want.usage.completion_tokens

        messages = [{"role": "user", "content": "Name a colour."}]
        want_chat = await pool.complete(messages, adapter=adapter, tenant="acme", params=GREEDY)
        chat = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0
        )
        assert chat.choices[0].message.content == want_chat.text
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        text = "".join([e.choices[0].delta.content or "" async for e in stream if e.choices])
        assert text == want_chat.text
    await client.close()


async def test_models_list_shows_only_what_the_tenant_may_use(served: Served) -> None:
    base = served.pool.backend.capabilities.base_model
    acme = served.client("key-acme")
    globex = served.client("key-globex")
    assert {m.id async for m in acme.models.list()} == {
        base,
        "acme/pirate",
        "acme/french",
        "platform/summary",
    }
    assert {m.id async for m in globex.models.list()} == {base, "globex/legal", "platform/summary"}
    await acme.close()
    await globex.close()


async def test_errors_follow_openai_status_codes(served: Served, adapters: dict[str, Path]) -> None:
    acme = served.client("key-acme")
    with pytest.raises(openai.AuthenticationError):
        await served.client(None).models.list()
    with pytest.raises(openai.AuthenticationError):
        await served.client("wrong-key").models.list()
    # Another tenant's adapter is answered exactly like a missing one: 404, same body.
    with pytest.raises(openai.NotFoundError) as hidden:
        await acme.completions.create(model="globex/legal", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.NotFoundError) as missing:
        await acme.completions.create(model="globex/nope", prompt=PROMPT, max_tokens=4)
    assert hidden.value.body == {
        **missing.value.body,  # type: ignore[dict-item]
        "message": missing.value.body["message"].replace("globex/nope", "globex/legal"),  # type: ignore[index]
    }
    with pytest.raises(openai.NotFoundError):
        await acme.completions.create(model="acme/nope", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        await acme.completions.create(model="acme/pirate", prompt=PROMPT, max_tokens=-1)
    slow = served.client("key-slow")
    await slow.completions.create(
        model=served.pool.backend.capabilities.base_model, prompt=PROMPT, max_tokens=2
    )
    with pytest.raises(openai.RateLimitError) as err:
        await slow.completions.create(
            model=served.pool.backend.capabilities.base_model, prompt=PROMPT, max_tokens=2
        )
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["type"] == "rate_limit_exceeded"  # type: ignore[index]
    # A tier that refuses cold starts gets 503 + Retry-After while its adapter loads.
    await served.pool.register("coldco/a", str(adapters["r32-all"]), tenant="coldco")
    cold = served.client("key-cold")
    with pytest.raises(openai.InternalServerError) as err5:
        await cold.completions.create(model="coldco/a", prompt=PROMPT, max_tokens=2)
    assert err5.value.status_code == 503 and int(err5.value.response.headers["retry-after"]) >= 1
    assert err5.value.body["type"] == "adapter_loading"  # type: ignore[index]
    for _ in range(200):  # the rejected request started the load; once on the device, served
        if served.pool.store.on_device("coldco/a"):
            break
        await asyncio.sleep(0.05)
    done = await cold.completions.create(model="coldco/a", prompt=PROMPT, max_tokens=2)
    assert done.choices[0].text
    await acme.close()
    await slow.close()
    await cold.close()


async def test_load_and_unload_adapters_with_vllm_bodies(
    served: Served, adapters: dict[str, Path]
) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=served.url) as http:
        auth = {"Authorization": "Bearer key-globex"}
        r = await http.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "globex/new", "lora_path": str(adapters["r8-attn"])},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        globex = served.client("key-globex")
        done = await globex.completions.create(
            model="globex/new", prompt=PROMPT, max_tokens=4, temperature=0
        )
        assert done.choices[0].text
        r = await http.post(
            "/v1/unload_lora_adapter", json={"lora_name": "globex/new"}, headers=auth
        )
        assert r.status_code == 200
        with pytest.raises(openai.NotFoundError):
            await globex.completions.create(model="globex/new", prompt=PROMPT, max_tokens=4)
        # Another tenant's adapter cannot be unloaded, and answers exactly like a missing
        # one; shared needs an admin key.
        r = await http.post(
            "/v1/unload_lora_adapter", json={"lora_name": "acme/pirate"}, headers=auth
        )
        missing = await http.post(
            "/v1/unload_lora_adapter", json={"lora_name": "acme/no-such"}, headers=auth
        )
        assert r.status_code == missing.status_code == 404
        assert r.json() == {
            "error": {
                **missing.json()["error"],
                "message": missing.json()["error"]["message"].replace(
                    "acme/no-such", "acme/pirate"
                ),
            }
        }
        body = {"lora_name": "globex/shared", "lora_path": str(adapters["r8-attn"]), "shared": True}
        r = await http.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert r.status_code == 403
        r = await http.post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        await globex.close()


async def test_disconnect_cancels_the_request_in_the_engine(served: Served) -> None:
    client = served.client("key-acme")
    backend = served.pool.backend
    stream = await client.completions.create(
        model="acme/pirate", prompt="Write a long story.", max_tokens=200, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    for _ in range(100):
        if backend.live_sequences == 0:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    assert backend.live_sequences == 0  # type: ignore[attr-defined]
    assert served.pool.store.refs("acme/pirate") == 0
    done = await client.completions.create(model="acme/pirate", prompt=PROMPT, max_tokens=4)
    assert done.usage.completion_tokens >= 1  # the next request is served
    await client.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_health_ready_and_metrics(served: Served) -> None:
    import httpx

    out = ("lorapool_tokens_total", (("direction", "out"), ("tenant", "acme")))
    ok = ("lorapool_requests_total", (("outcome", "ok"), ("tier", "paid")))
    async with httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/health")).status_code == 200
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        # /metrics names tenants: not without its own credential (a tenant's key is not it).
        assert (await http.get("/metrics")).status_code == 404
        tenant_key = {"Authorization": "Bearer key-acme"}
        assert (await http.get("/metrics", headers=tenant_key)).status_code == 404
        scrape = {"Authorization": f"Bearer {METRICS_KEY}"}
        before = _samples((await http.get("/metrics", headers=scrape)).text)
        acme = served.client("key-acme")
        await acme.completions.create(
            model="acme/french",
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        await acme.close()
        text = (await http.get("/metrics", headers=scrape)).text
    after = _samples(text)
    assert after[out] == before.get(out, 0.0) + 5
    assert after[ok] == before.get(ok, 0.0) + 1
    assert after[("lorapool_resident_adapters", (("tier", "device"),))] >= 1
    hit = ("lorapool_tier_hits_total", (("tier", "device"),))
    assert after[hit] >= before.get(hit, 0.0) + 1  # acme/french was already on the device
    assert ("lorapool_queue_depth", (("tier", "paid"),)) in after
    assert ("lorapool_batch_distinct_adapters", ()) in after
    assert ("lorapool_tier_misses_total", (("tier", "host"),)) in after
    for family in (
        "lorapool_adapter_loads_total",
        "lorapool_resident_adapters",
        "lorapool_queue_depth",
        "lorapool_ttft_seconds_bucket",
        "lorapool_tokens_total",
        "lorapool_requests_total",
        "lorapool_evictions_total",
    ):
        assert family in text, family
    assert 'lorapool_tokens_total{direction="out",tenant="acme"}' in text
