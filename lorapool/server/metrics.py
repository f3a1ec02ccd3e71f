"""Prometheus metrics for a served pool (``lorapool_*``).

Per-request families (TTFT, latency, requests) are observed by the server as
requests finish; pool state (loads, evictions, resident adapters, queue depth)
and the tokens billed to each tenant (``lorapool_tokens_total``, from the pool's
ledger: the same numbers as ``pool.usage(tenant)`` and the audit of usage, on
every exit path) are read from the pool at scrape time by a collector, so the
pool itself never depends on prometheus-client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from lorapool.pool import AdapterPool
    from lorapool.types import Usage

__all__ = ["CONTENT_TYPE", "MetricsConfig", "RequestMetrics", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_TOKENS = "lorapool_tokens"
_TOKENS_HELP = "Tokens billed by tenant and direction (in: prompt, out: completion)"


class MetricsConfig(BaseModel):
    """How many label values the per-tenant and per-adapter families may take.

    Beyond the cap, the rest are counted under the label value ``other``, so a server
    with ten thousand tenants does not export ten thousand series per family.
    """

    model_config = ConfigDict(extra="forbid")

    max_tenants: int = Field(default=100, ge=0)
    """Tenants with series of their own in the per-tenant families."""
    max_adapters: int = Field(default=100, ge=0)
    """Adapters with series of their own in the per-adapter families."""


class _PoolCollector(Collector):
    """Reads the ledger's, store's and scheduler's counters when Prometheus scrapes."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(_TOKENS, _TOKENS_HELP, labels=["tenant", "direction"])
        for tenant, usage in sorted(self.pool.stats.by_tenant().items()):
            tokens.add_metric([tenant, "in"], usage.prompt_tokens)
            tokens.add_metric([tenant, "out"], usage.completion_tokens)
        yield tokens
        store, stats = self.pool.store, self.pool.store.stats
        loads = CounterMetricFamily(
            "lorapool_adapter_loads", "Adapter loads into a tier", labels=["tier"]
        )
        loads.add_metric(["device"], stats.device_loads)
        loads.add_metric(["host"], stats.host_loads)
        loads.add_metric(["disk"], stats.disk_fetches)
        yield loads
        failures = CounterMetricFamily(
            "lorapool_adapter_load_failures", "Loads that failed", labels=["kind"]
        )
        failures.add_metric(["load"], stats.load_failures)
        failures.add_metric(["integrity"], stats.integrity_failures)
        yield failures
        for name, counts, what, label in (
            ("lorapool_evictions", stats.evictions, "Adapters evicted from a tier", "tier"),
            (
                "lorapool_tier_hits",
                stats.hits,
                "Requests that found their adapter in a tier",
                "tier",
            ),
            ("lorapool_tier_misses", stats.misses, "Requests that went past a tier", "tier"),
            (
                "lorapool_source_fetches",
                stats.source_fetches,
                "Adapter downloads by source scheme",
                "source",
            ),
        ):
            family = CounterMetricFamily(name, what, labels=[label])
            for key, n in counts.items():
                family.add_metric([key], n)
            yield family
        seconds = GaugeMetricFamily(
            "lorapool_adapter_load_seconds", "Recent time to make an adapter resident"
        )
        seconds.add_metric([], stats.load_seconds)
        yield seconds
        resident = GaugeMetricFamily(
            "lorapool_resident_adapters", "Adapters on the device", labels=["tier"]
        )
        resident.add_metric(["device"], len(store.resident))
        yield resident
        batch = GaugeMetricFamily(
            "lorapool_batch_distinct_adapters", "Distinct adapters among requests in flight"
        )
        batch.add_metric([], store.in_use)
        yield batch
        host = GaugeMetricFamily("lorapool_host_bytes", "Host-tier bytes in use")
        host.add_metric([], store.host_bytes)
        yield host
        queue = GaugeMetricFamily(
            "lorapool_queue_depth", "Requests waiting for dispatch", labels=["tier"]
        )
        by_tier = self.pool.scheduler.queued_by_tier  # empty without service tiers
        for tier, n in by_tier.items():
            queue.add_metric([tier], n)
        if not by_tier:
            queue.add_metric(["all"], self.pool.scheduler.queued)
        yield queue


