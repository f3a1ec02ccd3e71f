"""The seams in lorapool.abc: built-ins implement them, a user's object is checked once."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Hashable, Iterator
from pathlib import Path

import pytest

from lorapool import AdapterPool, InvalidRequest, Registry, TieredStore
from lorapool.abc import (
    Backend,
    EvictionPolicy,
    PrefetchPolicy,
    RegistryStore,
    Scheduler,
    Source,
    Warm,
    conform,
    lacks,
)
from lorapool.plugins import BACKENDS, POLICIES, SOURCES, available, load_policy, load_source
from lorapool.policies.prefetch import KeepWarm, Preload, SessionHint
from lorapool.registry import MemoryRegistryStore, SqliteRegistryStore
from lorapool.scheduler import FairScheduler, FCFSScheduler
from lorapool.store import Tier
from lorapool.testing import MockBackend
from lorapool.types import AdapterInfo


class FourMethodPolicy:
    """An eviction policy written against the four required methods only (FIFO)."""

    def __init__(self) -> None:
        self.order: list[Hashable] = []

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        self.order.append(key)

    def on_access(self, key: Hashable) -> None:
        pass

    def on_remove(self, key: Hashable) -> None:
        self.order.remove(key)

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        return next((k for k in self.order if k in evictable), None)


class NoVictim:
    def on_insert(self, key: Hashable, size: int, cost: float) -> None: ...
    def on_access(self, key: Hashable) -> None: ...
    def on_remove(self, key: Hashable) -> None: ...


def test_built_in_plugins_implement_their_seam() -> None:
    for name in available(POLICIES):
        assert isinstance(load_policy(name), EvictionPolicy), name
    for scheme in available(SOURCES):
        assert issubclass(load_source(scheme), Source), scheme
    assert {"torch", "vllm", "openai", "sglang", "tgi"} <= set(available(BACKENDS))
    for policy in (Preload(), SessionHint(), KeepWarm()):
        assert isinstance(policy, PrefetchPolicy)
    for store in (MemoryRegistryStore(),):
        assert isinstance(store, RegistryStore) and not lacks(store, RegistryStore)
    assert issubclass(SqliteRegistryStore, RegistryStore)
    for scheduler in (FCFSScheduler(), FairScheduler()):
        assert not lacks(scheduler, Scheduler)
    assert isinstance(MockBackend(), Backend) and not lacks(MockBackend(), Backend)


def test_conform_refuses_an_object_without_a_required_method_naming_it() -> None:
    assert lacks(NoVictim(), EvictionPolicy) == ["victim"]
    with pytest.raises(
        InvalidRequest, match=r"NoVictim is not an eviction policy: it lacks victim"
    ):
        conform(NoVictim(), EvictionPolicy, what="an eviction policy")
    with pytest.raises(TypeError, match="must be a policy name, class or object, not NoVictim"):
        TieredStore(eviction={"device": NoVictim()})


def test_conform_gives_a_missing_optional_method_the_seams_default() -> None:
    policy = FourMethodPolicy()
    assert lacks(policy, EvictionPolicy) == []
    with pytest.warns(DeprecationWarning, match="does not define expired"):
        wrapped = conform(policy, EvictionPolicy)
    assert wrapped is not policy and wrapped.expired() == ()
    # Everything else is the user's object: a tier over it evicts in its (FIFO) order.
    tier: Tier[str, int] = Tier("host", 10, wrapped)
    for key in ("a", "b"):
        tier.make_room(5, protected=lambda k: False)
        tier.put(key, 1, 5, cost=0.0)
    evicted = tier.make_room(5, protected=lambda k: False)
    assert evicted is not None and [k for k, _ in evicted] == ["a"] and policy.order == ["b"]
    assert tier.expire(protected=lambda k: False) == []
    # An object with every method is returned as it is, without a warning.
    assert conform(load_policy("lru"), EvictionPolicy) is not None


class MinimalRegistryStore:
    """A registry store with the required methods only (no version, invalidate, close)."""

    def __init__(self) -> None:
        self.rows: dict[str, AdapterInfo] = {}
        self.settings: dict[str, str] = {}

    def insert(self, info: AdapterInfo) -> None:
        self.rows[info.adapter_id] = info

    def delete(self, adapter_id: str) -> None:
        self.rows.pop(adapter_id, None)

    def records(self) -> Iterator[AdapterInfo]:
        return iter(list(self.rows.values()))

    def get_setting(self, key: str) -> str | None:
        return self.settings.get(key)

    def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            self.settings.pop(key, None)
        else:
            self.settings[key] = value


def test_a_registry_store_without_the_optional_methods_serves_a_registry() -> None:
    with pytest.warns(DeprecationWarning, match="version"):
        registry = Registry(MinimalRegistryStore())  # type: ignore[arg-type]
    assert registry.store.version() == 0
    registry.store.invalidate()  # the default: nothing cached
    assert len(registry) == 0
    registry.close()


class OnlyHints:
    """A prefetch policy that only reacts to session hints."""

    def on_hint(self, adapter_id: str) -> list[Warm]:
        return [Warm(adapter_id, "host")]


async def test_a_prefetch_policy_with_one_hook_gets_the_others_defaults(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="on_start"):
        store = TieredStore(prefetch=OnlyHints())  # type: ignore[arg-type]
    assert store.keep_warm() == frozenset()
    await store.aclose()


async def test_a_scheduler_without_tiers_or_hooks_is_given_the_defaults() -> None:
    class Plain(FCFSScheduler):
        pass

    inner = Plain()

    class Delegate:
        """A scheduler of the user's own, delegating to FCFS, without the optional methods."""

        queued = property(lambda self: inner.queued)
        bind = inner.bind
        acquire = inner.acquire
        charge = inner.charge
        cold_start = inner.cold_start
        release = inner.release
        kick = inner.kick

    with pytest.warns(DeprecationWarning, match="bind_handoff"):
        pool = AdapterPool(MockBackend(resume=True), scheduler=Delegate())  # type: ignore[arg-type]
    async with pool:
        assert pool.scheduler.tier_of("acme") is None
        assert pool.scheduler.queued_by_tier == {}
        await asyncio.sleep(0)
