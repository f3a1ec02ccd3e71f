"""Every metric family of docs/metrics.md, from a real server after a mixed run.

uvicorn on 127.0.0.1 over a real AdapterPool (TorchBackend, the demo model, real PEFT
adapters); four tenants in two service tiers, four adapters on two device slots, cold
starts under ``fallback`` and evictions; ``/metrics`` parsed with prometheus_client's own
parser. The label caps are 2 tenants and 2 adapters, so ``other`` must appear. The
Grafana dashboard's queries use only families this server exports.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool, FairScheduler  # noqa: E402
from lorapool.scheduler import TenantConfig, TierPolicy  # noqa: E402
from lorapool.server import ApiKeys, create_app  # noqa: E402
from lorapool.server.metrics import OTHER, MetricsConfig  # noqa: E402

from .serving import serve_app  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
TENANTS = {"gold-1": "gold", "gold-2": "gold", "bronze-1": "bronze", "bronze-2": "bronze"}
ADAPTERS = {  # tenant: its adapter's test fixture
    "gold-1": "r8-attn",
    "gold-2": "r16-all",
    "bronze-1": "r32-attn",
    "bronze-2": "r16-qv-rslora",
}
PROMPT = "The three primary colours are"


def _families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _label_values(family: Any, label: str) -> set[str]:
    return {s.labels[label] for s in family.samples if label in s.labels}


async def _stream(client: Any, model: str, tokens: int = 6) -> str:
    stream = await client.completions.create(
        model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    return "".join([c.text async for e in stream for c in e.choices])


async def test_every_family_with_its_labels_and_capped_label_values(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=8, max_seq_len=256)
    scheduler = FairScheduler(
        tenants=TenantConfig(
            tiers={"gold": TierPolicy(), "bronze": TierPolicy(cold_start="fallback")},
            tenant_tiers={t: tier for t, tier in TENANTS.items()},
            default_tier="gold",
        )
    )
    pool = AdapterPool(backend, scheduler=scheduler)
    app = create_app(
        pool,
        auth=ApiKeys({f"key-{t}": t for t in TENANTS}),
        metrics_public=True,
        metrics_config=MetricsConfig(max_tenants=2, max_adapters=2),
    )
    async with serve_app(app) as running:
        import httpx

        for tenant, fixture in ADAPTERS.items():
            await pool.register("a", str(adapters[fixture]), tenant=tenant)
        clients = {
            t: openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key=f"key-{t}", max_retries=0)
            for t in TENANTS
        }
        try:
            # gold waits for its loads: both slots filled
            await _stream(clients["gold-1"], "gold-1/a")
            await _stream(clients["gold-2"], "gold-2/a")
            # bronze falls back to the base model while its adapter loads (evicting)
            for tenant in ("bronze-1", "bronze-2"):
                await _stream(clients[tenant], f"{tenant}/a")
                for _ in range(200):
                    if pool.store.on_device(f"{tenant}/a"):
                        break
                    await asyncio.sleep(0.05)
                assert pool.store.on_device(f"{tenant}/a")
            # on the device now: served by the adapter; gold-1 is loaded again
            await _stream(clients["bronze-2"], "bronze-2/a")
            await asyncio.gather(
                _stream(clients["gold-1"], "gold-1/a"),
                _stream(clients["gold-2"], pool.backend.capabilities.base_model),
            )
        finally:
            for client in clients.values():
                await client.close()
        async with httpx.AsyncClient(base_url=running.url) as http:
            text = (await http.get("/metrics")).text
    families = _families(text)

    # every family, with its labels
    labels = {
        "lorapool_ttft_seconds": {"tier", "tenant"},
        "lorapool_inter_token_seconds": {"tier", "tenant"},
        "lorapool_request_seconds": {"tier", "tenant"},
        "lorapool_requests": {"tier", "outcome"},
        "lorapool_fallbacks": {"tier", "tenant"},
        "lorapool_requests_running": {"tier"},
        "lorapool_requests_waiting": {"tier"},
        "lorapool_adapter_load_seconds": {"tier"},
        "lorapool_adapter_loads_by_adapter": {"tier", "adapter"},
        "lorapool_adapter_evictions_by_adapter": {"tier", "adapter"},
        "lorapool_forward_pass_adapters": set(),
        "lorapool_lora_slots": set(),
        "lorapool_tokens": {"tenant", "direction"},
        "lorapool_adapter_loads": {"tier"},
        "lorapool_evictions": {"tier"},
    }
    for name, want in labels.items():
        assert name in families, name
        family = families[name]
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == want, (name, sample)

    # histograms are histograms
    for name in (
        "lorapool_ttft_seconds",
        "lorapool_inter_token_seconds",
        "lorapool_request_seconds",
        "lorapool_adapter_load_seconds",
        "lorapool_forward_pass_adapters",
    ):
        assert families[name].type == "histogram", name

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    # tiers in the per-tier families; running and waiting for both tiers
    assert _label_values(families["lorapool_ttft_seconds"], "tier") == {"gold", "bronze"}
    assert _label_values(families["lorapool_requests_running"], "tier") >= {"gold", "bronze"}
    assert _label_values(families["lorapool_requests_waiting"], "tier") >= {"gold", "bronze"}
    assert samples[("lorapool_requests_running", (("tier", "gold"),))] == 0  # all ended

    # per-tenant caps: 2 tenants of their own (first come: the gold ones), the rest 'other'
    for name in (
        "lorapool_ttft_seconds",
        "lorapool_request_seconds",
        "lorapool_inter_token_seconds",
        "lorapool_tokens",
    ):
        tenants = _label_values(families[name], "tenant")
        assert OTHER in tenants, name
        assert len(tenants) <= 3, (name, tenants)
        assert tenants - {OTHER} <= {"gold-1", "gold-2"}, (name, tenants)
    # the bronze tenants' two fallbacks, under 'other'
    assert samples[("lorapool_fallbacks_total", (("tenant", OTHER), ("tier", "bronze")))] == 2
    # inter-token: one observation per token after the first chunk's
    itl = [v for (n, _), v in samples.items() if n == "lorapool_inter_token_seconds_count"]
    assert sum(itl) >= 7 * 4  # 7 streams of 6 tokens each: at least 4 later tokens apiece

    # per-adapter caps: 4 adapters loaded, 2 with series of their own
    loads = families["lorapool_adapter_loads_by_adapter"]
    adapter_values = _label_values(loads, "adapter")
    assert OTHER in adapter_values and len(adapter_values) <= 3, adapter_values
    per_adapter = defaultdict(float)
    for s in loads.samples:
        if s.labels["tier"] == "device":
            per_adapter[s.labels["adapter"]] += s.value
    assert sum(per_adapter.values()) == pool.store.stats.device_loads
    evictions = families["lorapool_adapter_evictions_by_adapter"]
    evicted = sum(s.value for s in evictions.samples if s.labels["tier"] == "device")
    assert evicted >= 2 and evicted == pool.store.stats.evictions["device"]
    assert len(_label_values(evictions, "adapter")) <= 3

    # load latency: a histogram by tier whose counts are the loads
    count = samples[("lorapool_adapter_load_seconds_count", (("tier", "device"),))]
    assert count == pool.store.stats.device_loads >= 4  # each adapter at least once
    assert samples[("lorapool_adapter_load_seconds_count", (("tier", "host"),))] >= 4

    # the engine's passes: every forward pass counted, by its distinct adapters
    stats = pool.backend.stats  # type: ignore[attr-defined]
    passes = samples[("lorapool_forward_pass_adapters_count", ())]
    assert passes == stats.steps + stats.prefill_steps
    assert samples[("lorapool_forward_pass_adapters_bucket", (("le", "0.0"),))] >= 1  # base
    assert samples[("lorapool_lora_slots", ())] == 2

    # the dashboard's queries name only families this server exports
    exported = {s.name for f in families.values() for s in f.samples} | set(families)
    for metric in dashboard_metrics():
        assert metric in exported, metric
    await pool.aclose()


def dashboard_metrics() -> set[str]:
    """The ``lorapool_*`` names in docs/grafana-dashboard.json's PromQL expressions."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\blorapool_[a-z_]+", expr)}
