"""TieredStore logic over MockBackend: tiers, retries, prefetch, keep-warm, memory."""

from __future__ import annotations

import asyncio
import gc
import shutil
import tracemalloc
from collections import Counter
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.abc import EvictionPolicy, TierName
from lorapool.errors import LoadError, SourceError, SourceNotFound
from lorapool.plugins import policies_for_tiers
from lorapool.policies import DEFAULT_EVICTION, LRUPolicy
from lorapool.policies.prefetch import KeepWarm, Preload, SessionHint
from lorapool.registry import Registry
from lorapool.sources import LocalSource
from lorapool.testing import ManualClock, MockBackend
from lorapool.types import LoadedAdapter

from .test_formats_peft import make_dir

ONE = SamplingParams(max_tokens=1)


def make_adapters(tmp_path: Path, n: int, width: int = 8) -> dict[str, Path]:
    out = {}
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [4, width],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [width, 4],
    }
    for i in range(n):
        d = tmp_path / f"a{i}"
        d.mkdir()
        out[f"t/a{i}"] = make_dir(d, {"lora_alpha": 8 + i}, tensors)
    return out


class FlakySource(LocalSource):
    """A remote-looking source (``flaky://<path>``) that fails on demand."""

    def __init__(self) -> None:
        self.transient_failures: Counter[str] = Counter()
        self.permanent: set[str] = set()
        self.calls: Counter[str] = Counter()

    def local_path(self, uri: str) -> Path | None:
        return None

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        self.calls[name] += 1
        path = uri.removeprefix("flaky://")
        if path in self.permanent:
            raise SourceError(uri, "access denied", transient=False)
        if self.transient_failures[name] > 0:
            self.transient_failures[name] -= 1
            raise SourceError(uri, "connection reset", transient=True)
        return await super().fetch(path, name, dest)


async def drain(store: TieredStore) -> None:
    while store._pending:
        await asyncio.gather(*list(store._pending), return_exceptions=True)


# -- policies per tier -------------------------------------------------------------------


def test_policies_for_tiers() -> None:
    defaults = policies_for_tiers(None)
    assert set(defaults) == {"device", "host", "disk"}
    for tier, policy in defaults.items():
        assert type(policy).__module__.endswith(DEFAULT_EVICTION[tier])
    by_name = policies_for_tiers("lru")
    assert all(isinstance(p, LRUPolicy) for p in by_name.values())
    assert len({id(p) for p in by_name.values()}) == 3  # one instance per tier
    mine = LRUPolicy()
    assert policies_for_tiers(mine)["device"] is mine
    mixed = policies_for_tiers({"host": LRUPolicy, "disk": "sieve"})
    assert isinstance(mixed["host"], LRUPolicy) and type(mixed["disk"]).__name__ == "SievePolicy"
    with pytest.raises(ValueError, match="unknown tiers"):
        policies_for_tiers({"gpu": "lru"})
    with pytest.raises(TypeError, match="policy name, class or object"):
        policies_for_tiers(42)
    with pytest.raises(LookupError, match="available"):
        policies_for_tiers("no-such-policy")


# -- sources: retries, failures ------------------------------------------------------


async def test_remote_register_retries_transient_errors_and_refuses_permanent(
    tmp_path: Path,
) -> None:
    dirs = make_adapters(tmp_path, 2)
    source = FlakySource()
    store = TieredStore(disk_dir=tmp_path / "disk", sources={"flaky": source}, retry_backoff=0)
    async with AdapterPool(MockBackend(), store=store) as pool:
        source.transient_failures["adapter_model.safetensors"] = 2
        await pool.register("t/a0", f"flaky://{dirs['t/a0']}", tenant="t")
        assert store.stats.fetch_retries == 2
        assert store.on_disk("t/a0")

        source.permanent.add(str(dirs["t/a1"]))
        with pytest.raises(SourceError, match="access denied"):
            await pool.register("t/a1", f"flaky://{dirs['t/a1']}", tenant="t")
        assert [a.adapter_id for a in pool.list_adapters(tenant="t")] == ["t/a0"]

        source.transient_failures["adapter_config.json"] = store.retries + 1
        await store.unload("t/a0", tiers=("device", "host", "disk"))
        with pytest.raises(LoadError) as err:
            await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert err.value.tier == "source" and "connection reset" in str(err.value)
        assert store.refs("t/a0") == 0 and not store.on_device("t/a0")
        # The next request succeeds once the source recovers.
        done = await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert done.finish_reason == "length"


