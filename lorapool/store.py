"""TieredStore: where each adapter lives, and bringing it to the device.

Tiers here: ``device`` (the backend's slots) and ``host`` (verified adapter
bytes in RAM, bounded by ``host_bytes``), filled from the adapter's local
source directory. A request holds a reference on its adapter from dispatch to
its last token; an adapter with references, or pinned, is never evicted.
Concurrent misses for one adapter share one load (single flight), and loads
run as tasks on the event loop and threads, never inside the engine's step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import CONFIG_FILE, WEIGHTS_FILE, adapter_digest
from .errors import LoadError, PinLimitExceeded
from .types import AdapterInfo, LoadedAdapter

if TYPE_CHECKING:
    from lorapool.backends.base import Backend
    from lorapool.policies.base import EvictionPolicy

__all__ = ["TieredStore", "parse_size"]

log = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"512MiB"`` / ``"2 GB"``."""
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {size!r}; use bytes or e.g. '512MiB', '2GiB', '1GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class _Resident:
    slot: int
    refs: int = 0
    pinned: bool = False


class TieredStore:
    """Host-RAM tier plus device-slot residency over a backend.

    ``eviction`` names the device-tier policy (or is a policy object);
    host-tier eviction is least recently used.
    """

    def __init__(
        self, *, host_bytes: int | str = "2GiB", eviction: str | EvictionPolicy = "lru"
    ) -> None:
        self.host_capacity = parse_size(host_bytes)
        self._eviction_spec = eviction
        self._policy: EvictionPolicy | None = None
        self._backend: Backend | None = None
        self._max_slots = 0
        self._host: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._host_bytes = 0
        self._device: dict[str, _Resident] = {}
        self._slots: list[str | None] = []
        self._refs: dict[str, int] = {}
        self._pins: set[str] = set()
        self._loading: dict[str, asyncio.Task[int]] = {}
        self._drained: dict[str, asyncio.Event] = {}
        self.device_loads = 0
        self.host_loads = 0

    # -- wiring ----------------------------------------------------------------------

    def bind(self, backend: Backend) -> None:
        """Attach to a started backend (called by the pool)."""
        from .plugins import load_policy

        self._backend = backend
        self._max_slots = backend.capabilities.max_slots
        self._slots = [None] * self._max_slots
        self._policy = load_policy(self._eviction_spec)

    @property
    def host_bytes(self) -> int:
        """Bytes held in the host tier."""
        return self._host_bytes

    def on_host(self, adapter_id: str) -> bool:
        """True if the adapter's verified bytes are in RAM."""
        return adapter_id in self._host

    def on_device(self, adapter_id: str) -> bool:
        """True if the adapter occupies a device slot."""
        return adapter_id in self._device

    @property
    def resident(self) -> dict[str, int]:
        """``{adapter id: slot}`` of everything on the device."""
        return {a: r.slot for a, r in self._device.items()}

    def refs(self, adapter_id: str) -> int:
        """References (requests in flight, loads in progress) on an adapter."""
        return self._refs.get(adapter_id, 0)

    def can_dispatch(self, adapter_id: str | None, inflight: Mapping[str, int]) -> bool:
        """Would one more request for ``adapter_id`` keep distinct adapters within the slots?"""
        if adapter_id is None or adapter_id in inflight:
            return True
        needed = set(inflight) | self._pins | {adapter_id}
        return len(needed) <= self._max_slots

    # -- references ------------------------------------------------------------------

    async def acquire(self, info: AdapterInfo) -> int:
        """Take a reference on the adapter and return its device slot, loading it if needed."""
        key = info.adapter_id
        self._refs[key] = self._refs.get(key, 0) + 1
        try:
            resident = self._device.get(key)
            if resident is not None:
                assert self._policy is not None
                self._policy.on_access(key)
                return resident.slot
            task = self._loading.get(key)
            if task is None:
                task = asyncio.create_task(self._load_to_device(info), name=f"load {key}")
                self._loading[key] = task
                task.add_done_callback(functools.partial(self._load_done, key))
            return await asyncio.shield(task)
        except BaseException:
            self.release(key)
            raise

    def _load_done(self, key: str, task: asyncio.Task[int]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]

    def release(self, adapter_id: str) -> None:
        """Drop one reference; wakes an unregister waiting for the adapter to drain."""
        n = self._refs.get(adapter_id, 0) - 1
        if n > 0:
            self._refs[adapter_id] = n
            return
        self._refs.pop(adapter_id, None)
        event = self._drained.get(adapter_id)
        if event is not None:
            event.set()

    # -- pins and removal ------------------------------------------------------------

    async def pin(self, info: AdapterInfo) -> None:
        """Keep the adapter on the device until unpinned."""
        key = info.adapter_id
        if key in self._pins:
            return
        if len(self._pins) + 1 >= self._max_slots:
            raise PinLimitExceeded(
                f"cannot pin {key!r}: {len(self._pins)} of {self._max_slots} device slots are "
                f"pinned and at most {self._max_slots - 1} may be, so that other adapters can "
                "still be served; unpin one or start the backend with more slots"
            )
        await self.acquire(info)
        try:
            self._pins.add(key)
        finally:
            self.release(key)

    def unpin(self, adapter_id: str) -> None:
        """Let the adapter be evicted again."""
        self._pins.discard(adapter_id)

    @property
    def pinned(self) -> frozenset[str]:
        """Pinned adapter ids."""
        return frozenset(self._pins)

    async def remove(self, adapter_id: str) -> None:
        """Wait for references to drain, then free the adapter's device slot and host bytes."""
        self._pins.discard(adapter_id)
        while self._refs.get(adapter_id, 0) > 0:
            event = self._drained.setdefault(adapter_id, asyncio.Event())
            event.clear()
            await event.wait()
        self._drained.pop(adapter_id, None)
        resident = self._device.pop(adapter_id, None)
        if resident is not None:
            self._slots[resident.slot] = None
            assert self._policy is not None and self._backend is not None
            self._policy.on_remove(adapter_id)
            await self._backend.unload(adapter_id)
        entry = self._host.pop(adapter_id, None)
        if entry is not None:
            self._host_bytes -= entry.nbytes

    # -- loading ---------------------------------------------------------------------

    async def _load_to_device(self, info: AdapterInfo) -> int:
        assert self._backend is not None and self._policy is not None
        host = await self._to_host(info)
        slot, victim = self._claim_slot(info.adapter_id)
        started = time.perf_counter()
        try:
            await self._backend.load(host, slot)
        except BaseException as exc:
            self._slots[slot] = victim
            if victim is not None:
                self._device[victim] = _Resident(slot)
            if isinstance(exc, LoadError):
                raise
            if isinstance(exc, Exception):
                raise LoadError(info.adapter_id, "device", str(exc)) from exc
            raise
        if victim is not None:
            self._policy.on_remove(victim)
            log.debug("evicted %s from device slot %d for %s", victim, slot, info.adapter_id)
        self._device[info.adapter_id] = _Resident(slot)
        self._policy.on_insert(info.adapter_id, host.nbytes, time.perf_counter() - started)
        self.device_loads += 1
        return slot

    def _claim_slot(self, adapter_id: str) -> tuple[int, str | None]:
        """A free slot, or the slot of an evictable adapter (which leaves the device map)."""
        assert self._policy is not None
        for i, occupant in enumerate(self._slots):
            if occupant is None:
                self._slots[i] = adapter_id
                return i, None
        evictable = [a for a in self._device if self._refs.get(a, 0) == 0 and a not in self._pins]
        victim = self._policy.victim(evictable)
        if victim is None:
            raise LoadError(
                adapter_id,
                "device",
                f"all {self._max_slots} slots hold adapters in use or pinned",
            )
        victim_id = str(victim)
        resident = self._device.pop(victim_id)
        self._slots[resident.slot] = adapter_id
        return resident.slot, victim_id

    async def _to_host(self, info: AdapterInfo) -> LoadedAdapter:
        key = info.adapter_id
        entry = self._host.get(key)
        if entry is not None:
            self._host.move_to_end(key)
            return entry
        entry = await asyncio.to_thread(_read_verified, info)
        self.host_loads += 1
        if key in self._host:  # a concurrent load won; keep one copy
            return self._host[key]
        self._host[key] = entry
        self._host_bytes += entry.nbytes
        while self._host_bytes > self.host_capacity and len(self._host) > 1:
            old, evicted = next(iter(self._host.items()))
            if old == key:
                break
            del self._host[old]
            self._host_bytes -= evicted.nbytes
        return entry


def _read_verified(info: AdapterInfo) -> LoadedAdapter:
    """Read an adapter's files from its source directory and check the registered sha256."""
    path = Path(info.source)
    try:
        config_raw = (path / CONFIG_FILE).read_bytes()
        weights = (path / WEIGHTS_FILE).read_bytes()
    except OSError as exc:
        raise LoadError(info.adapter_id, "host", f"cannot read {path}: {exc}") from exc
    if adapter_digest({CONFIG_FILE: config_raw, WEIGHTS_FILE: weights}) != info.sha256:
        raise LoadError(
            info.adapter_id,
            "host",
            f"sha256 mismatch for {path}: the files changed since registration; "
            "register the new content as a new adapter",
        )
    return LoadedAdapter(info.adapter_id, info.config, weights, info.sha256)
