"""The store's generic get-or-fill (:class:`lorapool.store.ladder.Rung`) on a dict-backed tier."""

from __future__ import annotations

import asyncio

import pytest

from lorapool.store.ladder import Rung
from lorapool.store.stats import StoreStats


class FakeTier:
    """A tier over a dict that records every lookup and counts fills."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self.lookups: list[tuple[str, bool]] = []
        self.fills = 0

    def lookup(self, key: str, use: bool) -> str | None:
        self.lookups.append((key, use))
        return self.entries.get(key)

    async def fill(self, key: str, *, gate: asyncio.Event | None = None) -> str:
        """Bring ``key`` in (after ``gate`` opens) and keep it."""
        self.fills += 1
        if gate is not None:
            await gate.wait()
        self.entries[key] = f"value of {key}"
        return self.entries[key]


def counts(stats: StoreStats, tier: str = "host") -> tuple[int, int]:
    return stats.hits[tier], stats.misses[tier]


async def test_a_hit_returns_the_entry_and_fills_nothing() -> None:
    tier, stats = FakeTier(), StoreStats()
    tier.entries["a"] = "cached"
    rung = Rung("host", tier.lookup, stats)
    assert await rung.get("a", lambda: tier.fill("a")) == "cached"
    assert tier.fills == 0
    assert tier.lookups == [("a", True)]  # a request's lookup is a use
    assert counts(stats) == (1, 0)


async def test_a_miss_fills_once_and_counts_one_miss() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung = Rung("host", tier.lookup, stats)
    assert await rung.get("a", lambda: tier.fill("a")) == "value of a"
    assert tier.fills == 1 and tier.entries == {"a": "value of a"}
    assert counts(stats) == (0, 1)
    assert await rung.get("a", lambda: tier.fill("a")) == "value of a"
    assert tier.fills == 1
    assert counts(stats) == (1, 1)
    assert "a" not in rung.flights


async def test_concurrent_misses_share_one_fill() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung = Rung("disk", tier.lookup, stats)
    gate = asyncio.Event()
    waiters = [
        asyncio.create_task(rung.get("a", lambda: tier.fill("a", gate=gate))) for _ in range(10)
    ]
    async with asyncio.timeout(10):  # hang guard
        while len(tier.lookups) < 10:
            await asyncio.sleep(0)
        assert "a" in rung.flights and len(rung.flights) == 1
        gate.set()
        values = await asyncio.gather(*waiters)
    assert values == ["value of a"] * 10
    assert tier.fills == 1
    assert counts(stats, "disk") == (0, 10)  # every request's lookup missed
    assert "a" not in rung.flights


async def test_misses_for_different_keys_fill_separately() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung = Rung("host", tier.lookup, stats)
    values = await asyncio.gather(
        rung.get("a", lambda: tier.fill("a")), rung.get("b", lambda: tier.fill("b"))
    )
    assert list(values) == ["value of a", "value of b"]
    assert tier.fills == 2 and counts(stats) == (0, 2)


async def test_a_failed_fill_leaves_nothing_and_the_next_caller_fills_again() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung = Rung("host", tier.lookup, stats)
    gate = asyncio.Event()
    attempts = 0

    async def broken() -> str:
        nonlocal attempts
        attempts += 1
        await gate.wait()
        raise OSError("connection reset")

    waiters = [asyncio.create_task(rung.get("a", broken)) for _ in range(3)]
    async with asyncio.timeout(10):  # hang guard
        while len(tier.lookups) < 3:
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
    assert attempts == 1
    assert all(isinstance(r, OSError) and str(r) == "connection reset" for r in results)
    assert "a" not in rung.flights and len(rung.flights) == 0
    assert tier.entries == {}
    assert counts(stats) == (0, 3)
    # The next caller starts a fill of its own, which succeeds.
    assert await rung.get("a", lambda: tier.fill("a")) == "value of a"
    assert tier.fills == 1 and attempts == 1
    assert counts(stats) == (0, 4)


async def test_a_cancelled_caller_leaves_the_shared_fill_running() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung = Rung("host", tier.lookup, stats)
    gate = asyncio.Event()
    first = asyncio.create_task(rung.get("a", lambda: tier.fill("a", gate=gate)))
    second = asyncio.create_task(rung.get("a", lambda: tier.fill("a", gate=gate)))
    async with asyncio.timeout(10):  # hang guard
        while len(tier.lookups) < 2:
            await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await second == "value of a"
    assert tier.fills == 1 and tier.entries == {"a": "value of a"}


async def test_a_prefetch_counts_nothing_and_does_not_use_the_entry() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung = Rung("host", tier.lookup, stats)
    assert await rung.get("a", lambda: tier.fill("a"), speculative=True) == "value of a"
    assert await rung.get("a", lambda: tier.fill("a"), speculative=True) == "value of a"
    assert tier.fills == 1
    assert tier.lookups == [("a", False), ("a", False)]
    assert counts(stats) == (0, 0)


async def test_the_fills_result_is_returned_even_when_the_tier_did_not_keep_it() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung = Rung("host", tier.lookup, stats)

    async def served_uncached() -> str:
        return "uncached"

    assert await rung.get("a", served_uncached) == "uncached"
    assert tier.lookups == [("a", True)]  # no second lookup without recheck
    assert counts(stats) == (0, 1)


async def test_recheck_looks_up_again_and_fills_again_until_the_entry_is_there() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung: Rung[str, str | None] = Rung("device", tier.lookup, stats, recheck=True)
    results: list[str | None] = [None, "slot"]  # a prefetch's load that found no room, then ours

    async def fill() -> str | None:
        value = results.pop(0)
        if value is not None:
            tier.entries["a"] = value
        return value

    assert await rung.get("a", fill) == "slot"
    assert results == []
    # Lookups: the miss, after the fill that placed nothing, after the one that did.
    assert tier.lookups == [("a", True)] * 3
    assert counts(stats, "device") == (0, 1)  # one request, one miss


async def test_recheck_does_not_apply_to_a_prefetch() -> None:
    tier, stats = FakeTier(), StoreStats()
    rung: Rung[str, str | None] = Rung("device", tier.lookup, stats, recheck=True)

    async def no_room() -> str | None:
        return None

    assert await rung.get("a", no_room, speculative=True) is None
    assert tier.lookups == [("a", False)]
    assert counts(stats, "device") == (0, 0)
