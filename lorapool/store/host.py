"""The host tier: verified adapter bytes in RAM, in the backend's prepared form.

Filling it reads the adapter's two files from a local directory (the source
itself, or the disk tier's copy), checks them against the sha256 recorded at
registration, and lets the backend prepare them (``Backend.prepare``). A disk
copy that fails the check, or cannot be read (a file missing, unreadable, of
the wrong size), rotted after it was verified: it is dropped and fetched again
from the source, once. The files' sizes are checked against the registered size
before anything is read, so a file that grew is never read into memory. When
the tier cannot make room without evicting an adapter in use or pinned, the
adapter is served without being kept. Every read's files go through the tier's
:data:`Verifier` when it has one (the pool's signature check) before they are used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lorapool import tracing
from lorapool.errors import LoadError
from lorapool.formats import CONFIG_FILE, WEIGHTS_FILE, adapter_digest
from lorapool.store.disk import DiskTier
from lorapool.store.stats import StoreStats
from lorapool.store.tiers import Tier
from lorapool.types import AdapterInfo, LoadedAdapter

if TYPE_CHECKING:
    from lorapool.abc import Backend, EvictionPolicy

__all__ = ["HostTier", "Verifier"]

Verifier = Callable[[AdapterInfo, Mapping[str, bytes], bool], Awaitable[None]]
"""Checks the files read to fill the host tier (``{name: bytes}``, the config and the
weights) before they are used, and raises to refuse them; the pool's checks the adapter's
signature (:mod:`lorapool.signing`). Called on every read, also with the bytes of a copy
that failed the store's own sha256 check, so the verifier can name the mismatch before
the store refuses it as a :class:`LoadError`. The third argument says whether the store
found the files' content digest equal to ``info.sha256`` (so the verifier need not hash
the weights again)."""

log = logging.getLogger(__name__)


class HostTier:
    """The host tier's entries (:attr:`tier`) and its fill (:meth:`load`).

    ``local_dir(info, speculative)`` gives a local directory holding the
    adapter's files (reading the disk tier, or filling it, for a remote
    adapter); ``protected(adapter_id)`` says whether an entry may not be evicted.
    """

    def __init__(
        self,
        capacity: int | None,
        policy: EvictionPolicy,
        stats: StoreStats,
        *,
        disk: DiskTier,
        local_dir: Callable[[AdapterInfo, bool], Awaitable[Path]],
        protected: Callable[[str], bool],
    ) -> None:
        self.tier: Tier[str, LoadedAdapter] = Tier("host", capacity, policy)
        self._stats = stats
        self._disk = disk
        self._local_dir = local_dir
        self._protected = protected
        self._backend: Backend | None = None
        self.verify: Verifier | None = None
        """Checks every read's files before they are used (see :data:`Verifier`)."""

    def bind(self, backend: Backend) -> None:
        """Attach to the backend that prepares what the tier holds."""
        self._backend = backend

    def lookup(self, adapter_id: str, use: bool) -> LoadedAdapter | None:
        """The adapter's prepared bytes, if the tier holds them; ``use`` counts an access."""
        return self.tier.get(adapter_id, use=use)

    async def load(self, info: AdapterInfo, speculative: bool) -> LoadedAdapter:
        """Read, verify and prepare the adapter, and keep it if there is room."""
        with tracing.span("lorapool.store.load", tier="host", adapter=info.adapter_id):
            return await self._load(info, speculative)

    async def _load(self, info: AdapterInfo, speculative: bool) -> LoadedAdapter:
        key = info.adapter_id
        for expired, _ in self.tier.expire(protected=self._protected):
            self._stats.evicted("host", expired)
        started = time.perf_counter()
        entry = await self._read(info, speculative)
        assert self._backend is not None
        try:
            entry = await self._backend.prepare(entry)
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(key, "host", f"{type(exc).__name__}: {exc}") from exc
        self._stats.host_loads += 1
        self._stats.loaded("host", key, time.perf_counter() - started)
        evicted = self.tier.make_room(
            entry.nbytes, protected=self._protected, speculative=speculative
        )
        for victim, _ in evicted or ():
            self._stats.evicted("host", victim)
        if evicted is None:
            log.debug("host tier has no room for %s; serving it without caching", key)
            return entry
        self.tier.put(
            key, entry, entry.nbytes, cost=time.perf_counter() - started, speculative=speculative
        )
        return entry

    async def _read(self, info: AdapterInfo, speculative: bool) -> LoadedAdapter:
        """The adapter's verified files.

        A disk copy that is rotten (sha256 or size mismatch) or unreadable (a file
        missing or unreadable) is dropped and fetched again from the source, once;
        if the source no longer has the adapter, the fetch's LoadError says so.
        """
        key = info.adapter_id
        path = await self._local_dir(info, speculative)
        try:
            return await self._read_checked(info, path)
        except _BadCopy as exc:
            if exc.integrity:
                self._stats.integrity_failures += 1
            if not self._disk.holds(path):
                log.error("adapter %s refused: %s", key, exc)
                await self._verify_bad(info, exc)
                raise LoadError(key, "host", str(exc)) from None
            log.error("disk copy of %s is unusable (%s); dropped, fetching it again", key, exc)
        await self._disk.delete(info.sha256)
        path = await self._local_dir(info, speculative)
        try:
            return await self._read_checked(info, path)
        except _BadCopy as again:
            if again.integrity:
                self._stats.integrity_failures += 1
            await self._verify_bad(info, again)
            raise LoadError(key, "disk", str(again)) from None

    async def _read_checked(self, info: AdapterInfo, path: Path) -> LoadedAdapter:
        """The files of ``path`` checked against the registered content, then by
        :attr:`verify`."""
        files = await asyncio.to_thread(_read_verified, info, path)
        if self.verify is not None:
            await self.verify(info, files, True)
        return LoadedAdapter(info.adapter_id, info.config, files[WEIGHTS_FILE], info.sha256)

    async def _verify_bad(self, info: AdapterInfo, bad: _BadCopy) -> None:
        """Let :attr:`verify` name what is wrong with files that failed the sha256 check
        (it raises for a signed adapter); the store refuses them anyway after."""
        if self.verify is not None and bad.files is not None:
            await self.verify(info, bad.files, False)


