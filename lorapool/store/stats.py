"""The store's counters (:class:`StoreStats`) and a plain latency histogram (:class:`Buckets`).

Nothing here depends on prometheus-client: the server's collector reads these
numbers at scrape time (``lorapool.server.metrics``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["LOAD_BUCKETS", "TIERS", "Buckets", "StoreStats"]

TIERS = ("device", "host", "disk")
"""The store's tiers, nearest the device first."""

LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the load-latency histograms: a slot copy to a download."""


class Buckets:
    """A histogram of observations under fixed upper bounds (``+Inf`` implied).

    ``counts[i]`` holds the observations in ``(bounds[i-1], bounds[i]]``, the last
    entry those above every bound; :meth:`cumulative` gives Prometheus' form.
    Observing is a bisect and two additions; read it from any thread (a reader may
    see one observation half counted, never a broken list).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LOAD_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be increasing and distinct")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        """The sum of the observations."""

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, observations <= it), ...]``, ending with ``(inf, count)``."""
        counts = list(self.counts)
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            out.append((bound, running))
        return out


def _per_tier() -> dict[str, dict[str, int]]:
    return {tier: {} for tier in TIERS}


@dataclass
class StoreStats:
    """Counters since the store started."""

    device_loads: int = 0
    host_loads: int = 0
    disk_fetches: int = 0
    fetched_bytes: int = 0
    fetch_retries: int = 0
    load_failures: int = 0
    integrity_failures: int = 0
    """Copies whose sha256 did not match the registration (refused, and dropped if cached)."""
    prefetches: int = 0
    prefetch_dropped: int = 0
    load_seconds: float = 1.0
    """Moving average of the seconds a device load took (from wherever the adapter was);
    the ``Retry-After`` of a rejected cold start. Distributions: :attr:`load_latency`."""
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    """Requests' lookups that found the adapter in a tier (prefetches not counted)."""
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    """Requests' lookups that did not, and went to the next tier."""
    source_fetches: dict[str, int] = field(default_factory=dict)
    """Downloads into the disk tier by source scheme (``s3``, ``https``, ...)."""
    load_latency: dict[str, Buckets] = field(
        default_factory=lambda: {tier: Buckets() for tier in TIERS}
    )
    """Seconds each completed fill of a tier took, by tier: ``device`` from the miss to
    the adapter in its slot (including the host fill below it, if any), ``host`` reading,
    verifying and preparing its bytes (including a download), ``disk`` a download from
    its source into the disk tier. Counts match the loads counted above."""
    adapter_loads: dict[str, dict[str, int]] = field(default_factory=_per_tier)
    """Completed fills by tier, then adapter id (``disk``: the adapter whose miss
    downloaded the copy)."""
    adapter_evictions: dict[str, dict[str, int]] = field(default_factory=_per_tier)
    """Evictions by tier, then adapter id: ``device`` and ``host`` only (the disk tier
    holds copies by content, which adapters may share)."""

    def loaded(self, tier: str, adapter_id: str, seconds: float) -> None:
        """A fill of ``tier`` with ``adapter_id`` completed in ``seconds``."""
        self.load_latency[tier].observe(seconds)
        counts = self.adapter_loads[tier]
        counts[adapter_id] = counts.get(adapter_id, 0) + 1

    def evicted(self, tier: str, adapter_id: str) -> None:
        """``adapter_id`` left ``tier`` to make room (or expired); totals stay in
        :attr:`evictions`."""
        counts = self.adapter_evictions[tier]
        counts[adapter_id] = counts.get(adapter_id, 0) + 1
