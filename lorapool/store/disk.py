"""The disk tier: verified copies of remote adapters under one directory.

Layout: ``<root>/<sha256>/{adapter_config.json, adapter_model.safetensors}``,
named by content so that a restart finds its copies again and two adapters
with the same files share one. Downloads land in ``<root>/.tmp/`` and are
renamed into place only after their sha256 matched: a partial or corrupted
download is never visible. Evicted copies are renamed out of the way first
and deleted in a thread, so a concurrent fetch of the same content never
collides with the deletion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorapool.abc import EvictionPolicy
from lorapool.errors import (
    ContentMismatch,
    DiskFull,
    LoadError,
    NotAPeftAdapter,
    SourceNotFound,
)
from lorapool.formats import (
    ADAPTER_FILES,
    CONFIG_FILE,
    SIDECAR_FILE,
    AdapterFiles,
    inspect_adapter_dir,
    sha256_of_files,
)
from lorapool.store.tiers import Tier

__all__ = ["DiskFull", "DiskTier", "FetchFile", "Staged"]

log = logging.getLogger(__name__)

FetchFile = Callable[[str, Path], Awaitable[int]]
"""Copies one named adapter file to a local path and returns its size."""

_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Staged:
    """A new adapter's files, waiting for registration to finish.

    ``files.path`` is always lorapool's private copy under the disk tier's
    staging area, written by the fetch whose bytes ``files.sha256`` hashes, so
    what registration validates and records is what was hashed, whatever
    happens to the source meanwhile (local directories are copied too).
    """

    files: AdapterFiles
    source: str
    _commit: Callable[[str], Awaitable[None]] | None = field(default=None, repr=False)

    async def commit(self, adapter_id: str) -> None:
        """Registration succeeded: move a remote adapter's copy into the disk tier (a local
        adapter's copy is deleted; it is read in place from then on)."""
        if self._commit is not None:
            commit, self._commit = self._commit, None
            await commit(adapter_id)

    async def discard(self) -> None:
        """Drop the private copy (registration failed)."""
        if self._commit is not None:
            self._commit = None
            await asyncio.to_thread(shutil.rmtree, self.files.path, True)


