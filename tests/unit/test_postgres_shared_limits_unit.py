"""Rate limits shared across replicas (issue 31, item 3), with a bucket store in memory:
two pools' schedulers share a tenant's burst; a store that fails leaves each replica
limiting on its own (the per-process default) and it shares again once the store is
back; tenants without limits never reach the store."""

from __future__ import annotations

import pytest

from lorapool import AdapterPool
from lorapool.errors import RateLimited
from lorapool.sampling import SamplingParams
from lorapool.scheduler import FairScheduler, TenantConfig, TierPolicy
from lorapool.scheduler.shared_limits import SharedBucket, share_rate_limits
from lorapool.testing import MockBackend


class MemoryBuckets:
    """A BucketStore in a dict, on a clock that does not move (no refill)."""

    def __init__(self) -> None:
        self.levels: dict[str, float] = {}
        self.calls = 0
        self.broken = False

    def level(self, key: str, rate: float, burst: float) -> float:
        self.calls += 1
        if self.broken:
            raise ConnectionError("store down")
        return self.levels.get(key, burst)

    def take(self, key: str, rate: float, burst: float, amount: float) -> float:
        self.calls += 1
        if self.broken:
            raise ConnectionError("store down")
        self.levels[key] = self.levels.get(key, burst) - amount
        return self.levels[key]


def _scheduler(store: MemoryBuckets) -> FairScheduler:
    policy = TierPolicy(requests_per_s=0.001, request_burst=3)
    scheduler = FairScheduler(
        tenants=TenantConfig(
            tiers={"limited": policy, "free": TierPolicy()},
            tenant_tiers={"globex": "limited"},
            default_tier="free",
        )
    )
    share_rate_limits(scheduler, store, prefix="test:")
    return scheduler


async def _served(pools: list[AdapterPool], n: int, tenant: str = "globex") -> int:
    ok = 0
    for i in range(n):
        try:
            await pools[i % len(pools)].complete(
                "x", tenant=tenant, params=SamplingParams(max_tokens=1)
            )
            ok += 1
        except RateLimited as exc:
            assert exc.retry_after > 0
    return ok


async def test_two_replicas_share_one_burst() -> None:
    store = MemoryBuckets()
    async with (
        AdapterPool(MockBackend(), scheduler=_scheduler(store)) as one,
        AdapterPool(MockBackend(), scheduler=_scheduler(store)) as two,
    ):
        assert await _served([one, two], 8) == 3  # per replica: 6
        assert store.levels == {"test:globex:requests": 0.0}
        calls = store.calls
        assert await _served([one, two], 4, tenant="acme") == 4  # no limit: no store
        assert store.calls == calls


async def test_a_failing_store_limits_per_replica_until_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryBuckets()
    async with (
        AdapterPool(MockBackend(), scheduler=_scheduler(store)) as one,
        AdapterPool(MockBackend(), scheduler=_scheduler(store)) as two,
    ):
        assert await _served([one], 1) == 1  # one took 1 of the shared 3 (and of its own)
        store.broken = True
        assert await _served([one, two], 8) == 2 + 3  # each replica's own bucket
        assert "limiting per replica" in caplog.text
        store.broken = False
        assert await _served([one, two], 4) == 2  # shared again: 3 - 1 left


def test_a_shared_bucket_says_when_tokens_are_there() -> None:
    store = MemoryBuckets()
    bucket = SharedBucket(store, "k", rate=2.0, burst=4.0, clock=lambda: 0.0)
    assert bucket.wait_time(4) == 0 and bucket.try_take(4)
    assert bucket.wait_time(1) == pytest.approx(0.5)
    assert bucket.wait_time(5) == float("inf")
    store.levels["k"] = -1.0  # a race left a debt: the next token is 1 s away
    assert bucket.wait_time(1) == pytest.approx(1.0)
