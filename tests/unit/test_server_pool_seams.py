"""What the server reads from an in-process pool's scheduler: a tenant's tier for metric
labels, and the queue depth per tier (``all`` for a scheduler without tiers)."""

from __future__ import annotations

import asyncio

import pytest

from lorapool import AdapterPool, FairScheduler, FCFSScheduler, SamplingParams, TierPolicy
from lorapool.scheduler import TenantConfig
from lorapool.server.metrics import ServerMetrics
from lorapool.server.served import LocalPool
from lorapool.testing import MockBackend

pytest.importorskip("prometheus_client")


def _tiered() -> FairScheduler:
    return FairScheduler(
        tenants=TenantConfig(
            tiers={"gold": TierPolicy(), "std": TierPolicy()}, tenant_tiers={"acme": "gold"}
        )
    )


def _queue_depth(pool: AdapterPool) -> dict[str, float]:
    text = ServerMetrics(pool).render().decode()
    depth = {}
    for line in text.splitlines():
        if line.startswith("lorapool_queue_depth{"):
            labels, value = line.split(" ")
            depth[labels.split('tier="')[1].rstrip('"}')] = float(value)
    return depth


def test_a_tenants_tier_is_the_schedulers_or_default() -> None:
    assert LocalPool(AdapterPool(MockBackend())).tier_of("acme") == "default"
    local = LocalPool(AdapterPool(MockBackend(), scheduler=_tiered()))
    assert (local.tier_of("acme"), local.tier_of("other")) == ("gold", "std")


async def test_queue_depth_per_tier_or_all_without_tiers() -> None:
    assert _queue_depth(AdapterPool(MockBackend(), scheduler=_tiered())) == {
        "gold": 0.0,
        "std": 0.0,
    }
    pool = AdapterPool(MockBackend(max_batch=1, token_delay=0.01), scheduler=FCFSScheduler())
    assert _queue_depth(pool) == {"all": 0.0}
    one = SamplingParams(max_tokens=50)
    running = pool.generate("x", tenant="t", params=one)
    await running.__anext__()  # the only place is taken
    waiting = asyncio.create_task(anext(aiter(pool.generate("x", tenant="u", params=one))))
    await asyncio.sleep(0)
    assert _queue_depth(pool) == {"all": 1.0}
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await running.aclose()
    await pool.aclose()
