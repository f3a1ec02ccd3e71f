"""TieredStore: where each adapter lives, and bringing it to the device.

Tiers (design §5), nearest the device first:

* ``device``: the backend's slots, at most ``max_slots`` adapters;
* ``host``: verified adapter bytes in RAM, at most ``host_bytes``;
* ``disk``: verified copies of remote adapters under ``disk_dir``, at most
  ``disk_bytes``, named by content (sha256) so they survive restarts;
* ``source``: where the adapter comes from (a local path, ``s3://``,
  ``http(s)://``), one :class:`~lorapool.sources.Source` per scheme.

A request holds a reference on its adapter from dispatch to its last token;
an adapter with references, or pinned, is never evicted from any tier.
Concurrent misses share one load per tier (single flight); loads run as tasks
and threads, never inside the engine's step. Every copy is checked against
the sha256 recorded at registration before it is used or made visible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapool.errors import (
    AdapterValidationError,
    ContentMismatch,
    LoadError,
    LorapoolError,
    PinLimitExceeded,
    SourceError,
    SourceNotFound,
)
from lorapool.formats import CONFIG_FILE, WEIGHTS_FILE, adapter_digest
from lorapool.ratelimit import TokenBucket
from lorapool.sources import Source, make_source, scheme_of
from lorapool.sources.archive import ArchiveFiles, is_archive_uri, split_archive_uri
from lorapool.store.disk import DiskFull, DiskTier, FetchFile, Staged
from lorapool.store.tiers import SingleFlight, Tier, parse_size
from lorapool.types import AdapterInfo, LoadedAdapter

if TYPE_CHECKING:
    from lorapool.abc import Backend, PrefetchPolicy, TierName

__all__ = ["StoreStats", "TieredStore", "parse_size"]

log = logging.getLogger(__name__)

_TIERS = ("device", "host", "disk")


@dataclass
class StoreStats:
    """Counters since the store started."""

    device_loads: int = 0
    host_loads: int = 0
    disk_fetches: int = 0
    fetched_bytes: int = 0
    fetch_retries: int = 0
    load_failures: int = 0
    integrity_failures: int = 0
    """Copies whose sha256 did not match the registration (refused, and dropped if cached)."""
    prefetches: int = 0
    prefetch_dropped: int = 0
    load_seconds: float = 1.0
    """Moving average of the seconds a device load took (from wherever the adapter was)."""
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TIERS, 0))
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TIERS, 0))
    """Requests' lookups that found the adapter in a tier (prefetches not counted)."""
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TIERS, 0))
    """Requests' lookups that did not, and went to the next tier."""
    source_fetches: dict[str, int] = field(default_factory=dict)
    """Downloads into the disk tier by source scheme (``s3``, ``https``, ...)."""


@dataclass
class _Resident:
    slot: int
    speculative: bool = False


