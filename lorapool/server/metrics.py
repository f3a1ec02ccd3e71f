"""Prometheus metrics for a served pool (``lorapool_*``); every family in docs/metrics.md.

Per-request families (TTFT, inter-token latency, latency, requests, fallbacks) are
observed by the server as each request goes (:class:`RequestMetrics`). Pool state
(requests running and waiting, loads and their latency, evictions, resident
adapters, queue depth, the engine's adapters per forward pass) and the tokens billed
to each tenant (``lorapool_tokens_total``, from the pool's ledger: the same numbers as
``pool.usage(tenant)`` and the audit of usage, on every exit path) are read from the
pool at scrape time by a collector, so the pool itself never depends on
prometheus-client: the store and the engine keep plain counts and buckets.

Per-tenant and per-adapter labels are capped (:class:`MetricsConfig`): the first
``max_tenants`` tenants (``max_adapters`` adapters) seen get series of their own, for
good; the rest are counted under ``other`` (:class:`LabelCap`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

from lorapool.errors import BackendError

if TYPE_CHECKING:
    from lorapool.pool import AdapterPool
    from lorapool.store.stats import Buckets
    from lorapool.types import Usage

__all__ = ["CONTENT_TYPE", "OTHER", "LabelCap", "MetricsConfig", "RequestMetrics", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip

OTHER = "other"
"""The label value of the tenants (adapters) beyond the cap."""

_TOKENS = "lorapool_tokens"
_TOKENS_HELP = "Tokens billed by tenant and direction (in: prompt, out: completion)"
_NO_TIERS = "default"
"""The tier label without service tiers (the server's ``tier_of`` says the same)."""


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


class LabelCap:
    """At most ``limit`` distinct label values; the rest are :data:`OTHER`.

    First come, first kept: a value gets its own series the first time it is seen
    while there is room, and keeps it for the life of the process; once the cap is
    reached every new value is ``other``. Series therefore never move between a name
    and ``other``, so counters stay monotonic and ``rate()`` stays right (choosing the
    top values by volume at each scrape would move counts between series). Values
    first seen together at one scrape are admitted by volume (:meth:`admit`).
    Lowering ``limit`` keeps the values already admitted and admits no more.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: dict[str, None] = {}
        self._lock = threading.Lock()

    def label(self, value: str) -> str:
        """``value`` if it has (or now gets) a series of its own, else ``other``."""
        if value in self._kept:
            return value
        with self._lock:
            if value in self._kept:
                return value
            if len(self._kept) < self.limit:
                self._kept[value] = None
                return value
        return OTHER

    def admit(self, volumes: Mapping[str, float]) -> None:
        """Admit the values not seen yet, largest volume first, while there is room."""
        new = [v for v in volumes if v not in self._kept]
        for value in sorted(new, key=lambda v: (-volumes[v], v)):
            if self.label(value) == OTHER:
                break

    def fold(self, counts: Mapping[str, float]) -> dict[str, float]:
        """``counts`` by label: the admitted values' own, the rest summed as ``other``."""
        self.admit(counts)
        out: dict[str, float] = {}
        for value, n in counts.items():
            key = self.label(value)
            out[key] = out.get(key, 0) + n
        return out

    @property
    def kept(self) -> list[str]:
        """The values with series of their own, in the order they were admitted."""
        return list(self._kept)


def _le(bound: float) -> str:
    """A bucket's upper bound as the exposition writes it (``1.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_buckets(family: HistogramMetricFamily, labels: list[str], buckets: Buckets) -> None:
    cumulative = [(_le(bound), float(n)) for bound, n in buckets.cumulative()]
    family.add_metric(labels, cumulative, sum_value=buckets.total)


class _PoolCollector(Collector):
    """Reads the ledger's, store's, scheduler's and engine's counters when Prometheus scrapes."""

    def __init__(self, pool: AdapterPool, metrics: ServerMetrics) -> None:
        self.pool = pool
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._tokens()
        yield from self._requests()
        yield from self._store()
        yield from self._engine()
        yield from self._prefix_cache()
        yield from self._canary()

    def _tokens(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(_TOKENS, _TOKENS_HELP, labels=["tenant", "direction"])
        usage = self.pool.stats.by_tenant()
        tenants = self.metrics.tenants
        tenants.admit({t: u.prompt_tokens + u.completion_tokens for t, u in usage.items()})
        for direction, counts in (
            ("in", {t: u.prompt_tokens for t, u in usage.items()}),
            ("out", {t: u.completion_tokens for t, u in usage.items()}),
        ):
            for tenant, n in sorted(tenants.fold(counts).items()):
                tokens.add_metric([tenant, direction], n)
        yield tokens

    def _requests(self) -> Iterator[Metric]:
        """Requests running (dispatched: holding a place in the engine's batch, their
        adapter's load included) and waiting (queued for dispatch), by service tier."""
        scheduler = self.pool.scheduler
        waiting = dict(scheduler.queued_by_tier) or {_NO_TIERS: scheduler.queued}
        open_by_tier = dict.fromkeys(waiting, 0)
        for tenant, u in self.pool.stats.by_tenant().items():
            ended = u.completed + u.failed + u.refused + u.expired
            tier = scheduler.tier_of(tenant) or _NO_TIERS
            open_by_tier[tier] = open_by_tier.get(tier, 0) + max(u.requests - ended, 0)
        running = GaugeMetricFamily(
            "lorapool_requests_running",
            "Requests dispatched to the engine and not yet ended, by tenant tier",
            labels=["tier"],
        )
        queued = GaugeMetricFamily(
            "lorapool_requests_waiting",
            "Requests waiting in the scheduler's queue for dispatch, by tenant tier",
            labels=["tier"],
        )
        for tier in sorted(open_by_tier):
            wait = waiting.get(tier, 0)
            queued.add_metric([tier], wait)
            running.add_metric([tier], max(open_by_tier[tier] - wait, 0))
        yield running
        yield queued
        depth = GaugeMetricFamily(
            "lorapool_queue_depth", "Requests waiting for dispatch", labels=["tier"]
        )
        by_tier = scheduler.queued_by_tier  # empty without service tiers
        for tier, n in by_tier.items():
            depth.add_metric([tier], n)
        if not by_tier:
            depth.add_metric(["all"], scheduler.queued)
        yield depth

    def _store(self) -> Iterator[Metric]:
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
        adapters = self.metrics.adapters
        volume: dict[str, float] = {}
        for per_tier in (*stats.adapter_loads.values(), *stats.adapter_evictions.values()):
            for adapter, n in list(per_tier.items()):
                volume[adapter] = volume.get(adapter, 0) + n
        adapters.admit(volume)
        for name, per, what in (
            (
                "lorapool_adapter_loads_by_adapter",
                stats.adapter_loads,
                "Completed loads into a tier, by adapter (disk: downloads its requests caused)",
            ),
            (
                "lorapool_adapter_evictions_by_adapter",
                stats.adapter_evictions,
                "Evictions from the device and host tiers, by adapter",
            ),
        ):
            family = CounterMetricFamily(name, what, labels=["tier", "adapter"])
            for tier, counts in per.items():
                for adapter, total in sorted(adapters.fold(dict(counts)).items()):
                    family.add_metric([tier, adapter], total)
            yield family
        seconds = _histogram(
            "lorapool_adapter_load_seconds",
            "Seconds a completed fill of a tier took (device: miss to slot, everything below "
            "included; host: read, verify, prepare; disk: download)",
            ["tier"],
        )
        for tier, buckets in stats.load_latency.items():
            _add_buckets(seconds, [tier], buckets)
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

    def _engine(self) -> Iterator[Metric]:
        backend = self.pool.backend
        try:
            caps = backend.capabilities
        except BackendError:  # not started (or closed): no engine to read
            return
        slots = GaugeMetricFamily("lorapool_lora_slots", "Device adapter slots (vLLM's max_lora)")
        slots.add_metric([], caps.max_slots)
        yield slots
        if not caps.pass_stats:
            return
        passes = backend.adapters_per_pass()
        family = _histogram(
            "lorapool_forward_pass_adapters",
            "Distinct adapters in each forward pass, counted by the engine at every pass "
            "(0: base model only)",
            [],
        )
        bounds = range(max(caps.max_slots, max(passes, default=0)) + 1)
        buckets: list[tuple[str, float]] = []
        below = 0
        for n in bounds:
            below += passes.get(n, 0)
            buckets.append((_le(n), float(below)))
        buckets.append(("+Inf", float(sum(passes.values()))))
        family.add_metric([], buckets, sum_value=float(sum(n * c for n, c in passes.items())))
        yield family

    def _prefix_cache(self) -> Iterator[Metric]:
        """The engine's prefix cache now (``Capabilities.prefix_cache``): its bytes and
        the blocks it gave up to its budget. Its hits are counted per request, from the
        usage (:meth:`RequestMetrics.finish`)."""
        backend = self.pool.backend
        try:
            caps = backend.capabilities
        except BackendError:  # not started (or closed): no engine to read
            return
        stats = backend.prefix_cache_stats() if caps.prefix_cache else None
        if stats is None:
            return
        size = GaugeMetricFamily(
            "lorapool_prefix_cache_bytes",
            "Memory the engine's prefix (KV) cache holds now, within its budget",
        )
        size.add_metric([], stats.cached_bytes)
        yield size
        evictions = CounterMetricFamily(
            "lorapool_prefix_cache_evictions",
            "Prefix-cache blocks given up to stay within the budget",
        )
        evictions.add_metric([], stats.evictions)
        yield evictions

    def _canary(self) -> Iterator[Metric]:
        """Canaries the pool's canary watch rolled back by itself, by alias (capped with the
        adapters)."""
        family = CounterMetricFamily(
            "lorapool_canary_rollbacks",
            "Canary versions rolled back automatically by the canary watch, by alias",
            labels=["adapter"],
        )
        rollbacks = dict(self.pool.canary.rollbacks)
        for adapter, n in sorted(self.metrics.adapters.fold(rollbacks).items()):
            family.add_metric([adapter], n)
        yield family


class ServerMetrics:
    """The metric families of one server, in their own registry.

    With an in-process ``pool``, ``lorapool_tokens_total`` is the pool's ledger, read
    at scrape time; :attr:`tokens` is then a counter outside the registry (what is
    added to it is not exported), kept only for code that still adds to it.
    Without one (pools on Ray Serve replicas, which hold their own ledgers),
    :attr:`tokens` is the exported counter, counting what the server adds, and the
    pool-state families (running, waiting, loads, ...) are the replicas' to export.
    """

    def __init__(self, pool: AdapterPool | None, config: MetricsConfig | None = None) -> None:
        self._config = config if config is not None else MetricsConfig()
        self.tenants = LabelCap(self._config.max_tenants)
        """The per-tenant label cap, shared by every per-tenant family."""
        self.adapters = LabelCap(self._config.max_adapters)
        """The per-adapter label cap."""
        self.registry = CollectorRegistry()
        if pool is not None:  # pools elsewhere (Ray replicas) report their own state
            self.registry.register(_PoolCollector(pool, self))
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
            "Time to first token by tenant tier and tenant",
            ["tier", "tenant"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "lorapool_inter_token_seconds",
            "Inter-token latency by tenant tier and tenant: one observation per token after "
            "the first, each a chunk's gap divided by its tokens",
            ["tier", "tenant"],
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorapool_request_seconds",
            "Whole-request latency by tenant tier and tenant",
            ["tier", "tenant"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "lorapool_fallbacks",
            "Requests the base model served while their adapter loaded (cold-start fallback)",
            ["tier", "tenant"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lorapool_prompt_tokens",
            "Prompt tokens of the requests that reported usage, by tenant tier",
            ["tier"],
            registry=self.registry,
        )
        self.prefix_hit_tokens = Counter(
            "lorapool_prefix_cache_hit_tokens",
            "Of those, tokens whose keys and values came from the engine's prefix cache "
            "(usage's cached_tokens), by tenant tier",
            ["tier"],
            registry=self.registry,
        )

    @property
    def config(self) -> MetricsConfig:
        """The label caps; setting it changes them (values already admitted keep theirs)."""
        return self._config

    @config.setter
    def config(self, config: MetricsConfig) -> None:
        self._config = config
        self.tenants.limit = config.max_tenants
        self.adapters.limit = config.max_adapters

    def begin(self, tier: str, tenant: str, adapter: str | None) -> RequestMetrics:
        """Start observing one generation request (its clock starts now)."""
        return RequestMetrics(self, tier, tenant, adapter)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)

    def names(self) -> Iterable[str]:
        """Every sample name this server can export (``_bucket``, ``_total``, ... included)."""
        for family in self.registry.collect():
            yield family.name
            match family.type:
                case "counter":
                    yield f"{family.name}_total"
                case "histogram":
                    yield from (f"{family.name}_{s}" for s in ("bucket", "sum", "count"))


class RequestMetrics:
    """The observations of one generation request, made by the server as it goes.

    ``refused`` (it ended before its first chunk), or ``first_chunk`` then one
    ``chunk`` per later chunk, then ``finish``. The families it feeds are
    :class:`ServerMetrics`'; the clock starts when :meth:`ServerMetrics.begin` is called.
    ``tenant_label`` is the tenant's label in the per-tenant families (``other`` past
    the cap).
    """

    def __init__(self, metrics: ServerMetrics, tier: str, tenant: str, adapter: str | None):
        self.metrics = metrics
        self.tier = tier
        self.tenant = tenant
        self.tenant_label = metrics.tenants.label(tenant)
        self.adapter = adapter
        self.started = time.perf_counter()
        self.last = self.started
        self.ttft: float | None = None
        self._itl: Any = None  # the inter-token series, bound at the first later chunk

    def refused(self, outcome: str) -> None:
        """The request ended before its first chunk (``outcome``: the error's class name)."""
        self.metrics.requests.labels(self.tier, outcome).inc()

    def first_chunk(self) -> float:
        """The first chunk arrived; returns the time to it (seconds)."""
        self.last = time.perf_counter()
        self.ttft = self.last - self.started
        self.metrics.ttft.labels(self.tier, self.tenant_label).observe(self.ttft)
        return self.ttft

    def chunk(self, tokens: int) -> None:
        """A later chunk carrying ``tokens`` new tokens arrived (inter-token latency).

        The gap since the previous chunk with tokens is shared evenly by this chunk's
        tokens: one observation per token, so the histogram's count is the tokens after
        the first chunk and its sum the time they took (``sum / count``: the mean time
        per output token). A chunk without tokens observes nothing and restarts no clock.
        """
        if tokens <= 0:
            return
        now = time.perf_counter()
        gap = (now - self.last) / tokens
        self.last = now
        if self._itl is None:
            self._itl = self.metrics.itl.labels(self.tier, self.tenant_label)
        for _ in range(tokens):
            self._itl.observe(gap)

    def finish(self, outcome: str, *, served_by: str, fallback: bool, usage: Usage | None) -> float:
        """The request ended (``outcome``: ``ok``, ``cancelled`` or an error's class name).

        ``served_by`` is ``adapter`` or ``base``; ``fallback`` says the base model answered
        in place of the adapter asked for (counted in ``lorapool_fallbacks_total``).
        Returns the request's seconds.
        """
        elapsed = time.perf_counter() - self.started
        m = self.metrics
        m.requests.labels(self.tier, outcome).inc()
        m.latency.labels(self.tier, self.tenant_label).observe(elapsed)
        if fallback:
            m.fallbacks.labels(self.tier, self.tenant_label).inc()
        if usage is not None:
            m.prompt_tokens.labels(self.tier).inc(usage.prompt_tokens)
            m.prefix_hit_tokens.labels(self.tier).inc(usage.cached_tokens)
        if usage is not None and m.counts_tokens:
            # Pools elsewhere (Ray replicas) bill in their own ledgers and audit logs;
            # here, the usage the stream reported. An in-process pool's ledger is read
            # at scrape time instead, every exit path included.
            m.tokens.labels(self.tenant_label, "in").inc(usage.prompt_tokens)
            m.tokens.labels(self.tenant_label, "out").inc(usage.completion_tokens)
        return elapsed
