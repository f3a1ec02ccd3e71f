"""The store's counters (:class:`StoreStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TIERS", "StoreStats"]

TIERS = ("device", "host", "disk")
"""The store's tiers, nearest the device first."""


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
    """Moving average of the seconds a device load took (from wherever the adapter was)."""
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    """Requests' lookups that found the adapter in a tier (prefetches not counted)."""
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    """Requests' lookups that did not, and went to the next tier."""
    source_fetches: dict[str, int] = field(default_factory=dict)
    """Downloads into the disk tier by source scheme (``s3``, ``https``, ...)."""