async def test_local_adapter_changed_after_registration_is_refused(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 2)
    async with AdapterPool(MockBackend()) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        make_dir(dirs["t/a0"].parent, {"lora_alpha": 99})  # rewrite the files in place
        with pytest.raises(LoadError, match="sha256 mismatch"):
            await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert not pool.store.on_host("t/a0")
        assert (await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)).text
        shutil.rmtree(dirs["t/a1"])
        await pool.store.unload("t/a1")
        with pytest.raises(LoadError, match="cannot read"):
            await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)


async def test_registering_a_missing_remote_adapter(tmp_path: Path) -> None:
    store = TieredStore(disk_dir=tmp_path / "disk", sources={"flaky": FlakySource()})
    async with AdapterPool(MockBackend(), store=store) as pool:
        with pytest.raises(SourceNotFound, match="flaky://"):
            await pool.register("t/x", f"flaky://{tmp_path / 'nothing'}", tenant="t")
        assert len(pool.registry) == 0
        assert list((tmp_path / "disk" / ".tmp").iterdir()) == []


# -- capacity and residency ----------------------------------------------------------


async def test_host_tier_keeps_in_use_adapters_and_its_capacity(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 5)
    size = (dirs["t/a0"] / "adapter_model.safetensors").stat().st_size
    store = TieredStore(host_bytes=int(size * 2.5), eviction="lru")
    backend = MockBackend(max_slots=4, token_delay=0.01)
    async with AdapterPool(backend, store=store) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        long = asyncio.create_task(
            pool.complete("x", adapter="t/a0", tenant="t", params=SamplingParams(max_tokens=40))
        )
        await asyncio.sleep(0.05)
        for name in ("t/a1", "t/a2", "t/a3"):
            await pool.complete("x", adapter=name, tenant="t", params=ONE)
            assert store.on_host("t/a0"), "an adapter in use left the host tier"
            assert store.host_bytes <= store.host_capacity
        await long
        await pool.complete("x", adapter="t/a4", tenant="t", params=ONE)
        assert store.host_bytes <= store.host_capacity
        assert store.stats.evictions["host"] >= 2


async def test_unload_frees_host_memory(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 4, width=1 << 16)  # ~2 MiB of weights each
    async with AdapterPool(MockBackend(max_slots=4)) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for name in dirs:
                await pool.complete("x", adapter=name, tenant="t", params=ONE)
            loaded = tracemalloc.get_traced_memory()[0] - baseline
            assert pool.store.host_bytes >= 4 * 2 * 1 << 20
            assert loaded >= pool.store.host_bytes
            for name in dirs:
                await pool.unload(name, tenant="t")
            gc.collect()
            after = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        assert pool.store.host_bytes == 0 and pool.store.resident == {}
        assert after < loaded / 20, (loaded, after)


# -- prefetch ------------------------------------------------------------------------


async def test_prefetch_warms_the_device_and_session_uses_it(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 3)
    backend = MockBackend(max_slots=3)
    async with AdapterPool(backend, store=TieredStore(prefetch=SessionHint())) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        assert await pool.prefetch("t/a0", tenant="t", wait=True) == "device"
        assert pool.store.on_device("t/a0")
        async with pool.session("t", adapter="t/a1") as session:
            await drain(pool.store)
            assert pool.store.on_device("t/a1")
            loads = len(backend.loads)
            out = await session.complete("hello")
            assert out.text and len(backend.loads) == loads  # no load on the request path
        assert pool.store.stats.prefetches >= 2


async def test_hint_storm_cannot_evict_the_working_set(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 10)
    size = (dirs["t/a0"] / "adapter_model.safetensors").stat().st_size
    store = TieredStore(host_bytes=size * 4, max_pending_prefetch=4, prefetch_rate=1000)
    async with AdapterPool(MockBackend(max_slots=3), store=store) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        working = ["t/a0", "t/a1", "t/a2"]
        for name in working:
            await pool.complete("x", adapter=name, tenant="t", params=ONE)
        for _ in range(5):
            for i in range(3, 10):
                await pool.prefetch(f"t/a{i}", tenant="t")
        assert len(store._pending) <= 4
        await drain(store)
        assert store.stats.prefetch_dropped > 0
        assert set(working) == set(store.resident)
        assert all(store.on_host(n) for n in working)
        assert store.host_bytes <= store.host_capacity
        # A speculative entry gives way to the next speculative one, never to used ones.
        assert await pool.prefetch("t/a9", tenant="t", wait=True) in ("host", "disk")


