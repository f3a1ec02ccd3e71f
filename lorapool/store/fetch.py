"""Getting an adapter's files from its source: resolution, retries, archives, staging.

Each URI scheme has one :class:`~lorapool.abc.Source` (made on first use
unless the store was given one). Local adapter directories are read in place
once registered; remote adapters, and archives from anywhere, are downloaded
file by file (an archive is fetched once and extracted) into the disk tier.
Transient source errors are retried under the store's
:class:`~lorapool.retry.RetryPolicy` (capped, jittered exponential backoff); the
rest become :class:`~lorapool.errors.LoadError` naming the tier that failed.

Registration stages every adapter, local ones included, as a private copy
(:meth:`Fetcher.stage`): what is validated and recorded is what was hashed.

Every file is fetched under caps enforced while it is read
(:mod:`lorapool.sources.caps`): ``adapter_config.json`` and the sidecar under
``ValidationLimits.max_config_bytes``, config and weights together under the
per-adapter cap ``ValidationLimits.max_total_bytes`` or, for a copy kept in the
disk tier, ``disk_bytes`` when smaller, and when loading a registered adapter
under the size recorded for it; an archive's expansion under the same cap. Each
file's size is checked again once written, for sources that ignore the cap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from lorapool.abc import Source, conform
from lorapool.errors import (
    AdapterValidationError,
    ContentMismatch,
    DiskFull,
    LoadError,
    NotAPeftAdapter,
    SourceError,
    SourceNotFound,
)
from lorapool.formats import (
    ADAPTER_FILES,
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    ValidationLimits,
)
from lorapool.retry import RetryPolicy
from lorapool.sources import make_source, scheme_of
from lorapool.sources.archive import ArchiveFiles, is_archive_uri, split_archive_uri
from lorapool.sources.caps import DEFAULT_LIMIT, FetchLimit, limit_fetch
from lorapool.sources.local import copy_adapter_file
from lorapool.store.disk import DiskTier, FetchFile, Staged
from lorapool.store.stats import StoreStats
from lorapool.types import AdapterInfo

__all__ = ["Fetcher"]

log = logging.getLogger(__name__)


class Fetcher:
    """The sources by scheme, and the disk tier's fill (:meth:`fetch`).

    ``protected_sha(sha)`` says whether a disk copy may not be evicted.
    """

    default_retry = RetryPolicy(initial=0.2)
    """The store's retry policy unless it is given one: 4 attempts, 0.2 s doubling."""

    def __init__(
        self,
        sources: Mapping[str, Source] | None,
        disk: DiskTier,
        stats: StoreStats,
        *,
        retry: RetryPolicy,
        protected_sha: Callable[[str], bool],
    ) -> None:
        self.sources: dict[str, Source] = {
            scheme: conform(source, Source) for scheme, source in (sources or {}).items()
        }
        """The source of each scheme used so far (and those given)."""
        self.retry = retry
        """How transient source errors are retried (per file)."""
        self._disk = disk
        self._stats = stats
        self._protected_sha = protected_sha
        self.extra_files: tuple[str, ...] = ()
        """Optional files staged with a new adapter when its source has them, each capped
        like ``adapter_config.json`` (the signature file, when the store verifies them)."""

    async def aclose(self) -> None:
        """Close every source (they reopen on next use)."""
        for source in self.sources.values():
            await source.aclose()

    def source_for(self, uri: str) -> Source:
        """The source that serves ``uri``'s scheme (created on first use)."""
        scheme = scheme_of(uri)
        source = self.sources.get(scheme)
        if source is None:
            source = make_source(scheme)
            self.sources[scheme] = source
        return source

    def in_place(self, uri: str) -> Path | None:
        """The adapter directory itself when ``uri`` is local and not an archive."""
        if is_archive_uri(uri):
            return None
        return self.source_for(uri).local_path(uri)

    def adapter_limit(self, kept_on_disk: bool) -> FetchLimit:
        """The cap on one adapter's bytes: the per-adapter cap, or ``disk_bytes`` when
        smaller and the copy is to be kept in the disk tier."""
        capacity = self._disk.tier.capacity
        if kept_on_disk and capacity is not None and capacity < DEFAULT_LIMIT.max_bytes:
            return FetchLimit(capacity, f"the disk tier's disk_bytes ({capacity} bytes)")
        return DEFAULT_LIMIT

    async def stage(self, uri: str) -> Staged:
        """A new adapter's files as a private copy, inspected and hashed.

        Remote adapters and archives are downloaded (and extracted) to the
        staging area; a local directory is copied there too (symlinks refused),
        so registration validates the bytes it hashed even if the directory
        changes meanwhile. Everything is read under the caps.
        """
        local = self.in_place(uri)
        if local is not None:
            await asyncio.to_thread(_check_local_dir, local)

            async def copy(name: str, dest: Path) -> int:
                return await copy_adapter_file(local, name, dest, follow_symlinks=False)

            fetch = _CappedFiles(copy, self.adapter_limit(False), str(local), self.extra_files)
            return await self._disk.stage(
                str(local.resolve()),
                fetch,
                label=str(local),
                keep=False,
                optional=self.extra_files,
            )
        limit = self.adapter_limit(True)
        fetch_file, archive = self._file_fetcher(uri, limit)
        try:
            return await self._disk.stage(
                uri,
                _CappedFiles(fetch_file, limit, uri, self.extra_files),
                optional=self.extra_files,
            )
        finally:
            if archive is not None:
                await archive.cleanup()

    async def fetch(self, info: AdapterInfo, speculative: bool) -> Path:
        """Download the adapter into the disk tier, verified, and return its directory.

        The files are read under the registered size (and the caps): a source
        that now serves more is stopped there.
        """
        await self._disk.expire(self._protected_sha)
        limit = self.adapter_limit(True)
        fetch_file, archive = self._file_fetcher(info.source, limit)
        if info.size_bytes < limit.max_bytes:
            limit = FetchLimit(
                info.size_bytes, f"the size registered for the adapter ({info.size_bytes} bytes)"
            )
        try:
            path, fetched = await self._disk.fetch(
                info.sha256,
                _CappedFiles(fetch_file, limit, info.source),
                protected=self._protected_sha,
                speculative=speculative,
            )
        except AdapterValidationError as exc:
            log.error("adapter %s refused: %s", info.adapter_id, exc.detail)
            raise LoadError(info.adapter_id, "source", f"refused: {exc}") from None
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

    def _file_fetcher(self, uri: str, limit: FetchLimit) -> tuple[FetchFile, ArchiveFiles | None]:
        """How to fetch the adapter's files one by one (an archive is fetched once, extracted).

        ``limit`` bounds an archive: the object fetched and what it expands to.
        """
        source = self.source_for(uri)
        if not is_archive_uri(uri):
            return (lambda name, dest: self._fetch_file(source, uri, name, dest)), None
        parent, name = split_archive_uri(uri)

        async def fetch_archive(dest: Path) -> int:
            with limit_fetch(limit):
                return await self._fetch_file(source, parent, name, dest)

        archive = ArchiveFiles(uri, fetch_archive, self._disk.workdir, limit)
        return archive, archive

    async def _fetch_file(self, source: Source, uri: str, name: str, dest: Path) -> int:
        """One file from a source, transient errors retried under :attr:`retry`."""

        def on_retry(exc: BaseException, delay: float) -> None:
            self._stats.fetch_retries += 1
            log.info("retrying %s/%s in %.2fs after: %s", uri, name, delay, exc)

        return await self.retry.call(
            lambda: source.fetch(uri, name, dest), _transient, on_retry=on_retry
        )


