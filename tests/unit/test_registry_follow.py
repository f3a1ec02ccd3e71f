"""Replicas sharing a registry store drop what another replica removed (RegistryFollower)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.errors import AdapterNotFound
from lorapool.registry import Registry
from lorapool.registry.follow import RegistryFollower
from lorapool.testing import MockBackend

from .test_store import make_adapters

ONE = SamplingParams(max_tokens=1)


async def test_the_follower_calls_back_once_per_change_and_survives_errors() -> None:
    version = [0]
    calls: list[int] = []

    async def changed() -> None:
        calls.append(version[0])
        if len(calls) == 1:
            raise RuntimeError("first one fails")

    follower = RegistryFollower(lambda: version[0], changed, interval=0.01)
    follower.start()
    await asyncio.sleep(0.05)
    assert calls == []
    version[0] = 1
    await asyncio.sleep(0.05)
    version[0] = 2
    await asyncio.sleep(0.05)
    await follower.aclose()
    await follower.aclose()
    assert calls == [1, 2] and follower.changes == 2
    with pytest.raises(ValueError):
        RegistryFollower(lambda: 0, changed, interval=0)


async def _wait_gone(pool: AdapterPool, key: str) -> None:
    for _ in range(500):
        if not any(i.adapter_id == key for i in pool.store.held()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} still held: device {pool.store.on_device(key)}")


async def test_a_replica_drops_what_another_unregistered_or_forgot(tmp_path: Path) -> None:
    """Two pools on one SQLite registry file, each with its own tiers: an unregister and a
    forget through one leave no copy in the other's slots or RAM (local sources have no
    disk-tier copy; the PostgreSQL replica test checks the disk tier with S3-like copies)."""
    dirs = make_adapters(tmp_path, 2)
    db = tmp_path / "registry.sqlite"
    a_backend, b_backend = MockBackend(), MockBackend()
    a = AdapterPool(
        a_backend, store=TieredStore(disk_dir=tmp_path / "a"), registry=Registry.open(db)
    )
    b = AdapterPool(
        b_backend, store=TieredStore(disk_dir=tmp_path / "b"), registry=Registry.open(db)
    )
    async with a, b:
        for name, path in dirs.items():
            await a.register(name.split("/")[1], str(path), tenant="t")
        for name in dirs:
            await b.complete("x", adapter=name, tenant="t", params=ONE)
            assert b.store.on_device(name) and b.store.on_host(name)  # local: no disk copy
        await a.unregister("a0", tenant="t")
        await _wait_gone(b, "t/a0")
        assert "t/a0" in b_backend.unloads and not b.store.on_host("t/a0")
        await a.forget("a1", tenant="t")
        await _wait_gone(b, "t/a1")
        assert "t/a1" in b_backend.unloads and not b.store.on_host("t/a1")
        with pytest.raises(AdapterNotFound):
            await b.complete("x", adapter="t/a1", tenant="t", params=ONE)
        assert b.follower.changes >= 2
