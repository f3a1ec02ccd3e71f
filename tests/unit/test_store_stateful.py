"""Hypothesis stateful test of the store's residency rules.

Random interleavings of register / request (acquire, held) / finish (release) /
pin / unpin / unload / unregister / prefetch, with injected source and device
failures, over a store with small host, disk and device tiers. After every
step: nothing in use or pinned has left a tier, no tier is over capacity, the
disk tier's files match its index, and references equal the requests held.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lorapool import AdapterPool, TieredStore
from lorapool.errors import LoadError, PinLimitExceeded, SourceError
from lorapool.testing import MockBackend
from lorapool.types import AdapterInfo

from .test_store import FlakySource, make_adapters

N = 6
SLOTS = 3
IDS = [f"t/a{i}" for i in range(N)]
adapter = st.sampled_from(IDS)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="lorapool-stateful-"))
        self.dirs = make_adapters(self.tmp, N)
        size = (self.dirs["t/a0"] / "adapter_model.safetensors").stat().st_size
        self.source = FlakySource()
        self.backend = MockBackend(max_slots=SLOTS)
        self.store = TieredStore(
            host_bytes=int(size * 2.5),
            disk_dir=self.tmp / "disk",
            disk_bytes=int(size * 3.5),
            sources={"flaky": self.source},
            retries=1,
            retry_backoff=0,
        )
        self.pool = AdapterPool(self.backend, store=self.store)
        self.run(self.pool.start())
        self.infos: dict[str, AdapterInfo] = {}
        self.held: Counter[str] = Counter()
        self.held_on_host: set[str] = set()
        self.held_on_disk: set[str] = set()
        for a in IDS[:4]:
            self.infos[a] = self.run(self.pool.register(a, self.uri(a), tenant="t"))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def uri(self, adapter_id: str) -> str:
        path = str(self.dirs[adapter_id])
        # Even adapters come from a "remote" source (through the disk tier), odd ones are local.
        return f"flaky://{path}" if int(adapter_id[-1]) % 2 == 0 else path

    # -- rules -------------------------------------------------------------------------

    @rule(a=adapter)
    def register(self, a: str) -> None:
        if a in self.infos:
            return
        try:
            self.infos[a] = self.run(self.pool.register(a, self.uri(a), tenant="t"))
        except (SourceError, LoadError):
            assert a not in self.pool.registry

    @rule(a=adapter)
    def request(self, a: str) -> None:
        info = self.infos.get(a)
        if info is None:
            return
        refs = self.store.refs(a)
        try:
            self.run(self.store.acquire(info))
        except LoadError:
            assert self.store.refs(a) == refs
            return
        self.held[a] += 1

    @precondition(lambda self: sum(self.held.values()) > 0)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.held)))
        self.store.release(a)
        self.held[a] -= 1
        if self.held[a] == 0:
            del self.held[a]

    @rule(a=adapter)
    def pin(self, a: str) -> None:
        if a in self.infos:
            with contextlib.suppress(PinLimitExceeded, LoadError):
                self.run(self.store.pin(self.infos[a]))

    @rule(a=adapter)
    def unpin(self, a: str) -> None:
        self.store.unpin(a)

    @rule(a=adapter, tiers=st.sampled_from([("device", "host"), ("device", "host", "disk")]))
    def unload(self, a: str, tiers: tuple[str, ...]) -> None:
        if a in self.infos and a not in self.held:  # unload waits for held requests
            self.run(self.store.unload(a, tiers=tiers))

    @rule(a=adapter)
    def unregister(self, a: str) -> None:
        if a in self.infos and a not in self.held:
            self.run(self.pool.unregister(a, tenant="t"))
            del self.infos[a]
            assert not self.store.on_device(a) and not self.store.on_host(a)

    @rule(a=adapter, tier=st.sampled_from(["device", "host", "disk"]))
    def prefetch(self, a: str, tier: str) -> None:
        if a in self.infos:
            self.run(self.store.warm(self.infos[a], tier, limited=False))  # type: ignore[arg-type]

    @rule(a=adapter, broken=st.booleans())
    def source_failure(self, a: str, broken: bool) -> None:
        path = str(self.dirs[a])
        if broken:
            self.source.permanent.add(path)
        else:
            self.source.permanent.discard(path)

    @rule(a=adapter, broken=st.booleans())
    def device_failure(self, a: str, broken: bool) -> None:
        if broken:
            self.backend.fail_loads.add(a)
        else:
            self.backend.fail_loads.discard(a)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def capacities_hold(self) -> None:
        assert len(self.store.resident) <= SLOTS
        assert len(set(self.store.resident.values())) == len(self.store.resident)
        assert self.store.host_bytes <= self.store.host_capacity
        disk = self.store._disk.tier
        assert disk.capacity is not None and disk.used <= disk.capacity

    @invariant()
    def in_use_and_pinned_stay(self) -> None:
        for a in self.held:
            assert self.store.on_device(a), f"{a} is in use but left the device"
        for a in self.store.pinned:
            assert self.store.on_device(a), f"{a} is pinned but left the device"
        for a in self.held_on_host & set(self.held):
            assert self.store.on_host(a), f"{a} is in use but left the host tier"
        for a in self.held_on_disk & set(self.held):
            assert self.store.on_disk(a), f"{a} is in use but left the disk tier"
        self.held_on_host = {a for a in self.held if self.store.on_host(a)}
        self.held_on_disk = {a for a in self.held if self.store.on_disk(a)}

    @invariant()
    def references_match_requests(self) -> None:
        for a in IDS:
            assert self.store.refs(a) == self.held[a], (a, self.store.refs(a), self.held[a])

    @invariant()
    def disk_files_match_the_index(self) -> None:
        root = self.store.disk_dir
        assert root is not None
        on_disk = {p.name for p in root.iterdir() if p.is_dir() and p.name != ".tmp"}
        assert on_disk == set(self.store._disk.tier)
        assert list((root / ".tmp").iterdir()) == []

    def teardown(self) -> None:
        for a, n in list(self.held.items()):
            for _ in range(n):
                self.store.release(a)
        assert all(self.store.refs(a) == 0 for a in IDS)
        self.run(self.pool.aclose())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreStateful = StoreMachine.TestCase
