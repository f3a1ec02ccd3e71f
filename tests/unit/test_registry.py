"""The registry: SQLite durability across restarts, concurrent registrations, tenancy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import AccessDenied, AdapterExists, AdapterNotFound
from lorapool.registry import Registry
from lorapool.registry_store import SqliteRegistryStore
from lorapool.testing import MockBackend

from .test_store import make_adapters

ONE = SamplingParams(max_tokens=1)


async def test_registrations_survive_a_restart(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 3)
    db = tmp_path / "registry.sqlite"
    async with AdapterPool(MockBackend(), registry=db) as pool:
        first = await pool.register("t/a0", str(dirs["t/a0"]), tenant="acme")
        await pool.register("t/a1", str(dirs["t/a1"]), tenant="globex")
        await pool.register("t/a2", str(dirs["t/a2"]), tenant="platform", shared=True)
        await pool.unregister("t/a1", tenant="globex")
    async with AdapterPool(MockBackend(), registry=db) as pool:
        assert [a.adapter_id for a in pool.list_adapters(tenant="acme")] == ["t/a0", "t/a2"]
        assert [a.adapter_id for a in pool.list_adapters(tenant="globex")] == ["t/a2"]
        again = pool.registry.resolve("t/a0", "acme")
        assert again == first  # every field, the config included
        out = await pool.complete("x", adapter="t/a0", tenant="acme", params=ONE)
        assert out.served_by == "adapter"
        with pytest.raises(AdapterExists):
            await pool.register("t/a0", str(dirs["t/a0"]), tenant="acme")
        with pytest.raises(AdapterNotFound):
            pool.registry.resolve("t/a1", None)


async def test_concurrent_registrations_are_safe(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 8)
    db = tmp_path / "registry.sqlite"
    async with AdapterPool(MockBackend(), registry=db) as pool:
        names = list(dirs)
        attempts = [(name, dirs[name]) for name in names for _ in range(3)]
        results = await asyncio.gather(
            *(pool.register(name, str(path), tenant="t") for name, path in attempts),
            return_exceptions=True,
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == len(names) and all(isinstance(e, AdapterExists) for e in lost)
        assert sorted(a.adapter_id for a in won) == sorted(names)
    store = SqliteRegistryStore(db)
    try:
        assert sorted(i.adapter_id for i in store.records()) == sorted(names)
    finally:
        store.close()


async def test_a_tenant_cannot_touch_another_tenants_private_adapter(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 2)
    async with AdapterPool(MockBackend(), registry=Registry()) as pool:
        await pool.register("acme/secret", str(dirs["t/a0"]), tenant="acme")
        await pool.register("platform/shared", str(dirs["t/a1"]), tenant="platform", shared=True)
        calls = {
            "generate": lambda: pool.complete("x", adapter="acme/secret", tenant="evil"),
            "pin": lambda: pool.pin("acme/secret", tenant="evil"),
            "unpin": lambda: pool.unpin("acme/secret", tenant="evil"),
            "unload": lambda: pool.unload("acme/secret", tenant="evil"),
            "prefetch": lambda: pool.prefetch("acme/secret", tenant="evil"),
            "unregister": lambda: pool.unregister("acme/secret", tenant="evil"),
        }
        for name, call in calls.items():
            with pytest.raises(AccessDenied):
                await call()
            assert "acme/secret" in pool.registry, name
        assert not pool.store.on_device("acme/secret") and not pool.store.pinned
        assert [a.adapter_id for a in pool.list_adapters(tenant="evil")] == ["platform/shared"]
        # The shared adapter is usable by everyone but changeable only by its owner.
        out = await pool.complete("x", adapter="platform/shared", tenant="evil", params=ONE)
        assert out.served_by == "adapter"
        with pytest.raises(AccessDenied):
            await pool.unregister("platform/shared", tenant="evil")
        # The owner still has everything.
        assert (await pool.complete("x", adapter="acme/secret", tenant="acme", params=ONE)).text
