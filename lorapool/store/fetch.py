"""Getting an adapter's files from its source: resolution, retries, archives, staging.

Each URI scheme has one :class:`~lorapool.abc.Source` (made on first use
unless the store was given one). Local adapter directories are read in place;
remote adapters, and archives from anywhere, are downloaded file by file (an
archive is fetched once and extracted) into the disk tier. Transient source
errors are retried ``retries`` times with exponential backoff; the rest become
:class:`~lorapool.errors.LoadError` naming the tier that failed.
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
    SourceError,
    SourceNotFound,
)
from lorapool.sources import make_source, scheme_of
from lorapool.sources.archive import ArchiveFiles, is_archive_uri, split_archive_uri
from lorapool.store.disk import DiskTier, FetchFile, Staged
from lorapool.store.stats import StoreStats
from lorapool.types import AdapterInfo

__all__ = ["Fetcher"]

log = logging.getLogger(__name__)


class Fetcher:
    """The sources by scheme, and the disk tier's fill (:meth:`fetch`).

    ``protected_sha(sha)`` says whether a disk copy may not be evicted.
    """

    def __init__(
        self,
        sources: Mapping[str, Source] | None,
        disk: DiskTier,
        stats: StoreStats,
        *,
        retries: int,
        retry_backoff: float,
        protected_sha: Callable[[str], bool],
    ) -> None:
        self.sources: dict[str, Source] = {
            scheme: conform(source, Source) for scheme, source in (sources or {}).items()
        }
        """The source of each scheme used so far (and those given)."""
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._disk = disk
        self._stats = stats
        self._protected_sha = protected_sha

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

    async def stage(self, uri: str) -> Staged:
        """A new adapter's files, local and inspected (downloaded to staging if remote)."""
        local = self.in_place(uri)
        if local is not None:
            return await asyncio.to_thread(Staged.in_place, local)
        fetch_file, archive = self._file_fetcher(uri)
        try:
            return await self._disk.stage(uri, fetch_file)
        finally:
            if archive is not None:
                await archive.cleanup()

    async def fetch(self, info: AdapterInfo, speculative: bool) -> Path:
        """Download the adapter into the disk tier, verified, and return its directory."""
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
