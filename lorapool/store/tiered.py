"""TieredStore: where each adapter lives, and bringing it to the device.

Tiers, nearest the device first:

* ``device``: the backend's slots, at most ``max_slots`` adapters
  (:mod:`~lorapool.store.device`);
* ``host``: verified adapter bytes in RAM, at most ``host_bytes``
  (:mod:`~lorapool.store.host`);
* ``disk``: verified copies of remote adapters under ``disk_dir``, at most
  ``disk_bytes``, named by content (sha256) so they survive restarts
  (:mod:`~lorapool.store.disk`);
* ``source``: where the adapter comes from (a local path, ``s3://``,
  ``http(s)://``), one :class:`~lorapool.abc.Source` per scheme
  (:mod:`~lorapool.store.fetch`).

Each tier is reached through the same get-or-fill (:mod:`~lorapool.store.ladder`):
look up, count a hit or a miss, and on a miss fill it from the tier below,
one fill per key however many requests miss at once. Loads run as tasks and
threads, never inside the engine's step. Every copy is checked against the
sha256 recorded at registration before it is used or made visible; every file
is read under the caps of :mod:`lorapool.sources.caps` (see
:mod:`~lorapool.store.fetch`), and registration validates a private copy.

A request holds a reference on its adapter from dispatch to its last token;
an adapter with references, or pinned, is never evicted from any tier
(:mod:`~lorapool.store.references`). Prefetches warm adapters speculatively
(:mod:`~lorapool.store.prefetch`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapool import tracing
from lorapool.abc import Source
from lorapool.errors import (
    AdapterNotFound,
    LoadError,
    LorapoolError,
    PinLimitExceeded,
    SignatureError,
)
from lorapool.retry import RetryPolicy, resolve_retry
from lorapool.store.device import DeviceSlots
from lorapool.store.disk import DiskTier, Staged
from lorapool.store.fetch import Fetcher
from lorapool.store.host import HostTier, Verifier
from lorapool.store.ladder import Rung
from lorapool.store.prefetch import Prefetcher
from lorapool.store.references import References
from lorapool.store.stats import TIERS, StoreStats
from lorapool.store.tiers import parse_size
from lorapool.types import AdapterInfo, LoadedAdapter

if TYPE_CHECKING:
    from lorapool.abc import Backend, PrefetchPolicy, TierName

__all__ = ["StoreStats", "TieredStore", "parse_size"]

log = logging.getLogger(__name__)


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
    ``retry`` is how transient source errors are retried (default
    ``RetryPolicy(initial=0.2)``); ``retries``/``retry_backoff`` are the older
    spelling of its ``attempts - 1`` and ``initial``.
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
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        prefetch_concurrency: int = 2,
        prefetch_rate: float = 20.0,
        max_pending_prefetch: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from lorapool.plugins import policies_for_tiers

        policies = policies_for_tiers(eviction)
        if prefetch is None:
            prefetchers: list[PrefetchPolicy] = []
        elif isinstance(prefetch, Sequence):
            prefetchers = list(prefetch)
        else:
            prefetchers = [prefetch]
        self.host_capacity = parse_size(host_bytes)
        self._stats = StoreStats()
        self._infos: dict[str, AdapterInfo] = {}
        self._gone: set[tuple[str, str]] = set()  # (id, sha256) forgotten: never loaded again
        self._purging: dict[str, _Purge] = {}  # purges running, by adapter id
        self._refs = References(self._infos)
        self._prefetch = Prefetcher(
            prefetchers,
            self._stats,
            infos=self._infos,
            warm=self.warm,
            concurrency=prefetch_concurrency,
            rate=prefetch_rate,
            max_pending=max_pending_prefetch,
            clock=clock,
        )
        self._pending = self._prefetch.pending  # background tasks
        self._disk = DiskTier(
            disk_dir, None if disk_bytes is None else parse_size(disk_bytes), policies["disk"]
        )
        self._fetcher = Fetcher(
            sources,
            self._disk,
            self._stats,
            retry=resolve_retry(retry, retries, retry_backoff, Fetcher.default_retry),
            protected_sha=self._refs.protected_sha,
        )
        self._host = HostTier(
            self.host_capacity,
            policies["host"],
            self._stats,
            disk=self._disk,
            local_dir=self._local_dir,
            protected=self._refs.protected,
        )
        self._device = DeviceSlots(
            policies["device"],
            self._stats,
            host_entry=self._host_entry,
            protected=self._refs.protected,
            keep_warm=self._prefetch.keep_warm,
        )
        # The ladder: device <- host <- disk <- source, one get-or-fill per tier.
        self._device_rung: Rung[str, int | None] = Rung(
            "device", self._device.lookup, self._stats, recheck=True
        )
        self._host_rung: Rung[str, LoadedAdapter] = Rung("host", self._host.lookup, self._stats)
        self._disk_rung: Rung[str, Path] = Rung(
            "disk", lambda sha, use: self._disk.get(sha, use=use), self._stats
        )

    # -- wiring ----------------------------------------------------------------------

    def bind(self, backend: Backend) -> None:
        """Attach to a started backend (called by the pool)."""
        self._device.bind(backend)
        self._host.bind(backend)
        self._disk.open()

    def verify_with(self, verifier: Verifier | None, *, files: Sequence[str] = ()) -> None:
        """Check the files of every read that fills host RAM with ``verifier`` before they
        are used (it raises to refuse them; the pool's checks signatures). ``None``: no
        check beyond the registered sha256. ``files``: optional small files to stage with
        every new adapter, for the registration's own check (the signature file)."""
        self._host.verify = verifier
        self._fetcher.extra_files = tuple(files)

    async def aclose(self) -> None:
        """Stop prefetches, close the sources, drop a temporary disk tier. Idempotent."""
        if self._prefetch.closed:
            return
        self._prefetch.close()
        for rung in (self._device_rung, self._host_rung, self._disk_rung):
            rung.flights.cancel_all()
        await self._prefetch.wait_closed()
        await self._fetcher.aclose()
        await asyncio.to_thread(self._disk.close)

    @property
    def retry(self) -> RetryPolicy:
        """How a transient source error is retried (per file)."""
        return self._fetcher.retry

    @retry.setter
    def retry(self, policy: RetryPolicy) -> None:
        self._fetcher.retry = policy

    @property
    def retries(self) -> int:
        """Retries of a transient source error (per file): ``retry.attempts - 1``."""
        return self._fetcher.retry.retries

    @retries.setter
    def retries(self, value: int) -> None:
        self.retry = self.retry.with_legacy(value, None)

    @property
    def retry_backoff(self) -> float:
        """Ceiling of the first retry's wait, in seconds: ``retry.initial``."""
        return self._fetcher.retry.initial

    @retry_backoff.setter
    def retry_backoff(self, value: float) -> None:
        self.retry = self.retry.with_legacy(None, value)

    # -- what is where ---------------------------------------------------------------

    @property
    def stats(self) -> StoreStats:
        """Counters since the store started (evictions per tier read from the tiers)."""
        self._stats.evictions.update(host=self._host.tier.evictions, disk=self._disk.tier.evictions)
        return self._stats

    @property
    def host_bytes(self) -> int:
        """Bytes held in the host tier."""
        return self._host.tier.used

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
        return adapter_id in self._host.tier

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
        return self._device.resident

    @property
    def device_bytes(self) -> int:
        """Device bytes the resident adapters take, where the backend sizes its slots in
        bytes (``Capabilities.device_bytes``); 0 otherwise."""
        return self._device.used_bytes

    @property
    def in_use(self) -> int:
        """Distinct adapters that requests in flight hold (the running batch's adapters)."""
        return len(self._refs)

    def refs(self, adapter_id: str) -> int:
        """References (requests in flight) on an adapter."""
        return self._refs.count(adapter_id)

    @property
    def pinned(self) -> frozenset[str]:
        """Pinned adapter ids."""
        return frozenset(self._refs.pins)

    def can_dispatch(self, adapter_id: str | None, inflight: Mapping[str, int]) -> bool:
        """Would one more request for ``adapter_id`` keep distinct adapters within the slots
        (and, under a byte budget, their known device bytes within it)?"""
        if adapter_id is None or adapter_id in inflight:
            return True
        needed = set(inflight) | self._refs.pins | {adapter_id}
        return len(needed) <= self._device.max_slots and self._device.fits(adapter_id, needed)

    # -- registration ----------------------------------------------------------------

    def source_for(self, uri: str) -> Source:
        """The source that serves ``uri``'s scheme (created on first use)."""
        return self._fetcher.source_for(uri)

    async def stage(self, uri: str) -> Staged:
        """Bring a new adapter's files somewhere local to be validated at registration.

        Local adapter directories are inspected in place. Remote ones, and
        archives from anywhere, are downloaded (and extracted) to a staging
        directory; :meth:`Staged.commit` moves the copy into the disk tier,
        :meth:`Staged.discard` deletes it.
        """
        return await self._fetcher.stage(uri)

    def held(self) -> list[AdapterInfo]:
        """The adapters this store knows (registered or served here): each may be in a
        tier, or none."""
        return list(self._infos.values())

    def track(self, info: AdapterInfo) -> None:
        """Remember a registered adapter's content hash (its disk-tier key)."""
        self._gone.discard((info.adapter_id, info.sha256))  # registered again
        self._infos[info.adapter_id] = info

    def source_deletable(self, uri: str) -> bool:
        """Whether the source of ``uri`` can delete the adapter there (an archive: the
        archive itself)."""
        return self._fetcher.source_for(uri).can_delete(uri)

    async def delete_source(self, uri: str) -> list[str]:
        """Delete the adapter at ``uri`` from its source (its directory, or its archive);
        returns what was deleted."""
        return await self._fetcher.source_for(uri).delete(uri)

    # -- references ------------------------------------------------------------------

    async def acquire(self, info: AdapterInfo) -> int:
        """Take a reference on the adapter and return its device slot, loading it if needed."""
        key = info.adapter_id
        if (key, info.sha256) in self._gone:
            raise AdapterNotFound(key)
        self._infos[key] = info
        self._refs.take(key)
        try:
            slot = await self._device_rung.get(key, lambda: self._device.load(info, False))
            assert slot is not None  # a request waits until the adapter has a slot
            return slot
        except BaseException:
            self.release(key)
            raise

    def release(self, adapter_id: str) -> None:
        """Drop one reference; wakes a removal waiting for the adapter to drain."""
        self._refs.release(adapter_id)

    def request_done(self, info: AdapterInfo) -> None:
        """A request using ``info`` finished: let prefetch policies react."""
        self._prefetch.request_done(info.adapter_id)

    # -- pins and removal ------------------------------------------------------------

    async def pin(self, info: AdapterInfo) -> None:
        """Keep the adapter on the device (and its copies in every tier) until unpinned."""
        key = info.adapter_id
        pins, slots = self._refs.pins, self._device.max_slots
        if key in pins:
            return
        if len(pins) + 1 >= slots:
            raise PinLimitExceeded(
                f"cannot pin {key!r}: {len(pins)} of {slots} device slots are "
                f"pinned and at most {slots - 1} may be, so that other adapters can "
                "still be served; unpin one or start the backend with more slots"
            )
        await self.acquire(info)
        try:
            pins.add(key)
        finally:
            self.release(key)

    def unpin(self, adapter_id: str) -> None:
        """Let the adapter be evicted again."""
        self._refs.pins.discard(adapter_id)

    async def unload(self, adapter_id: str, *, tiers: Iterable[str] = ("device", "host")) -> None:
        """Wait for references to drain, then free the adapter from ``tiers``.

        Unpins it. The adapter stays registered; the next request loads it again.
        """
        tiers = set(tiers)
        unknown = tiers - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; use {list(TIERS)}")
        self._refs.pins.discard(adapter_id)
        loads = self._device_rung.flights
        while True:
            if adapter_id in loads:
                await loads.wait(adapter_id)
            elif self._refs.count(adapter_id) > 0:
                await self._refs.drained(adapter_id)
            else:
                break
        self._refs.forget_waiters(adapter_id)
        if "device" in tiers:
            await self._device.unload(adapter_id)
        if "host" in tiers:
            self._host.tier.pop(adapter_id)
        if "disk" in tiers:
            info = self._infos.get(adapter_id)
            shared = info is not None and any(
                other.sha256 == info.sha256 and self._fetcher.in_place(other.source) is None
                for other in self._infos.values()
                if other.adapter_id != adapter_id
            )
            if info is not None and not shared:
                await self._disk.delete(info.sha256)

    async def remove(self, adapter_id: str) -> None:
        """Unload the adapter from every tier and forget it (on unregister)."""
        await self.unload(adapter_id, tiers=TIERS)
        self._infos.pop(adapter_id, None)
        self._device.forget_size(adapter_id)

    async def purge(self, info: AdapterInfo, *, keep_disk: bool) -> tuple[list[str], Path | None]:
        """Remove a forgotten adapter from every tier for good (``AdapterPool.forget``).

        From now on it is never loaded again (a request's acquire is
        :class:`~lorapool.errors.AdapterNotFound`, a prefetch does nothing). Waits for
        loads of it in flight in any tier and for its references, then frees its slot
        (and the engine's cache of it), its host copy and, unless ``keep_disk`` (another
        registered adapter has the same content), its disk copy. Returns the tiers it was
        in and the disk-tier directory deleted.

        Purges of one adapter run one at a time, and one that waited for another reports
        the tiers that one emptied too: a replica's follower (``AdapterPool.follower``)
        and a forget's broadcast may both purge it, and the forget's report must still say
        where the replica held it.
        """
        key = info.adapter_id
        earlier: list[str] = []
        while (running := self._purging.get(key)) is not None:
            await running.done.wait()
            earlier += [t for t in running.tiers if t not in earlier]
        mine = self._purging[key] = _Purge()
        try:
            mine.tiers, deleted = await self._purge(info, keep_disk=keep_disk)
        finally:
            del self._purging[key]
            mine.done.set()
        return earlier + [t for t in mine.tiers if t not in earlier], deleted

    async def _purge(self, info: AdapterInfo, *, keep_disk: bool) -> tuple[list[str], Path | None]:
        key, sha = info.adapter_id, info.sha256
        self._gone.add((key, sha))
        self._refs.pins.discard(key)
        while True:
            if key in self._device_rung.flights:
                await self._device_rung.flights.wait(key)
            elif key in self._host_rung.flights:
                await self._host_rung.flights.wait(key)
            elif not keep_disk and sha in self._disk_rung.flights:
                await self._disk_rung.flights.wait(sha)
            elif self._refs.count(key) > 0:
                await self._refs.drained(key)
            else:
                break
        self._refs.forget_waiters(key)
        tiers: list[str] = []
        if key in self._device:
            tiers.append("device")
        await self._device.unload(key)  # also out of an engine's own cache
        self._device.forget_size(key)
        if self._host.tier.pop(key) is not None:
            tiers.append("host")
        deleted = None
        if not keep_disk:
            deleted = self._disk.get(sha, use=False)
            if deleted is not None:
                tiers.append("disk")
                await self._disk.delete(sha)
        elif sha in self._disk.tier:
            tiers.append("disk (kept: shared content)")
        self._infos.pop(key, None)
        return tiers, deleted

    # -- prefetch --------------------------------------------------------------------

    async def on_start(self, infos: Sequence[AdapterInfo]) -> None:
        """The pool started with ``infos`` registered: run the policies' start proposals."""
        for info in infos:
            self._infos[info.adapter_id] = info
        self._prefetch.on_start(infos)

    def hint(self, info: AdapterInfo, tier: TierName = "device") -> bool:
        """Warm ``info`` into ``tier`` in the background, rate-limited; False if dropped.

        Prefetch policies see the hint too and may propose more.
        """
        return self._prefetch.hint(info, tier)

    def load_for(self, info: AdapterInfo) -> None:
        """A request wanted ``info`` but does not wait for it (cold-start fallback or reject).

        Load it to the device in the background as a request would: unlike a
        hint, it may evict an adapter that requests used (never one in use).
        """
        if self._prefetch.closed:
            return

        async def load() -> None:
            try:
                await self.acquire(info)
            except LorapoolError as exc:
                log.warning("background load of %s failed: %s", info.adapter_id, exc)
                return
            self.release(info.adapter_id)

        self._prefetch.spawn(load())

    async def warm(
        self, info: AdapterInfo, tier: TierName = "host", *, limited: bool = True
    ) -> str | None:
        """Bring ``info`` to ``tier`` if that displaces nothing a request has used.

        Returns the nearest tier the adapter reached (``None`` if the load
        failed). Warming is speculative: when ``tier`` has no room to spare it
        stops at the tier below.
        """
        key = info.adapter_id
        if (key, info.sha256) in self._gone:
            return None
        self._infos[key] = info
        async with self._prefetch.turn(limited=limited):
            if (key, info.sha256) in self._gone:  # forgotten while waiting for its turn
                return None
            try:
                if tier == "device":
                    slot = await self._device_rung.get(
                        key, lambda: self._device.load(info, True), speculative=True
                    )
                    if slot is not None or key in self._device:
                        return "device"
                    return "host" if key in self._host.tier else "disk"
                if tier == "host":
                    await self._host_entry(info, speculative=True)
                    return "host" if key in self._host.tier else "disk"
                await self._local_dir(info, speculative=True)
                return "disk"
            except (LoadError, SignatureError) as exc:
                log.info("prefetch of %s failed: %s", key, exc)
                return None

    def keep_warm(self) -> frozenset[str]:
        """Adapters the prefetch policies want kept on the device now."""
        return self._prefetch.keep_warm()

    # -- the ladder ------------------------------------------------------------------
    # The device rung is climbed by acquire (a request) and warm (a prefetch); its
    # fill, DeviceSlots.load, climbs the host rung here, whose fill climbs the disk rung.

    async def _host_entry(self, info: AdapterInfo, speculative: bool) -> LoadedAdapter:
        """The adapter's prepared bytes, read from a local directory on a miss."""
        return await self._host_rung.get(
            info.adapter_id,
            lambda: self._host.load(info, speculative),
            speculative=speculative,
        )

    async def _local_dir(self, info: AdapterInfo, speculative: bool) -> Path:
        """A local directory holding the adapter's files: the source itself, or the disk tier."""
        local = self._fetcher.in_place(info.source)
        if local is not None:
            return local
        return await self._disk_rung.get(
            info.sha256,
            lambda: self._fetch(info, speculative),
            speculative=speculative,
        )

    async def _fetch(self, info: AdapterInfo, speculative: bool) -> Path:
        """Download the adapter into the disk tier (timed and traced as the disk tier's fill)."""
        with tracing.span("lorapool.store.load", tier="disk", adapter=info.adapter_id):
            started = time.perf_counter()
            path = await self._fetcher.fetch(info, speculative)
            self._stats.loaded("disk", info.adapter_id, time.perf_counter() - started)
            return path


class _Purge:
    """A purge in progress: the tiers it emptied, once ``done`` is set."""

    __slots__ = ("done", "tiers")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.tiers: list[str] = []