async def test_prefetch_rate_limit_uses_the_store_clock(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 3)
    clock = ManualClock()
    store = TieredStore(prefetch_rate=1.0, clock=clock)
    async with AdapterPool(MockBackend(max_slots=4), store=store) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        for name in dirs:
            await pool.prefetch(name, tenant="t")
        await asyncio.sleep(0.05)
        assert len(store.resident) == 1  # one token; the others wait for time to pass
        for expected in (2, 3):
            clock.advance(1.0)
            await until(lambda n=expected: len(store.resident) == n)
        await drain(store)


async def until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait (in real time) until ``condition()`` holds."""
    async with asyncio.timeout(limit):
        while not condition():
            await asyncio.sleep(0.01)


class _HighestKey(EvictionPolicy):
    """Evicts the greatest key: deterministic and unlike LRU."""

    def on_insert(self, key: Hashable, size: int, cost: float) -> None: ...

    def on_access(self, key: Hashable) -> None: ...

    def on_remove(self, key: Hashable) -> None: ...

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        return max(evictable, key=str) if evictable else None


async def test_keep_warm_window_steers_device_eviction(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 4)
    clock = ManualClock()
    store = TieredStore(eviction=_HighestKey(), prefetch=KeepWarm(10.0, clock=clock))
    async with AdapterPool(MockBackend(max_slots=2), store=store) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        clock.advance(20)
        await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)
        # The policy alone would evict t/a1; it is inside its keep-warm window, t/a0 is not.
        await pool.complete("x", adapter="t/a2", tenant="t", params=ONE)
        assert set(store.resident) == {"t/a1", "t/a2"}
        # When every candidate is warm, the policy decides among them.
        await pool.complete("x", adapter="t/a3", tenant="t", params=ONE)
        assert set(store.resident) == {"t/a1", "t/a3"}


async def test_preload_policy_and_bulk_preload(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 4)
    registry = Registry()
    async with AdapterPool(MockBackend(), registry=registry) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
    # A new pool over the same registry preloads everything at start.
    store = TieredStore(prefetch=Preload(tier="host"))
    async with AdapterPool(MockBackend(), registry=registry, store=store) as pool:
        await pool.start()
        await drain(store)
        assert all(store.on_host(n) for n in dirs)
        reached = await pool.preload(["t/a0", "t/a1"], tier="device", progress=False)
        assert reached == {"t/a0": "device", "t/a1": "device"}
        assert {"t/a0", "t/a1"} <= set(store.resident)


async def test_ttl_policy_expires_host_entries(tmp_path: Path) -> None:
    from lorapool.policies import TTLPolicy

    dirs = make_adapters(tmp_path, 3)
    clock = ManualClock()
    store = TieredStore(eviction={"host": TTLPolicy(ttl=60, clock=clock)})
    async with AdapterPool(MockBackend(max_slots=4), store=store) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        clock.advance(30)
        await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)
        clock.advance(45)  # t/a0 idle 75 s, t/a1 idle 45 s
        await pool.complete("x", adapter="t/a2", tenant="t", params=ONE)
        assert not store.on_host("t/a0")
        assert store.on_host("t/a1") and store.on_host("t/a2")


async def test_a_rotten_disk_copy_is_dropped_reported_and_fetched_again(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 1)
    source = FlakySource()
    store = TieredStore(disk_dir=tmp_path / "disk", sources={"flaky": source})
    async with AdapterPool(MockBackend(), store=store) as pool:
        info = await pool.register("t/a0", f"flaky://{dirs['t/a0']}", tenant="t")
        copy = tmp_path / "disk" / info.sha256 / "adapter_model.safetensors"
        data = bytearray(copy.read_bytes())
        data[-1] ^= 0x01
        copy.write_bytes(bytes(data))
        fetched = source.calls["adapter_model.safetensors"]
        out = await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert out.served_by == "adapter"
        assert store.stats.integrity_failures == 1
        assert source.calls["adapter_model.safetensors"] == fetched + 1
        assert copy.read_bytes() == (dirs["t/a0"] / "adapter_model.safetensors").read_bytes()


async def test_a_prefetch_policy_may_propose_other_adapters(tmp_path: Path) -> None:
    from lorapool.policies.prefetch import Warm

    class Next(KeepWarm):
        """After a request for t/aN, warm t/aN+1 into RAM."""

        def on_request(self, adapter_id: str) -> list[Warm]:
            return [Warm(f"t/a{int(adapter_id[-1]) + 1}", "host")]

    dirs = make_adapters(tmp_path, 2)
    store = TieredStore(prefetch=Next())
    async with AdapterPool(MockBackend(), store=store) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        await drain(store)
        assert store.on_host("t/a1") and not store.on_device("t/a1")


async def test_warming_an_adapter_already_on_the_device_loads_nothing(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 3)
    backend = MockBackend(max_slots=3)
    store = TieredStore()
    async with AdapterPool(backend, store=store) as pool:
        for name, path in dirs.items():
            await pool.register(name, str(path), tenant="t")
        assert await pool.prefetch("t/a0", tenant="t", wait=True) == "device"
        slot = store.resident["t/a0"]
        assert await pool.prefetch("t/a0", tenant="t", wait=True) == "device"
        assert store.resident == {"t/a0": slot}
        assert len(backend.loads) == 1 and store.stats.device_loads == 1
        # The slot a second load would have taken is still free for the other adapters.
        for name in ("t/a1", "t/a2"):
            await pool.complete("x", adapter=name, tenant="t", params=ONE)
        assert set(store.resident) == {"t/a0", "t/a1", "t/a2"}


async def test_hits_and_misses_per_tier_count_requests_not_prefetches(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 3)
    store = TieredStore(disk_dir=tmp_path / "disk", sources={"flaky": FlakySource()})

    def counts() -> dict[str, tuple[int, int]]:
        stats = store.stats
        return {t: (stats.hits[t], stats.misses[t]) for t in ("device", "host", "disk")}

    async with AdapterPool(MockBackend(max_slots=4), store=store) as pool:
        remote = await pool.register("t/a0", f"flaky://{dirs['t/a0']}", tenant="t")
        local = await pool.register("t/a1", str(dirs["t/a1"]), tenant="t")
        await pool.register("t/a2", str(dirs["t/a2"]), tenant="t")
        assert counts() == {"device": (0, 0), "host": (0, 0), "disk": (0, 0)}
        # Remote, cold in RAM, its copy on disk since registration.
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert counts() == {"device": (0, 1), "host": (0, 1), "disk": (1, 0)}
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert counts() == {"device": (1, 1), "host": (0, 1), "disk": (1, 0)}
        # Local: read in place, the disk tier is not consulted.
        await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)
        assert counts() == {"device": (1, 2), "host": (0, 2), "disk": (1, 0)}
        # Off the device, still in RAM.
        await store.unload("t/a1", tiers=("device",))
        await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)
        assert counts() == {"device": (1, 3), "host": (1, 2), "disk": (1, 0)}
        # Gone from every tier: fetched from the source again.
        await store.unload("t/a0", tiers=("device", "host", "disk"))
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert counts() == {"device": (1, 4), "host": (1, 3), "disk": (1, 1)}
        assert store.stats.disk_fetches == 1 and store.stats.device_loads == 4
        # Prefetches count nothing, whether they find the adapter or load it.
        await store.unload("t/a0", tiers=("device", "host", "disk"))
        tiers: tuple[TierName, ...] = ("disk", "host", "device")
        for tier in tiers:
            assert await store.warm(remote, tier, limited=False) == tier
        assert await store.warm(local, "device", limited=False) == "device"
        assert await pool.prefetch("t/a2", tenant="t", wait=True) == "device"
        assert counts() == {"device": (1, 4), "host": (1, 3), "disk": (1, 1)}
        assert store.stats.prefetches == 5
        # A request for a prefetched adapter is a hit.
        await pool.complete("x", adapter="t/a2", tenant="t", params=ONE)
        assert counts() == {"device": (2, 4), "host": (1, 3), "disk": (1, 1)}


# -- the device tier in bytes -----------------------------------------------------------


async def test_device_budget_in_bytes_fits_many_small_or_few_large(tmp_path: Path) -> None:
    """Slots sized in bytes: eight small adapters fit where two large ones do; a large one
    evicts (by the policy, LRU here) as many small ones as its bytes need, and an adapter
    larger than every evictable one's room is refused without evicting anything."""
    for d in (tmp_path / "s", tmp_path / "l"):
        d.mkdir()
    small = make_adapters(tmp_path / "s", 8, width=64)
    large = {
        f"t/L{i}": p for i, p in enumerate(make_adapters(tmp_path / "l", 3, width=2048).values())
    }
    size_small = (small["t/a0"] / "adapter_model.safetensors").stat().st_size
    size_large = (large["t/L0"] / "adapter_model.safetensors").stat().st_size
    budget = 2 * size_large + size_small
    assert budget >= 8 * size_small
    backend = MockBackend(max_slots=16, device_bytes=budget)
    store = TieredStore(eviction="lru")
    async with AdapterPool(backend, store=store) as pool:
        for name, path in {**small, **large}.items():
            await pool.register(name, str(path), tenant="t")
        for name in small:
            await pool.complete("x", adapter=name, tenant="t", params=ONE)
        assert all(store.on_device(n) for n in small), "eight small adapters fit"
        assert not backend.unloads
        await pool.complete("x", adapter="t/L0", tenant="t", params=ONE)
        assert store.on_device("t/L0") and not backend.unloads, "8 small + 1 large fit"
        await pool.complete("x", adapter="t/L1", tenant="t", params=ONE)
        assert store.on_device("t/L0") and store.on_device("t/L1")
        # The least recently used first, and only as many as the bytes needed.
        over = 8 * size_small + 2 * size_large - budget
        assert backend.unloads == list(small)[: -(-over // size_small)]
        assert store.device_bytes <= budget
        # Both large ones pinned: the third cannot fit, and nothing is evicted for it.
        await pool.pin("t/L0", tenant="t")
        await pool.pin("t/L1", tenant="t")
        before = dict(store.resident)
        with pytest.raises(LoadError, match="bytes"):
            await pool.complete("x", adapter="t/L2", tenant="t", params=ONE)
        assert store.resident == before
        assert store.device_bytes <= budget


@dataclass
class _SlowLoads(MockBackend):
    """Loads take a while (``delay``), so other loads and requests interleave with them."""

    delay: float = 0.05
    fail_next_unload: bool = False

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        await asyncio.sleep(self.delay)
        await super().load(adapter, slot)

    async def unload(self, adapter_id: str) -> None:
        if self.fail_next_unload:
            self.fail_next_unload = False
            raise RuntimeError("engine hiccup")
        await super().unload(adapter_id)


async def test_an_adapter_larger_than_the_budget_fails_without_blocking_others(
    tmp_path: Path,
) -> None:
    """Its size is known after its first refusal; the next request for it must still fail
    at once (typed) rather than wait forever at the queue's head, holding up the rest."""
    (tmp_path / "s").mkdir()
    (tmp_path / "l").mkdir()
    small = make_adapters(tmp_path / "s", 1, width=64)["t/a0"]
    large = make_adapters(tmp_path / "l", 1, width=2048)["t/a0"]
    size = (small / "adapter_model.safetensors").stat().st_size
    backend = MockBackend(max_slots=4, device_bytes=3 * size)
    async with AdapterPool(backend, store=TieredStore(eviction="lru")) as pool:
        await pool.register("t/small", str(small), tenant="t")
        await pool.register("t/big", str(large), tenant="t")
        for _ in range(2):
            with pytest.raises(LoadError, match="bytes"):
                await asyncio.wait_for(
                    pool.complete("x", adapter="t/big", tenant="t", params=ONE), 30
                )
        out = await asyncio.wait_for(
            pool.complete("x", adapter="t/small", tenant="t", params=ONE), 30
        )
        assert out.text


async def test_concurrent_loads_stay_within_the_byte_budget(tmp_path: Path) -> None:
    """Two loads in flight at once each count the other's bytes: the second evicts the idle
    adapter instead of overshooting the budget."""
    ads = make_adapters(tmp_path, 3, width=2048)
    size = (ads["t/a0"] / "adapter_model.safetensors").stat().st_size
    backend = _SlowLoads(max_slots=8, device_bytes=int(size * 2.5))
    store = TieredStore(eviction="lru")
    async with AdapterPool(backend, store=store) as pool:
        for n, p in ads.items():
            await pool.register(n, str(p), tenant="t")
        for n in ("t/a1", "t/a2", "t/a0"):  # sizes known; a0 stays resident, idle
            await pool.complete("x", adapter=n, tenant="t", params=ONE)
        await store.unload("t/a1")
        await store.unload("t/a2")
        await asyncio.gather(
            *(pool.complete("x", adapter=n, tenant="t", params=ONE) for n in ("t/a1", "t/a2"))
        )
        assert store.device_bytes <= backend.device_bytes
        assert set(store.resident) == {"t/a1", "t/a2"}


async def test_a_failed_load_does_not_restore_a_victim_loaded_again_meanwhile(
    tmp_path: Path,
) -> None:
    ads = make_adapters(tmp_path, 3)
    backend = _SlowLoads(max_slots=2, delay=0.0)
    backend.fail_loads = {"t/a2"}
    store = TieredStore(eviction="lru")
    async with AdapterPool(backend, store=store) as pool:
        for n, p in ads.items():
            await pool.register(n, str(p), tenant="t")
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)
        backend.delay = 0.2
        failing = asyncio.create_task(pool.complete("x", adapter="t/a2", tenant="t", params=ONE))
        await asyncio.sleep(0.05)  # a2 has taken a0's slot and is loading
        backend.delay = 0.0
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)  # a0 comes back
        with pytest.raises(LoadError):
            await failing
        slots = store._device._slots
        assert sorted(s for s in slots if s is not None) == sorted(set(store.resident))
        assert len([s for s in slots if s == "t/a0"]) == 1


