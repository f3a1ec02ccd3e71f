"""The metric label caps (LabelCap), the store's plain histogram (Buckets), and the
per-request observations (inter-token latency per token, fallbacks) of ServerMetrics."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

from lorapool.server.metrics import OTHER, LabelCap, MetricsConfig, ServerMetrics
from lorapool.store.stats import Buckets, StoreStats


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }


def test_first_come_values_keep_their_series_and_the_rest_are_other() -> None:
    cap = LabelCap(2)
    assert [cap.label(t) for t in ("acme", "globex", "initech", "acme")] == [
        "acme",
        "globex",
        OTHER,
        "acme",
    ]
    assert cap.label("umbrella") == OTHER
    assert cap.kept == ["acme", "globex"]


def test_values_first_seen_together_are_admitted_by_volume() -> None:
    cap = LabelCap(2)
    cap.label("early")
    folded = cap.fold({"small": 1, "big": 50, "early": 3, "mid": 10})
    assert folded == {"early": 3, "big": 50, OTHER: 11}
    # sticky: 'small' growing later does not move it out of 'other'
    assert cap.fold({"small": 1000, "big": 50, "early": 3, "mid": 10})[OTHER] == 1010


def test_a_cap_of_zero_puts_everything_in_other_and_lowering_keeps_what_was_admitted() -> None:
    assert LabelCap(0).label("acme") == OTHER
    cap = LabelCap(3)
    cap.label("a")
    cap.label("b")
    cap.limit = 1
    assert cap.label("b") == "b" and cap.label("c") == OTHER


def test_tenant_labels_are_capped_in_every_per_tenant_family() -> None:
    metrics = ServerMetrics(None, MetricsConfig(max_tenants=2))
    for tenant in ("t1", "t2", "t3", "t4"):
        observed = metrics.begin("paid", tenant, f"{tenant}/a")
        observed.first_chunk()
        observed.chunk(2)
        observed.finish("ok", served_by="base", fallback=True, usage=None)
    samples = _samples(metrics)
    for family in (
        "lorapool_ttft_seconds_count",
        "lorapool_inter_token_seconds_count",
        "lorapool_request_seconds_count",
        "lorapool_fallbacks_total",
    ):
        tenants = {dict(labels)["tenant"] for name, labels in samples if name == family}
        assert tenants == {"t1", "t2", OTHER}, family
    assert samples[("lorapool_fallbacks_total", (("tenant", OTHER), ("tier", "paid")))] == 2
    assert samples[("lorapool_ttft_seconds_count", (("tenant", OTHER), ("tier", "paid")))] == 2


def test_setting_the_config_changes_the_caps() -> None:
    metrics = ServerMetrics(None)
    metrics.config = MetricsConfig(max_tenants=1, max_adapters=0)
    assert metrics.begin("paid", "a", None).tenant_label == "a"
    assert metrics.begin("paid", "b", None).tenant_label == OTHER
    assert metrics.adapters.label("x") == OTHER


def test_inter_token_latency_is_one_observation_per_token_sharing_the_gap() -> None:
    metrics = ServerMetrics(None)
    observed = metrics.begin("paid", "acme", None)
    observed.first_chunk()
    time.sleep(0.02)
    observed.chunk(1)
    time.sleep(0.04)
    observed.chunk(4)  # four tokens in one chunk: four observations of a quarter of the gap
    observed.chunk(0)  # no tokens: nothing observed
    observed.finish("ok", served_by="adapter", fallback=False, usage=None)
    samples = _samples(metrics)
    key = (("tenant", "acme"), ("tier", "paid"))
    assert samples[("lorapool_inter_token_seconds_count", key)] == 5
    total = samples[("lorapool_inter_token_seconds_sum", key)]
    assert 0.06 <= total < 1.0  # the two gaps, each counted once in all
    assert ("lorapool_fallbacks_total", key) not in samples  # served by its adapter


def test_buckets_are_cumulative_with_an_inf_bucket() -> None:
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        b.observe(v)
    assert b.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert b.count == 4 and b.total == pytest.approx(3.65)
    with pytest.raises(ValueError):
        Buckets((1.0, 0.5))


def test_store_stats_count_loads_and_evictions_per_adapter() -> None:
    stats = StoreStats()
    stats.loaded("device", "acme/a", 0.2)
    stats.loaded("device", "acme/a", 0.3)
    stats.evicted("device", "acme/a")
    stats.loaded("host", "acme/b", 0.01)
    assert stats.adapter_loads["device"] == {"acme/a": 2}
    assert stats.adapter_evictions["device"] == {"acme/a": 1}
    assert stats.load_latency["device"].count == 2
    assert stats.load_latency["host"].count == 1 and stats.load_latency["disk"].count == 0


def test_the_pool_collector_caps_adapters_and_reads_running_and_waiting() -> None:
    from lorapool import AdapterPool
    from lorapool.testing import MockBackend

    pool = AdapterPool(MockBackend())
    stats: Any = pool.store.stats
    for i in range(4):
        stats.loaded("device", f"t/a{i}", 0.1 * (i + 1))
        for _ in range(i):
            stats.evicted("device", f"t/a{i}")
    metrics = ServerMetrics(pool, MetricsConfig(max_adapters=2))
    samples = _samples(metrics)
    loads = {
        dict(labels)["adapter"]: v
        for (name, labels), v in samples.items()
        if name == "lorapool_adapter_loads_by_adapter_total" and dict(labels)["tier"] == "device"
    }
    # admitted by volume at the first scrape (a3, a2), the rest summed as 'other'
    assert loads == {"t/a3": 1, "t/a2": 1, OTHER: 2}
    assert samples[("lorapool_adapter_load_seconds_count", (("tier", "device"),))] == 4
    assert samples[("lorapool_requests_running", (("tier", "default"),))] == 0
    assert samples[("lorapool_requests_waiting", (("tier", "default"),))] == 0