class _BadCopy(Exception):
    """The files cannot be used: unreadable, or (``integrity``) not the registered content."""

    def __init__(
        self, message: str, *, integrity: bool, files: dict[str, bytes] | None = None
    ) -> None:
        super().__init__(message)
        self.integrity = integrity
        self.files = files
        """The files as read (at most the registered size each) when they were readable."""


def _read_verified(info: AdapterInfo, path: Path) -> dict[str, bytes]:
    """Read an adapter's files and check the registered size, then sha256.

    The sizes are checked before a byte is read; each file is read to at most
    its expected size plus one byte (a copy of the wrong size, to at most the
    registered size plus one, for :attr:`HostTier.verify` to name the mismatch).
    """
    try:
        sizes = [(path / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)]
        if sum(sizes) != info.size_bytes:
            raise _BadCopy(
                f"sha256 mismatch for {path}: the files changed since registration "
                f"({sum(sizes)} bytes, {info.size_bytes} registered); "
                "register the new content as a new adapter",
                integrity=True,
                files={
                    name: _read_at_most(path / name, min(size, info.size_bytes))
                    for name, size in zip((CONFIG_FILE, WEIGHTS_FILE), sizes, strict=True)
                },
            )
        files = {
            CONFIG_FILE: _read_at_most(path / CONFIG_FILE, sizes[0]),
            WEIGHTS_FILE: _read_at_most(path / WEIGHTS_FILE, sizes[1]),
        }
    except OSError as exc:
        raise _BadCopy(f"cannot read {path}: {exc}", integrity=False) from exc
    if adapter_digest(files) != info.sha256:
        raise _BadCopy(
            f"sha256 mismatch for {path}: the files changed since registration; "
            "register the new content as a new adapter",
            integrity=True,
            files=files,
        )
    return files


def _read_at_most(path: Path, size: int) -> bytes:
    """At most ``size + 1`` bytes of ``path`` (one more than expected shows it grew)."""
    with path.open("rb") as f:
        return f.read(size + 1)
