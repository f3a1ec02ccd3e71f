"""The registry: SQLite durability across restarts, concurrent registrations, tenancy."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import AccessDenied, AdapterExists, AdapterNotFound
from lorapool.registry import Registry, SqliteRegistryStore
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
        # Names are scoped to their tenant: acme's "t/a0" is "acme/t/a0".
        listed = [a.adapter_id for a in pool.list_adapters(tenant="acme")]
        assert listed == ["acme/t/a0", "platform/t/a2"]
        assert [a.adapter_id for a in pool.list_adapters(tenant="globex")] == ["platform/t/a2"]
        again = pool.registry.resolve("t/a0", "acme")
        assert again == first  # every field, the config included
        out = await pool.complete("x", adapter="t/a0", tenant="acme", params=ONE)
        assert out.served_by == "adapter"
        with pytest.raises(AdapterExists):
            await pool.register("t/a0", str(dirs["t/a0"]), tenant="acme")
        with pytest.raises(AdapterNotFound):
            pool.registry.resolve("globex/t/a1", None)


async def test_pools_sharing_one_registry_file_see_each_others_changes(tmp_path: Path) -> None:
    """Two live pools (two replicas) on one SQLite file: no restart needed."""
    dirs = make_adapters(tmp_path, 2)
    db = tmp_path / "registry.sqlite"
    async with (
        AdapterPool(MockBackend(), registry=db) as one,
        AdapterPool(MockBackend(), registry=db) as two,
    ):
        await one.register("t/a0", str(dirs["t/a0"]), tenant="acme")
        assert [a.adapter_id for a in two.list_adapters(tenant="acme")] == ["acme/t/a0"]
        out = await two.complete("x", adapter="t/a0", tenant="acme", params=ONE)
        assert out.served_by == "adapter"
        with pytest.raises(AdapterExists):  # the id is taken, though `two` never registered it
            await two.register("t/a0", str(dirs["t/a1"]), tenant="acme")
        await two.register("t/a1", str(dirs["t/a1"]), tenant="acme", version="v1")
        assert one.registry.version_ids("acme/t/a1") == ["acme/t/a1@v1"]
        await one.unregister("t/a0", tenant="acme")
        with pytest.raises(AdapterNotFound):
            await two.complete("x", adapter="t/a0", tenant="acme", params=ONE)


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
        assert sorted(a.adapter_id for a in won) == sorted(names)  # "t/..." for tenant "t"
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
        with pytest.raises(AdapterNotFound) as missing:
            await pool.complete("x", adapter="acme/nothing-here", tenant="evil")
        for name, call in calls.items():
            # Another tenant's adapter is exactly a missing one: same type, same message.
            with pytest.raises(AdapterNotFound) as hidden:
                await call()
            assert str(hidden.value) == str(missing.value).replace("nothing-here", "secret")
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


async def test_versions_aliases_canary_rollback_and_restart(tmp_path: Path) -> None:
    import uuid

    from lorapool.errors import AdapterInUse

    dirs = make_adapters(tmp_path, 4)
    db = tmp_path / "registry.sqlite"
    src = [str(p) for p in dirs.values()]
    async with AdapterPool(MockBackend(), registry=db) as pool:
        v1 = await pool.register("acme/support", src[0], tenant="acme", version="v1")
        assert v1.adapter_id == "acme/support@v1"
        await pool.register("acme/support", src[1], tenant="acme", version="v2")
        out = await pool.complete("x", adapter="acme/support", tenant="acme", params=ONE)
        assert out.text.startswith("acme/support@v2")  # activating moved the alias
        with pytest.raises(AdapterExists):
            await pool.register("acme/support", src[2], tenant="acme", version="v2")
        # evil's "acme/support" is its own name, evil/acme/support: acme's is untouched.
        theirs = await pool.register("acme/support", src[2], tenant="evil", version="v3")
        assert theirs.adapter_id == "evil/acme/support@v3"
        out = await pool.complete("x", adapter="acme/support", tenant="evil", params=ONE)
        assert out.text.startswith("evil/acme/support@v3")
        await pool.unregister("acme/support", tenant="evil")
        with pytest.raises(AdapterNotFound):
            pool.set_traffic("acme/support", {"v1": 50, "v2": 50}, tenant="evil")
        with pytest.raises(AdapterNotFound):
            await pool.complete("x", adapter="acme/support", tenant="evil", params=ONE)
        assert pool.registry.alias("acme/support", "acme").versions == ["v1", "v2"]

        pool.set_traffic("acme/support", {"v1": 90, "v2": 10}, tenant="acme")
        alias = pool.registry.alias("acme/support", "acme")
        picks = [alias.pick(uuid.uuid4().hex) for _ in range(10_000)]
        assert abs(picks.count("v2") / 10_000 - 0.10) <= 0.02
        assert alias.pick("same-id") == alias.pick("same-id")  # deterministic per request
        with pytest.raises(AdapterInUse):
            await pool.unregister("acme/support@v2", tenant="acme")  # it has traffic

        assert pool.rollback("acme/support", tenant="acme") == {"v2": 100.0}
    # Everything is still there after a restart.
    async with AdapterPool(MockBackend(), registry=db) as pool:
        alias = pool.registry.alias("acme/support", "acme")
        assert alias.versions == ["v1", "v2"] and alias.traffic == {"v2": 100.0}
        assert [i.adapter_id for i in pool.versions("acme/support", tenant="acme")] == [
            "acme/support@v1",
            "acme/support@v2",
        ]
        assert pool.rollback("acme/support", tenant="acme") == {"v1": 100.0}  # before v2
        await pool.unregister("acme/support", tenant="acme")
        assert "acme/support" not in pool.registry and len(pool.registry) == 0


async def test_old_versions_beyond_the_limit_are_removed(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 4)
    registry = Registry(keep_versions=2)
    async with AdapterPool(MockBackend(), registry=registry) as pool:
        for i, path in enumerate(dirs.values()):
            await pool.register("t/x", str(path), tenant="t", version=f"v{i + 1}")
        assert registry.alias("t/x", "t").versions == ["v3", "v4"]
        assert "t/x@v1" not in registry and "t/x@v2" not in registry


async def test_names_are_scoped_to_their_tenant(tmp_path: Path) -> None:
    """acme's ``support`` and globex's ``support`` coexist; neither can learn of the other."""
    dirs = make_adapters(tmp_path, 3)
    src = [str(p) for p in dirs.values()]
    async with AdapterPool(MockBackend(), registry=Registry()) as pool:
        acme = await pool.register("support", src[0], tenant="acme")
        globex = await pool.register("support", src[1], tenant="globex")
        assert (acme.adapter_id, globex.adapter_id) == ("acme/support", "globex/support")
        for tenant in ("acme", "globex"):
            for name in ("support", f"{tenant}/support"):  # short or full, the tenant's own
                out = await pool.complete("x", adapter=name, tenant=tenant, params=ONE)
                assert out.text.startswith(f"{tenant}/support"), (tenant, name)
            assert [a.adapter_id for a in pool.list_adapters(tenant=tenant)] == [
                f"{tenant}/support"
            ]
        # "Already registered" only ever speaks of the caller's own names.
        with pytest.raises(AdapterExists, match="acme/support"):
            await pool.register("support", src[2], tenant="acme")
        # globex naming acme's full id reaches nothing of acme's.
        with pytest.raises(AdapterNotFound):
            await pool.complete("x", adapter="acme/support", tenant="globex", params=ONE)
        # The platform (tenant=None) names adapters by full id.
        assert pool.registry.resolve("globex/support", None) == globex
        await pool.unregister("support", tenant="globex")
        assert "acme/support" in pool.registry and "globex/support" not in pool.registry


async def test_a_shared_adapter_is_found_by_its_name_unless_the_tenant_has_its_own(
    tmp_path: Path,
) -> None:
    dirs = make_adapters(tmp_path, 3)
    src = [str(p) for p in dirs.values()]
    async with AdapterPool(MockBackend(), registry=Registry()) as pool:
        await pool.register("summarize", src[0], tenant="platform", shared=True)
        out = await pool.complete("x", adapter="summarize", tenant="acme", params=ONE)
        assert out.text.startswith("platform/summarize")
        await pool.register("summarize", src[1], tenant="acme")  # acme's own wins for acme
        out = await pool.complete("x", adapter="summarize", tenant="acme", params=ONE)
        assert out.text.startswith("acme/summarize")
        out = await pool.complete("x", adapter="platform/summarize", tenant="acme", params=ONE)
        assert out.text.startswith("platform/summarize")
        # A second shared adapter may not take a shared name: "summarize" must mean one thing.
        with pytest.raises(AdapterExists):
            await pool.register("summarize", src[2], tenant="ops", shared=True)


def test_tenant_names_cannot_forge_another_tenants_ids() -> None:
    from lorapool.errors import InvalidRequest
    from lorapool.registry import check_tenant, qualify

    assert qualify("support", "acme") == "acme/support"
    assert qualify("acme/support", "acme") == "acme/support"
    assert qualify("acme/support", "evil") == "evil/acme/support"
    for bad in ("", "a/b", "x" * 65, "../etc", "a b", "é"):
        with pytest.raises(InvalidRequest, match="tenant"):
            check_tenant(bad)


class _CrashBeforeAliases(SqliteRegistryStore):
    """A store that fails between a version's record and the alias that names it."""

    crash = False

    def set_setting(self, key: str, value: str | None) -> None:
        if self.crash:
            raise RuntimeError("the process died here")
        super().set_setting(key, value)


