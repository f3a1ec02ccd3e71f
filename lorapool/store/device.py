"""The device tier: the backend's slots, and loading an adapter into one.

The backend holds at most ``max_slots`` adapters. Loading one takes a free
slot, or the slot of an adapter no request uses and nobody pinned, chosen by
the device's eviction policy; keep-warm adapters (the prefetch policies'
choice) give their slot up only when every candidate is one. A prefetch's
load is speculative: it takes only a free slot or one another prefetch filled
and no request used, and gives up (``None``) when there is none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorapool import tracing
from lorapool.errors import LoadError, SignatureError
from lorapool.store.stats import StoreStats
from lorapool.types import AdapterInfo, LoadedAdapter

if TYPE_CHECKING:
    from lorapool.abc import Backend, EvictionPolicy

__all__ = ["DeviceSlots"]

log = logging.getLogger(__name__)


@dataclass
class _Resident:
    slot: int
    speculative: bool = False


class DeviceSlots:
    """Which adapter is in which slot, and the device tier's fill (:meth:`load`).

    ``host_entry(info, speculative)`` brings the adapter's prepared bytes from
    the host tier; ``protected(adapter_id)`` says whether an adapter may not be
    evicted; ``keep_warm()`` names the adapters to keep on the device if
    possible.
    """

    def __init__(
        self,
        policy: EvictionPolicy,
        stats: StoreStats,
        *,
        host_entry: Callable[[AdapterInfo, bool], Awaitable[LoadedAdapter]],
        protected: Callable[[str], bool],
        keep_warm: Callable[[], frozenset[str]],
    ) -> None:
        self.policy = policy
        self.max_slots = 0
        self._stats = stats
        self._host_entry = host_entry
        self._protected = protected
        self._keep_warm = keep_warm
        self._backend: Backend | None = None
        self._device: dict[str, _Resident] = {}
        self._slots: list[str | None] = []

    def bind(self, backend: Backend) -> None:
        """Attach to a started backend: its slots are all free."""
        self._backend = backend
        self.max_slots = backend.capabilities.max_slots
        self._slots = [None] * self.max_slots

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._device

    @property
    def resident(self) -> dict[str, int]:
        """``{adapter id: slot}`` of everything on the device."""
        return {a: r.slot for a, r in self._device.items()}

    def lookup(self, adapter_id: str, use: bool) -> int | None:
        """The adapter's slot (``None``: not on the device); ``use`` counts an access."""
        resident = self._device.get(adapter_id)
        if resident is None:
            return None
        if use:
            resident.speculative = False
            self.policy.on_access(adapter_id)
        return resident.slot

    async def load(self, info: AdapterInfo, speculative: bool) -> int | None:
        """Bring the adapter into a slot and return it (``None``: a prefetch found no room).

        Raises :class:`LoadError` (counted in ``load_failures``) when a tier
        below or the backend fails, or when every slot holds an adapter in
        use or pinned; :class:`SignatureError` (counted too) when the host tier's
        verifier refuses the adapter's bytes.
        """
        with tracing.span("lorapool.store.load", tier="device", adapter=info.adapter_id):
            return await self._load(info, speculative)

    async def _load(self, info: AdapterInfo, speculative: bool) -> int | None:
        assert self._backend is not None
        key = info.adapter_id
        began = time.perf_counter()
        try:
            host = await self._host_entry(info, speculative)
            claim = self._claim(key, speculative)
            if claim is None:
                return None
            slot, victim = claim
            started = time.perf_counter()
            try:
                await self._backend.load(host, slot)
            except BaseException:
                self._slots[slot] = victim
                if victim is not None:
                    self._device[victim] = _Resident(slot)
                raise
        except (LoadError, SignatureError):
            self._stats.load_failures += 1
            raise
        except Exception as exc:
            self._stats.load_failures += 1
            raise LoadError(key, "device", f"{type(exc).__name__}: {exc}") from exc
        if victim is not None:
            self.policy.on_remove(victim)
            self._stats.evictions["device"] += 1
            self._stats.evicted("device", victim)
            log.debug("evicted %s from device slot %d for %s", victim, slot, key)
        self._device[key] = _Resident(slot, speculative)
        self.policy.on_insert(key, host.nbytes, time.perf_counter() - started)
        self._stats.device_loads += 1
        took = time.perf_counter() - began
        self._stats.loaded("device", key, took)
        self._stats.load_seconds = 0.8 * self._stats.load_seconds + 0.2 * took
        return slot

    def _claim(self, adapter_id: str, speculative: bool) -> tuple[int, str | None] | None:
        """A free slot, or the slot of an evictable adapter (which leaves the device map)."""
        for i, occupant in enumerate(self._slots):
            if occupant is None:
                self._slots[i] = adapter_id
                return i, None
        evictable = {
            a
            for a, r in self._device.items()
            if not self._protected(a) and (r.speculative or not speculative)
        }
        if not evictable:
            if speculative:
                return None
            raise LoadError(
                adapter_id,
                "device",
                f"all {self.max_slots} slots hold adapters in use or pinned",
            )
        warm = self._keep_warm()
        if speculative:
            evictable -= warm
            if not evictable:
                return None
        preferred = evictable - warm or evictable
        victim = self.policy.victim(preferred)
        victim_id = victim if isinstance(victim, str) and victim in preferred else min(preferred)
        resident = self._device.pop(victim_id)
        self._slots[resident.slot] = adapter_id
        return resident.slot, victim_id

    async def unload(self, adapter_id: str) -> None:
        """Free the adapter's slot; a backend with an engine cache forgets it there too."""
        resident = self._device.pop(adapter_id, None)
        if resident is not None:
            assert self._backend is not None
            self._slots[resident.slot] = None
            self.policy.on_remove(adapter_id)
            await self._backend.unload(adapter_id)
        elif self._backend is not None and self._backend.capabilities.engine_cache:
            await self._backend.discard(adapter_id)