class TieredStore:
    """Device slots, host RAM and local disk over a backend and the adapters' sources.

    ``eviction`` picks the policies: ``None`` for the per-tier defaults
    (``lorapool.policies.DEFAULT_EVICTION``); a name or a policy class for
    every tier (one instance each); a policy object for the device tier; or a
    mapping ``{"device": ..., "host": ..., "disk": ...}``. ``prefetch`` is a
    prefetch policy or a list of them. ``sources`` maps URI schemes to
    ready-made sources (e.g. ``{"s3": S3Source(endpoint_url=...)}``); other
    schemes use the registry in :mod:`lorapool.sources`; :meth:`aclose`
    closes every source (they reopen on next use, so sharing one is safe). Without
    ``disk_dir`` remote adapters are cached in a temporary directory removed
    by :meth:`aclose`; ``disk_bytes=None`` leaves the disk tier unbounded.
    """

    def __init__(
        self,
        *,
        host_bytes: int | str = "2GiB",
        disk_dir: str | Path | None = None,
        disk_bytes: int | str | None = None,
        eviction: object = None,
        prefetch: PrefetchPolicy | Sequence[PrefetchPolicy] | None = None,
        sources: Mapping[str, Source] | None = None,
        retries: int = 3,
        retry_backoff: float = 0.2,
        prefetch_concurrency: int = 2,
        prefetch_rate: float = 20.0,
        max_pending_prefetch: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from lorapool.plugins import policies_for_tiers

        policies = policies_for_tiers(eviction)
        self.host_capacity = parse_size(host_bytes)
        self._host: Tier[str, LoadedAdapter] = Tier("host", self.host_capacity, policies["host"])
        self._disk = DiskTier(
            disk_dir, None if disk_bytes is None else parse_size(disk_bytes), policies["disk"]
        )
        self._device_policy = policies["device"]
        if prefetch is None:
            self._prefetchers: list[PrefetchPolicy] = []
        elif isinstance(prefetch, Sequence):
            self._prefetchers = list(prefetch)
        else:
            self._prefetchers = [prefetch]
        self._sources: dict[str, Source] = dict(sources or {})
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._clock = clock
        self._stats = StoreStats()
        self._backend: Backend | None = None
        self._max_slots = 0
        self._device: dict[str, _Resident] = {}
        self._slots: list[str | None] = []
        self._refs: dict[str, int] = {}
        self._pins: set[str] = set()
        self._infos: dict[str, AdapterInfo] = {}
        self._drained: dict[str, asyncio.Event] = {}
        self._device_flights: SingleFlight[str, int | None] = SingleFlight("device load")
        self._host_flights: SingleFlight[str, LoadedAdapter] = SingleFlight("host load")
        self._disk_flights: SingleFlight[str, Path] = SingleFlight("disk fetch")
        self._warm_gate = asyncio.Semaphore(prefetch_concurrency)
        self._warm_bucket = TokenBucket(prefetch_rate, max(1.0, prefetch_rate), clock)
        self._max_pending = max_pending_prefetch
        self._pending: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- wiring ----------------------------------------------------------------------

    def bind(self, backend: Backend) -> None:
        """Attach to a started backend (called by the pool)."""
        self._backend = backend
        self._max_slots = backend.capabilities.max_slots
        self._slots = [None] * self._max_slots
        self._disk.open()

    async def aclose(self) -> None:
        """Stop prefetches, close the sources, drop a temporary disk tier. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._pending):
            task.cancel()
        for flights in (self._device_flights, self._host_flights, self._disk_flights):
            flights.cancel_all()
        await asyncio.gather(*self._pending, return_exceptions=True)
        for source in self._sources.values():
            await source.aclose()
        await asyncio.to_thread(self._disk.close)

    # -- what is where ---------------------------------------------------------------

    @property
    def stats(self) -> StoreStats:
        """Counters since the store started (evictions per tier read from the tiers)."""
        self._stats.evictions.update(host=self._host.evictions, disk=self._disk.tier.evictions)
        return self._stats

    @property
    def host_bytes(self) -> int:
        """Bytes held in the host tier."""
        return self._host.used

    @property
    def disk_bytes(self) -> int:
        """Bytes held in the disk tier."""
        return self._disk.tier.used

    @property
    def persistent_dir(self) -> Path | None:
        """The ``disk_dir`` the store was given (kept across runs); ``None`` for a temporary one."""
        return self._disk.requested

    @property
    def disk_dir(self) -> Path | None:
        """The disk tier's directory (``None`` until the store is bound)."""
        return self._disk.root

    def on_host(self, adapter_id: str) -> bool:
        """True if the adapter's verified bytes are in RAM."""
        return adapter_id in self._host

    def on_disk(self, adapter_id: str) -> bool:
        """True if a verified copy of the adapter is in the disk tier."""
        info = self._infos.get(adapter_id)
        return info is not None and info.sha256 in self._disk.tier

    def on_device(self, adapter_id: str) -> bool:
        """True if the adapter occupies a device slot."""
        return adapter_id in self._device

    @property
    def resident(self) -> dict[str, int]:
        """``{adapter id: slot}`` of everything on the device."""
        return {a: r.slot for a, r in self._device.items()}

    @property
    def in_use(self) -> int:
        """Distinct adapters that requests in flight hold (the running batch's adapters)."""
        return len(self._refs)

    def refs(self, adapter_id: str) -> int:
        """References (requests in flight) on an adapter."""
        return self._refs.get(adapter_id, 0)

    @property
    def pinned(self) -> frozenset[str]:
        """Pinned adapter ids."""
        return frozenset(self._pins)

    def can_dispatch(self, adapter_id: str | None, inflight: Mapping[str, int]) -> bool:
        """Would one more request for ``adapter_id`` keep distinct adapters within the slots?"""
        if adapter_id is None or adapter_id in inflight:
            return True
        needed = set(inflight) | self._pins | {adapter_id}
        return len(needed) <= self._max_slots

    def _protected(self, adapter_id: str) -> bool:
        return self._refs.get(adapter_id, 0) > 0 or adapter_id in self._pins

    def _protected_sha(self, sha: str) -> bool:
        infos = (self._infos.get(a) for a in (*self._refs, *self._pins))
        return any(i is not None and i.sha256 == sha for i in infos)

    def _is_local(self, info: AdapterInfo) -> bool:
        return self._in_place(info.source) is not None

    def _in_place(self, uri: str) -> Path | None:
        """The adapter directory itself when ``uri`` is local and not an archive."""
        if is_archive_uri(uri):
            return None
        return self.source_for(uri).local_path(uri)

    def _file_fetcher(self, uri: str) -> tuple[FetchFile, ArchiveFiles | None]:
        """How to fetch the adapter's files one by one (an archive is fetched once, extracted)."""
        source = self.source_for(uri)
        if not is_archive_uri(uri):
            return (lambda name, dest: self._fetch_file(source, uri, name, dest)), None
        parent, name = split_archive_uri(uri)
        archive = ArchiveFiles(
            uri, lambda dest: self._fetch_file(source, parent, name, dest), self._disk.workdir
        )
        return archive, archive

    # -- registration ----------------------------------------------------------------

    def source_for(self, uri: str) -> Source:
        """The source that serves ``uri``'s scheme (created on first use)."""
        scheme = scheme_of(uri)
        source = self._sources.get(scheme)
        if source is None:
            source = make_source(scheme)
            self._sources[scheme] = source
        return source

    async def stage(self, uri: str) -> Staged:
        """Bring a new adapter's files somewhere local to be validated at registration.

        Local adapter directories are inspected in place. Remote ones, and
        archives from anywhere, are downloaded (and extracted) to a staging
        directory; :meth:`Staged.commit` moves the copy into the disk tier,
        :meth:`Staged.discard` deletes it.
        """
        local = self._in_place(uri)
        if local is not None:
            return await asyncio.to_thread(Staged.in_place, local)
        fetch_file, archive = self._file_fetcher(uri)
        try:
            return await self._disk.stage(uri, fetch_file)
        finally:
            if archive is not None:
                await archive.cleanup()

    def track(self, info: AdapterInfo) -> None:
        """Remember a registered adapter's content hash (its disk-tier key)."""
        self._infos[info.adapter_id] = info

    # -- references ------------------------------------------------------------------

    async def acquire(self, info: AdapterInfo) -> int:
        """Take a reference on the adapter and return its device slot, loading it if needed."""
        key = info.adapter_id
        self._infos[key] = info
        self._refs[key] = self._refs.get(key, 0) + 1
        missed = False
        try:
            while True:
                resident = self._device.get(key)
                if resident is not None:
                    resident.speculative = False
                    self._device_policy.on_access(key)
                    if not missed:
                        self._stats.hits["device"] += 1
                    return resident.slot
                if not missed:
                    self._stats.misses["device"] += 1
                    missed = True
                await self._device_flights.run(key, lambda: self._load_to_device(info, False))
        except BaseException:
            self.release(key)
            raise

    def release(self, adapter_id: str) -> None:
        """Drop one reference; wakes a removal waiting for the adapter to drain."""
        n = self._refs.get(adapter_id, 0) - 1
        if n > 0:
            self._refs[adapter_id] = n
        else:
            self._refs.pop(adapter_id, None)
            event = self._drained.get(adapter_id)
            if event is not None:
                event.set()

    def request_done(self, info: AdapterInfo) -> None:
        """A request using ``info`` finished: let prefetch policies react."""
        for policy in self._prefetchers:
            for warm in policy.on_request(info.adapter_id):
                self._hint_by_id(warm.adapter_id, warm.tier)

    # -- pins and removal ------------------------------------------------------------

    async def pin(self, info: AdapterInfo) -> None:
        """Keep the adapter on the device (and its copies in every tier) until unpinned."""
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

    async def unload(self, adapter_id: str, *, tiers: Iterable[str] = ("device", "host")) -> None:
        """Wait for references to drain, then free the adapter from ``tiers``.

        Unpins it. The adapter stays registered; the next request loads it again.
        """
        tiers = set(tiers)
        unknown = tiers - set(_TIERS)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; use {list(_TIERS)}")
        self._pins.discard(adapter_id)
        while True:
            if adapter_id in self._device_flights:
                await self._device_flights.wait(adapter_id)
            elif self._refs.get(adapter_id, 0) > 0:
                event = self._drained.setdefault(adapter_id, asyncio.Event())
                event.clear()
                await event.wait()
            else:
                break
        self._drained.pop(adapter_id, None)
        if "device" in tiers:
            resident = self._device.pop(adapter_id, None)
            if resident is not None:
                assert self._backend is not None
                self._slots[resident.slot] = None
                self._device_policy.on_remove(adapter_id)
                await self._backend.unload(adapter_id)
            elif self._backend is not None and self._backend.capabilities.engine_cache:
                await self._backend.discard(adapter_id)
        if "host" in tiers:
            self._host.pop(adapter_id)
        if "disk" in tiers:
            info = self._infos.get(adapter_id)
            shared = info is not None and any(
                other.sha256 == info.sha256 and not self._is_local(other)
                for other in self._infos.values()
                if other.adapter_id != adapter_id
            )
            if info is not None and not shared:
                await self._disk.delete(info.sha256)

    async def remove(self, adapter_id: str) -> None:
        """Unload the adapter from every tier and forget it (on unregister)."""
        await self.unload(adapter_id, tiers=_TIERS)
        self._infos.pop(adapter_id, None)

    # -- prefetch --------------------------------------------------------------------

    async def on_start(self, infos: Sequence[AdapterInfo]) -> None:
        """The pool started with ``infos`` registered: run the policies' start proposals."""
        by_id = {i.adapter_id: i for i in infos}
        for info in infos:
            self._infos[info.adapter_id] = info
        proposals = [
            (by_id[warm.adapter_id], warm.tier)
            for policy in self._prefetchers
            for warm in policy.on_start(list(by_id))
            if warm.adapter_id in by_id
        ]
        if proposals:
            task = asyncio.create_task(self._preload(proposals), name="preload at start")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _preload(self, proposals: Sequence[tuple[AdapterInfo, TierName]]) -> None:
        """Warm the start proposals in the background, with a progress bar on a terminal."""
        from tqdm.auto import tqdm

        with tqdm(total=len(proposals), desc="preload", unit="adapter", disable=None) as bar:

            async def one(info: AdapterInfo, tier: TierName) -> None:
                await self.warm(info, tier, limited=False)
                bar.update(1)

            await asyncio.gather(*(one(info, tier) for info, tier in proposals))

    def hint(self, info: AdapterInfo, tier: TierName = "device") -> bool:
        """Warm ``info`` into ``tier`` in the background, rate-limited; False if dropped.

        Prefetch policies see the hint too and may propose more.
        """
        accepted = self._hint(info, tier)
        for policy in self._prefetchers:
            for warm in policy.on_hint(info.adapter_id):
                self._hint_by_id(warm.adapter_id, warm.tier)
        return accepted

    def load_for(self, info: AdapterInfo) -> None:
        """A request wanted ``info`` but does not wait for it (cold-start fallback or reject).

        Load it to the device in the background as a request would: unlike a
        hint, it may evict an adapter that requests used (never one in use).
        """
        if self._closed:
            return

        async def load() -> None:
            try:
                await self.acquire(info)
            except LorapoolError as exc:
                log.warning("background load of %s failed: %s", info.adapter_id, exc)
                return
            self.release(info.adapter_id)

        task = asyncio.create_task(load())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _hint_by_id(self, adapter_id: str, tier: TierName) -> None:
        # Policies name adapters; the store knows every registered one it was told about.
        info = self._infos.get(adapter_id)
        if info is not None:
            self._hint(info, tier)

    def _hint(self, info: AdapterInfo, tier: TierName, *, limited: bool = True) -> bool:
        if self._closed or (limited and len(self._pending) >= self._max_pending):
            self._stats.prefetch_dropped += 1
            return False
        task = asyncio.create_task(self.warm(info, tier, limited=limited))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def warm(
        self, info: AdapterInfo, tier: TierName = "host", *, limited: bool = True
    ) -> str | None:
        """Bring ``info`` to ``tier`` if that displaces nothing a request has used.

        Returns the nearest tier the adapter reached (``None`` if the load
        failed). Warming is speculative: when ``tier`` has no room to spare it
        stops at the tier below.
        """
        self._infos[info.adapter_id] = info
        async with self._warm_gate:
            if limited:
                await self._warm_bucket.take()
            self._stats.prefetches += 1
            try:
                if tier == "device":
                    if info.adapter_id in self._device:  # already there: nothing to load
                        return "device"
                    slot = await self._device_flights.run(
                        info.adapter_id, lambda: self._load_to_device(info, True)
                    )
                    if slot is not None or info.adapter_id in self._device:
                        return "device"
                    return "host" if info.adapter_id in self._host else "disk"
                if tier == "host":
                    await self._host_entry(info, speculative=True)
                    return "host" if info.adapter_id in self._host else "disk"
                await self._local_dir(info, speculative=True)
                return "disk"
            except LoadError as exc:
                log.info("prefetch of %s failed: %s", info.adapter_id, exc)
                return None

    def keep_warm(self) -> frozenset[str]:
        """Adapters the prefetch policies want kept on the device now."""
        out: set[str] = set()
        for policy in self._prefetchers:
            out.update(policy.keep_warm())
        return frozenset(out)

    # -- loading ---------------------------------------------------------------------

    async def _load_to_device(self, info: AdapterInfo, speculative: bool) -> int | None:
        assert self._backend is not None
        key = info.adapter_id
        began = time.perf_counter()
        try:
            host = await self._host_entry(info, speculative)
            claim = self._claim_slot(key, speculative)
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
        except LoadError:
            self._stats.load_failures += 1
            raise
        except Exception as exc:
            self._stats.load_failures += 1
            raise LoadError(key, "device", f"{type(exc).__name__}: {exc}") from exc
        if victim is not None:
            self._device_policy.on_remove(victim)
            self._stats.evictions["device"] += 1
            log.debug("evicted %s from device slot %d for %s", victim, slot, key)
        self._device[key] = _Resident(slot, speculative)
        self._device_policy.on_insert(key, host.nbytes, time.perf_counter() - started)
        self._stats.device_loads += 1
        self._stats.load_seconds = 0.8 * self._stats.load_seconds + 0.2 * (
            time.perf_counter() - began
        )
        return slot

    def _claim_slot(self, adapter_id: str, speculative: bool) -> tuple[int, str | None] | None:
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
                f"all {self._max_slots} slots hold adapters in use or pinned",
            )
        warm = self.keep_warm()
        if speculative:
            evictable -= warm
            if not evictable:
                return None
        preferred = evictable - warm or evictable
        victim = self._device_policy.victim(preferred)
        victim_id = victim if isinstance(victim, str) and victim in preferred else min(preferred)
        resident = self._device.pop(victim_id)
        self._slots[resident.slot] = adapter_id
        return resident.slot, victim_id

    async def _host_entry(self, info: AdapterInfo, speculative: bool) -> LoadedAdapter:
        entry = self._host.get(info.adapter_id, use=not speculative)
        if not speculative:
            (self._stats.hits if entry is not None else self._stats.misses)["host"] += 1
        if entry is not None:
            return entry
        return await self._host_flights.run(
            info.adapter_id, lambda: self._read_to_host(info, speculative)
        )

    async def _read_to_host(self, info: AdapterInfo, speculative: bool) -> LoadedAdapter:
        key = info.adapter_id
        self._host.expire(protected=self._protected)
        started = time.perf_counter()
        path = await self._local_dir(info, speculative)
        try:
            entry = await asyncio.to_thread(_read_verified, info, path)
        except _Mismatch as exc:
            self._stats.integrity_failures += 1
            if not self._disk.holds(path):
                log.error("adapter %s refused: %s", key, exc)
                raise LoadError(key, "host", str(exc)) from None
            # The disk copy rotted after it was verified: drop it and fetch again.
            log.error("disk copy of %s failed verification; dropped, fetching it again", key)
            await self._disk.delete(info.sha256)
            path = await self._local_dir(info, speculative)
            try:
                entry = await asyncio.to_thread(_read_verified, info, path)
            except _Mismatch as again:
                self._stats.integrity_failures += 1
                raise LoadError(key, "disk", str(again)) from None
        assert self._backend is not None
        try:
            entry = await self._backend.prepare(entry)
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(key, "host", f"{type(exc).__name__}: {exc}") from exc
        self._stats.host_loads += 1
        evicted = self._host.make_room(
            entry.nbytes, protected=self._protected, speculative=speculative
        )
        if evicted is None:
            log.debug("host tier has no room for %s; serving it without caching", key)
            return entry
        self._host.put(
            key, entry, entry.nbytes, cost=time.perf_counter() - started, speculative=speculative
        )
        return entry

    async def _local_dir(self, info: AdapterInfo, speculative: bool) -> Path:
        """A local directory holding the adapter's files: the source itself, or the disk tier."""
        local = self._in_place(info.source)
        if local is not None:
            return local
        path = self._disk.get(info.sha256, use=not speculative)
        if not speculative:
            (self._stats.hits if path is not None else self._stats.misses)["disk"] += 1
        if path is not None:
            return path
        return await self._disk_flights.run(
            info.sha256, lambda: self._fetch_to_disk(info, speculative)
        )

    async def _fetch_to_disk(self, info: AdapterInfo, speculative: bool) -> Path:
        await self._disk.expire(self._protected_sha)
        fetch_file, archive = self._file_fetcher(info.source)
        try:
            path, fetched = await self._disk.fetch(
                info.sha256,
                fetch_file,
                protected=self._protected_sha,
                speculative=speculative,
            )
        except AdapterValidationError as exc:
            raise LoadError(info.adapter_id, "source", f"the archive is refused: {exc}") from None
        except SourceNotFound as exc:
            raise LoadError(info.adapter_id, "source", f"{exc}; it no longer exists") from None
        except SourceError as exc:
            if isinstance(exc, ContentMismatch):
                self._stats.integrity_failures += 1
                log.error("adapter %s refused: %s", info.adapter_id, exc.detail)
            raise LoadError(info.adapter_id, "source", str(exc)) from None
        except DiskFull as exc:
            raise LoadError(info.adapter_id, "disk", str(exc)) from None
        finally:
            if archive is not None:
                await archive.cleanup()
        self._stats.disk_fetches += 1
        scheme = scheme_of(info.source)
        self._stats.source_fetches[scheme] = self._stats.source_fetches.get(scheme, 0) + 1
        self._stats.fetched_bytes += fetched
        return path

    async def _fetch_file(self, source: Source, uri: str, name: str, dest: Path) -> int:
        """One file from a source, retrying transient errors with exponential backoff."""
        attempt = 0
        while True:
            try:
                return await source.fetch(uri, name, dest)
            except SourceError as exc:
                if not exc.transient or attempt >= self.retries:
                    raise
                delay = self.retry_backoff * 2**attempt
                attempt += 1
                self._stats.fetch_retries += 1
                log.info("retrying %s/%s in %.2fs after: %s", uri, name, delay, exc)
                await asyncio.sleep(delay)


class _Mismatch(Exception):
    pass


def _read_verified(info: AdapterInfo, path: Path) -> LoadedAdapter:
    """Read an adapter's files and check the registered sha256."""
    try:
        config_raw = (path / CONFIG_FILE).read_bytes()
        weights = (path / WEIGHTS_FILE).read_bytes()
    except OSError as exc:
        raise LoadError(info.adapter_id, "host", f"cannot read {path}: {exc}") from exc
    if adapter_digest({CONFIG_FILE: config_raw, WEIGHTS_FILE: weights}) != info.sha256:
        raise _Mismatch(
            f"sha256 mismatch for {path}: the files changed since registration; "
            "register the new content as a new adapter"
        )
    return LoadedAdapter(info.adapter_id, info.config, weights, info.sha256)