class ServerMetrics:
    """The metric families of one server, in their own registry.

    With an in-process ``pool``, ``lorapool_tokens_total`` is the pool's ledger, read
    at scrape time; :attr:`tokens` is then a counter outside the registry (what is
    added to it is not exported), kept only for code that still adds to it.
    Without one (pools on Ray Serve replicas, which hold their own ledgers),
    :attr:`tokens` is the exported counter, counting what the server adds.
    """

    def __init__(self, pool: AdapterPool | None, config: MetricsConfig | None = None) -> None:
        self.config = config if config is not None else MetricsConfig()
        self.registry = CollectorRegistry()
        if pool is not None:  # pools elsewhere (Ray replicas) report their own state
            self.registry.register(_PoolCollector(pool))
        self.requests = Counter(
            "lorapool_requests",
            "Requests by tenant tier and outcome",
            ["tier", "outcome"],
            registry=self.registry,
        )
        self.counts_tokens = pool is None
        """Whether the server counts tokens itself (no in-process ledger to read)."""
        self.tokens = Counter(
            _TOKENS,
            _TOKENS_HELP,
            ["tenant", "direction"],
            registry=self.registry if pool is None else None,
        )
        self.ttft = Histogram(
            "lorapool_ttft_seconds",
            "Time to first token by tenant tier",
            ["tier"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorapool_request_seconds",
            "Whole-request latency by tenant tier",
            ["tier"],
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def begin(self, tier: str, tenant: str, adapter: str | None) -> RequestMetrics:
        """Start observing one generation request (its clock starts now)."""
        return RequestMetrics(self, tier, tenant, adapter)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class RequestMetrics:
    """The observations of one generation request, made by the server as it goes.

    ``refused`` (it ended before its first chunk), or ``first_chunk`` then one
    ``chunk`` per later chunk, then ``finish``. The families it feeds are
    :class:`ServerMetrics`'; the clock starts when :meth:`ServerMetrics.begin` is called.
    """

    def __init__(self, metrics: ServerMetrics, tier: str, tenant: str, adapter: str | None):
        self.metrics = metrics
        self.tier = tier
        self.tenant = tenant
        self.adapter = adapter
        self.started = time.perf_counter()
        self.last = self.started
        self.ttft: float | None = None

    def refused(self, outcome: str) -> None:
        """The request ended before its first chunk (``outcome``: the error's class name)."""
        self.metrics.requests.labels(self.tier, outcome).inc()

    def first_chunk(self) -> float:
        """The first chunk arrived; returns the time to it (seconds)."""
        self.last = time.perf_counter()
        self.ttft = self.last - self.started
        self.metrics.ttft.labels(self.tier).observe(self.ttft)
        return self.ttft

    def chunk(self, tokens: int) -> None:
        """A later chunk carrying ``tokens`` new tokens arrived (inter-token latency)."""
        self.last = time.perf_counter()

    def finish(self, outcome: str, *, served_by: str, fallback: bool, usage: Usage | None) -> float:
        """The request ended (``outcome``: ``ok``, ``cancelled`` or an error's class name).

        ``served_by`` is ``adapter`` or ``base``; ``fallback`` says the base model answered
        in place of the adapter asked for. Returns the request's seconds.
        """
        elapsed = time.perf_counter() - self.started
        m = self.metrics
        m.requests.labels(self.tier, outcome).inc()
        m.latency.labels(self.tier).observe(elapsed)
        if usage is not None and m.counts_tokens:
            # Pools elsewhere (Ray replicas) bill in their own ledgers and audit logs;
            # here, the usage the stream reported. An in-process pool's ledger is read
            # at scrape time instead, every exit path included.
            m.tokens.labels(self.tenant, "in").inc(usage.prompt_tokens)
            m.tokens.labels(self.tenant, "out").inc(usage.completion_tokens)
        return elapsed