class DiskTier:
    """Bookkeeping and file moves for the disk tier."""

    def __init__(self, root: str | Path | None, capacity: int | None, policy: EvictionPolicy):
        self.requested = None if root is None else Path(root).expanduser()
        """The directory asked for (``None``: a temporary one is made at open)."""
        self.root: Path | None = None
        self._owned = False
        self.tier: Tier[str, Path] = Tier("disk", capacity, policy)

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory (or a temporary one) and index the copies already there."""
        if self.root is not None:
            return
        if self.requested is None:
            self.root = Path(tempfile.mkdtemp(prefix="lorapool-disk-"))
            self._owned = True
        else:
            self.root = self.requested
            self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        found = []
        for child in self.root.iterdir():
            if _SHA.match(child.name) and all((child / n).is_file() for n in ADAPTER_FILES):
                size = sum((child / n).stat().st_size for n in ADAPTER_FILES)
                found.append((child.stat().st_mtime, child.name, size))
        for _, sha, size in sorted(found):
            if self.tier.make_room(size, protected=lambda _: False) is None:
                break
            self.tier.put(sha, self.root / sha, size, cost=0.0)
        if found:
            log.info("disk tier %s: %d adapters from an earlier run", self.root, len(self.tier))

    def close(self) -> None:
        """Remove a temporary root; a user's directory is kept for the next run."""
        if self.root is not None and self._owned:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def _tmp(self) -> Path:
        assert self.root is not None, "the disk tier is not open"
        return self.root / ".tmp"

    @property
    def workdir(self) -> Path:
        """Scratch space on the tier's filesystem (emptied at every open)."""
        return self._tmp

    # -- lookups ---------------------------------------------------------------------

    def get(self, sha: str, *, use: bool = True) -> Path | None:
        """The directory holding content ``sha``, if the tier has it."""
        return self.tier.get(sha, use=use)

    def holds(self, path: Path) -> bool:
        """True if ``path`` is a copy inside this tier."""
        return self.root is not None and path.parent == self.root

    async def expire(self, protected: Callable[[str], bool]) -> None:
        """Delete the copies the tier's policy says have expired."""
        for _, path in self.tier.expire(protected=protected):
            await self._trash(path)

    async def delete(self, sha: str) -> None:
        """Drop content ``sha`` from the tier and delete its files."""
        path = self.tier.pop(sha)
        if path is not None:
            await self._trash(path)

    def _set_aside(self, path: Path) -> Path | None:
        """Rename ``path`` into the staging area (instant); ``None`` if it is gone."""
        aside = self._tmp / f"evicted-{uuid.uuid4().hex}"
        try:
            os.replace(path, aside)
        except OSError:
            return None
        return aside

    async def _trash(self, path: Path) -> None:
        aside = self._set_aside(path)
        if aside is not None:
            await asyncio.to_thread(shutil.rmtree, aside, True)

    # -- filling ---------------------------------------------------------------------

    async def stage(
        self,
        uri: str,
        fetch_file: FetchFile,
        *,
        label: str | None = None,
        keep: bool = True,
        optional: tuple[str, ...] = (),
    ) -> Staged:
        """Copy a new adapter's files into a private staging directory and inspect them.

        ``uri`` becomes :attr:`Staged.source`; ``label`` names the adapter in
        errors (default ``uri``). With ``keep``, :meth:`Staged.commit` moves the
        copy into the tier; without (an adapter read in place later), it deletes it.
        ``optional`` names files fetched with the sidecar when the source has them
        (the signature file, when the store verifies signatures).
        """
        label = uri if label is None else label
        tmp = self._tmp / f"stage-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name in ADAPTER_FILES:
                try:
                    await fetch_file(name, tmp / name)
                except SourceNotFound:
                    if name == CONFIG_FILE:
                        raise SourceNotFound(
                            label, f"no {CONFIG_FILE} there", hint="check the adapter URI"
                        ) from None
                    raise NotAPeftAdapter(label, f"no {name}") from None
            for name in (SIDECAR_FILE, *optional):  # the declared base, the signature
                with contextlib.suppress(SourceNotFound):
                    await fetch_file(name, tmp / name)
            files = await asyncio.to_thread(inspect_adapter_dir, tmp, label=label)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            raise

        if not keep:

            async def drop(adapter_id: str) -> None:
                await asyncio.to_thread(shutil.rmtree, tmp, True)

            return Staged(files, uri, drop)

        async def commit(adapter_id: str) -> None:
            try:
                await self._place(files.sha256, tmp, files.size_bytes, 0.0, lambda _: False, False)
            except DiskFull as exc:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                raise LoadError(adapter_id, "disk", str(exc)) from None

        return Staged(files, uri, commit)

    async def fetch(
        self,
        sha: str,
        fetch_file: FetchFile,
        *,
        protected: Callable[[str], bool],
        speculative: bool,
    ) -> tuple[Path, int]:
        """Download content ``sha`` into the tier; return its directory and the bytes fetched.

        Raises :class:`SourceError` when the download does not match ``sha``
        and :class:`DiskFull` when there is no room; nothing is kept then.
        """
        started = time.perf_counter()
        tmp = self._tmp / f"fetch-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            size = 0
            for name in ADAPTER_FILES:
                size += await fetch_file(name, tmp / name)
            digest = await asyncio.to_thread(sha256_of_files, tmp)
            if digest != sha:
                raise ContentMismatch(
                    str(tmp),
                    f"sha256 mismatch: the source now holds different content "
                    f"({digest[:12]}…, registered {sha[:12]}…); nothing was cached",
                )
            path = await self._place(
                sha, tmp, size, time.perf_counter() - started, protected, speculative
            )
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            raise
        return path, size

    async def _place(
        self,
        sha: str,
        tmp: Path,
        size: int,
        cost: float,
        protected: Callable[[str], bool],
        speculative: bool,
    ) -> Path:
        """Rename a verified copy into the tier, evicting what must go.

        The bookkeeping and the renames happen without an await in between;
        deleting evicted files is left to a thread.
        """
        assert self.root is not None
        existing = self.tier.get(sha, use=not speculative)
        if existing is not None:  # same content arrived another way
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            return existing
        evicted = self.tier.make_room(size, protected=protected, speculative=speculative)
        if evicted is None:
            cap = self.tier.capacity
            raise DiskFull(
                f"the disk tier ({cap} bytes) cannot fit {size} more bytes without evicting "
                "adapters in use or pinned; raise disk_bytes"
            )
        final = self.root / sha
        stale = [old for _, old in evicted]
        if final.exists():  # a stray copy the index did not know
            stale.append(final)
        aside = [p for p in map(self._set_aside, stale) if p is not None]
        os.replace(tmp, final)
        self.tier.put(sha, final, size, cost=cost, speculative=speculative)
        if aside:
            await asyncio.to_thread(_remove_trees, aside)
        return final


def _remove_trees(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