async def test_a_failed_eviction_for_bytes_gives_the_claimed_slot_back(tmp_path: Path) -> None:
    ads = make_adapters(tmp_path, 3, width=2048)
    size = (ads["t/a0"] / "adapter_model.safetensors").stat().st_size
    backend = _SlowLoads(max_slots=4, device_bytes=int(size * 2.5), delay=0.0)
    store = TieredStore(eviction="lru")
    async with AdapterPool(backend, store=store) as pool:
        for n, p in ads.items():
            await pool.register(n, str(p), tenant="t")
        await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        await pool.complete("x", adapter="t/a1", tenant="t", params=ONE)
        backend.fail_next_unload = True
        with pytest.raises(LoadError, match="hiccup"):
            await pool.complete("x", adapter="t/a2", tenant="t", params=ONE)
        assert "t/a2" not in store._device._slots, "the claimed slot leaked"
        await pool.complete("x", adapter="t/a2", tenant="t", params=ONE)
        assert store.on_device("t/a2") and store.device_bytes <= backend.device_bytes


async def test_the_device_policy_sees_device_bytes(tmp_path: Path) -> None:
    """GDSF on the device tier weighs the device bytes each adapter takes: to make room it
    evicts the one large adapter rather than the small ones LRU would take."""
    for d in ("s", "l"):
        (tmp_path / d).mkdir()
    small = make_adapters(tmp_path / "s", 3, width=64)
    large = make_adapters(tmp_path / "l", 2, width=2048)
    s_size = (small["t/a0"] / "adapter_model.safetensors").stat().st_size
    l_size = (large["t/a0"] / "adapter_model.safetensors").stat().st_size
    names = {**{f"t/s{i}": p for i, p in enumerate(small.values())}}
    names |= {f"t/L{i}": p for i, p in enumerate(large.values())}
    # LRU evicts the three small ones first, and still needs the large one's room.
    for policy, evicted in (("gdsf", ["t/L0"]), ("lru", ["t/s0", "t/s1", "t/s2", "t/L0"])):
        backend = MockBackend(max_slots=8, device_bytes=3 * s_size + l_size + s_size // 2)
        async with AdapterPool(backend, store=TieredStore(eviction={"device": policy})) as pool:
            for name, path in names.items():
                await pool.register(name, str(path), tenant="t")
            for name in ("t/s0", "t/s1", "t/s2", "t/L0"):  # the large one used last
                await pool.complete("x", adapter=name, tenant="t", params=ONE)
            assert not backend.unloads
            await pool.complete("x", adapter="t/L1", tenant="t", params=ONE)
            assert backend.unloads == evicted, policy