def _transient(exc: BaseException) -> bool:
    """A source error the source says may pass (a timeout, a 5xx, a throttle)."""
    return isinstance(exc, SourceError) and exc.transient


class _CappedFiles:
    """One adapter's files fetched under its caps, each checked again once written.

    ``adapter_config.json``, the sidecar and the ``small`` files are each capped at
    ``ValidationLimits.max_config_bytes``; config and weights together at
    ``total``. The fetch runs under :func:`~lorapool.sources.caps.limit_fetch`
    so a source stops reading at the cap; a file found over it afterwards
    (a source that ignores the cap) is deleted and refused all the same.
    """

    def __init__(
        self, fetch: FetchFile, total: FetchLimit, label: str, small: tuple[str, ...] = ()
    ) -> None:
        self._small = (CONFIG_FILE, SIDECAR_FILE, *small)
        self._fetch = fetch
        self._total = total
        self._label = label.rstrip("/")
        self._used = 0

    def _limit(self, name: str) -> FetchLimit:
        left = FetchLimit(self._total.max_bytes - self._used, self._total.cap)
        config_cap = ValidationLimits.max_config_bytes
        if name in self._small and config_cap < left.max_bytes:
            return FetchLimit(
                config_cap,
                f"the cap on {name} (ValidationLimits.max_config_bytes, {config_cap} bytes)",
            )
        return left

    async def __call__(self, name: str, dest: Path) -> int:
        limit = self._limit(name)
        with limit_fetch(limit):
            await self._fetch(name, dest)
        size = (await asyncio.to_thread(dest.stat)).st_size
        if limit.exceeded(size):
            await asyncio.to_thread(dest.unlink, True)
            raise limit.refuse(f"{self._label}/{name}")
        if name in ADAPTER_FILES:
            self._used += size
        return size


def _check_local_dir(path: Path) -> None:
    """Refuse, before anything is copied, what validation refuses about a local adapter
    directory itself, which its private copy no longer shows: a symlinked directory, pickle
    files beside the adapter's; and a directory that is missing or holds no adapter."""
    label = str(path)
    if path.is_symlink():
        raise AdapterValidationError(
            "symlink", f"{label} is a symlink; pass the real directory (symlinks are refused)"
        )
    if not path.exists():
        raise SourceNotFound(label)
    if not path.is_dir():
        raise SourceNotFound(label, "it is a file, not a directory")
    pickled = sorted(p.name for p in path.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickled:
        raise AdapterValidationError(
            "pickle_weights",
            f"{label!r} holds {pickled[0]}, a pickle file lorapool never loads; re-save the "
            "adapter with safetensors (save_pretrained(..., safe_serialization=True)) and "
            "remove it",
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).exists() and not (path / name).is_symlink():
            raise NotAPeftAdapter(label, f"no {name}")
