"""The device tier: the backend's slots, and loading an adapter into one.

The backend holds at most ``max_slots`` adapters. Loading one takes a free
slot, or the slot of an adapter no request uses and nobody pinned, chosen by
the device's eviction policy; keep-warm adapters (the prefetch policies'
choice) give their slot up only when every candidate is one. A prefetch's
load is speculative: it takes only a free slot or one another prefetch filled
and no request used, and gives up (``None``) when there is none.

A backend whose slots hold adapters at their own size (``Capabilities.device_bytes``)
also has a byte budget: a load then evicts, by the same policy (which is told each
adapter's device bytes, so a size-aware policy such as GDSF weighs them), until both a
slot and the bytes are free, and is refused without evicting anything when even every
evictable adapter gone would not make room.
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
    nbytes: int = 0


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
        self.budget: int | None = None
        """The device's bytes (``Capabilities.device_bytes``), or ``None``: slots only."""
        self._sizes: dict[str, int] = {}
        """Each adapter's device bytes as last loaded (kept after eviction)."""
        self._loading: dict[str, int] = {}
        """Device bytes of loads claimed and in flight (not yet in the device map)."""

    def bind(self, backend: Backend) -> None:
        """Attach to a started backend: its slots are all free."""
        self._backend = backend
        self.max_slots = backend.capabilities.max_slots
        self.budget = backend.capabilities.device_bytes
        self._slots = [None] * self.max_slots

    @property
    def used_bytes(self) -> int:
        """Device bytes the resident adapters take (0 without a byte budget)."""
        return sum(r.nbytes for r in self._device.values())

    def fits(self, adapter_id: str, adapter_ids: set[str]) -> bool:
        """Whether these adapters' device bytes, where known (loaded once), fit the budget
        together: the scheduler holds a request back rather than have its load refused.
        An adapter that alone exceeds the budget passes (its load fails at once, typed)
        rather than holding back everything queued behind it."""
        if self.budget is None:
            return True
        if self._sizes.get(adapter_id, 0) > self.budget:
            return True
        return sum(self._sizes.get(a, 0) for a in adapter_ids) <= self.budget

    def forget_size(self, adapter_id: str) -> None:
        """Drop an unregistered adapter's remembered size."""
        self._sizes.pop(adapter_id, None)

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
            size = self._backend.device_nbytes(host) if self.budget is not None else 0
            if size:
                self._sizes[key] = size
            claim = self._claim(key, speculative, size)
            if claim is None:
                return None
            slot, victim, extra = claim
            self._loading[key] = size  # counted against the budget until it lands
            try:
                for other in extra:  # byte budget: more room than the slot's victim leaves
                    self._evicted(other, key)
                    await self._backend.unload(other)
                started = time.perf_counter()
                await self._backend.load(host, slot)
            except BaseException:
                self._undo_claim(key, slot, victim)
                raise
            finally:
                self._loading.pop(key, None)
        except (LoadError, SignatureError):
            self._stats.load_failures += 1
            raise
        except Exception as exc:
            self._stats.load_failures += 1
            raise LoadError(key, "device", f"{type(exc).__name__}: {exc}") from exc
        if victim is not None:
            self.policy.on_remove(victim[0])
            self._stats.evictions["device"] += 1
            self._stats.evicted("device", victim[0])
            log.debug("evicted %s from device slot %d for %s", victim[0], slot, key)
        self._device[key] = _Resident(slot, speculative, size)
        self.policy.on_insert(key, size or host.nbytes, time.perf_counter() - started)
        self._stats.device_loads += 1
        took = time.perf_counter() - began
        self._stats.loaded("device", key, took)
        self._stats.load_seconds = 0.8 * self._stats.load_seconds + 0.2 * took
        return slot

    def _undo_claim(self, key: str, slot: int, victim: tuple[str, _Resident] | None) -> None:
        """A load into ``slot`` failed: give the slot back to its victim, unless the victim
        was loaded again elsewhere meanwhile (then the slot is free)."""
        if self._slots[slot] != key:
            return
        if victim is not None and victim[0] not in self._device:
            self._slots[slot] = victim[0]
            self._device[victim[0]] = victim[1]
        else:
            self._slots[slot] = None

    def _evicted(self, adapter_id: str, for_id: str) -> None:
        """Account an adapter evicted (for its bytes) to make room for ``for_id``."""
        resident = self._device.pop(adapter_id)
        self._slots[resident.slot] = None
        self.policy.on_remove(adapter_id)
        self._stats.evictions["device"] += 1
        self._stats.evicted("device", adapter_id)
        log.debug("evicted %s from the device (bytes) for %s", adapter_id, for_id)

    def _claim(
        self, adapter_id: str, speculative: bool, size: int
    ) -> tuple[int, tuple[str, _Resident] | None, list[str]] | None:
        """A slot for the adapter: a free one, or an evictable adapter's (which leaves the
        device map, returned as the victim), and, under a byte budget, the other adapters
        to evict for its bytes. Nothing changes when it returns ``None`` or raises."""
        if self.budget is not None and size > self.budget:
            raise LoadError(
                adapter_id,
                "device",
                f"needs {size} bytes on the device; the device holds {self.budget}",
            )
        free = next((i for i, occupant in enumerate(self._slots) if occupant is None), None)
        evictable = {
            a
            for a, r in self._device.items()
            if not self._protected(a) and (r.speculative or not speculative)
        }
        warm = self._keep_warm()
        if speculative:
            evictable -= warm
        order: list[str] = []
        need_slot = free is None
        claimed = self.used_bytes + sum(self._loading.values())
        over = 0 if self.budget is None else claimed + size - self.budget
        candidates = set(evictable)
        while (need_slot and not order) or over > 0:
            if not candidates:
                if speculative:
                    return None
                why = (
                    f"all {self.max_slots} slots hold adapters in use or pinned"
                    if need_slot and not order
                    else f"needs {size} bytes on the device; {over} more than the adapters"
                    f" not in use or pinned leave free ({self.budget} in all)"
                )
                raise LoadError(adapter_id, "device", why)
            preferred = candidates - warm or candidates
            pick = self.policy.victim(preferred)
            chosen = pick if isinstance(pick, str) and pick in preferred else min(preferred)
            candidates.discard(chosen)
            order.append(chosen)
            over -= self._device[chosen].nbytes
        if free is not None:
            self._slots[free] = adapter_id
            return free, None, order
        victim_id, extra = order[0], order[1:]
        resident = self._device.pop(victim_id)
        self._slots[resident.slot] = adapter_id
        return resident.slot, (victim_id, resident), extra

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