async def test_a_version_and_its_alias_are_written_in_one_transaction(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 2)
    src = [str(p) for p in dirs.values()]
    db = tmp_path / "registry.sqlite"
    store = _CrashBeforeAliases(db)
    async with AdapterPool(MockBackend(), registry=Registry(store)) as pool:
        await pool.register("support", src[0], tenant="acme", version="v1")
        store.crash = True
        with pytest.raises(RuntimeError, match="died"):
            await pool.register("support", src[1], tenant="acme", version="v2")
        store.crash = False
        assert pool.registry.version_ids("acme/support") == ["acme/support@v1"]
        assert "acme/support@v2" not in pool.registry
    # On disk too: no orphan version row blocks registering v2 again.
    reopened = SqliteRegistryStore(db)
    try:
        assert [i.adapter_id for i in reopened.records()] == ["acme/support@v1"]
    finally:
        reopened.close()
    async with AdapterPool(MockBackend(), registry=db) as pool:
        v2 = await pool.register("support", src[1], tenant="acme", version="v2")
        assert v2.adapter_id == "acme/support@v2"
    store.close()


async def test_a_full_registry_disk_is_a_typed_error_and_changes_nothing(tmp_path: Path) -> None:
    """SQLite's "database or disk is full" (a real one: the file may not grow) is typed."""
    from lorapool.errors import RegistryUnavailable

    dirs = make_adapters(tmp_path, 2)
    src = [str(p) for p in dirs.values()]
    registry = Registry.open(tmp_path / "registry.sqlite")
    async with AdapterPool(MockBackend(), registry=registry) as pool:
        kept = await pool.register("kept", src[0], tenant="acme")
        db = registry.store._conn()  # type: ignore[attr-defined]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        # Fill what room the last pages have left with another tenant's records.
        with pytest.raises(RegistryUnavailable, match="full") as full:
            for i in range(100_000):
                registry.store.insert(replace(kept, adapter_id=f"filler/{i}", tenant="filler"))
        assert "nothing was recorded" in str(full.value)
        with pytest.raises(RegistryUnavailable, match="full"):
            await pool.register("lost", src[1], tenant="acme")
        assert [a.adapter_id for a in pool.list_adapters(tenant="acme")] == ["acme/kept"]
        assert not pool.store.on_disk("acme/lost") and not pool.store.on_host("acme/lost")
        out = await pool.complete("x", adapter="kept", tenant="acme", params=ONE)
        assert out.served_by == "adapter"
