"""Adapters packed in one ``.tar``/``.tar.gz``/``.tgz``/``.zip`` file, from any source.

An archive URI names one object (``s3://bucket/acme/support.tar.gz``,
``https://host/a.zip``, ``/srv/adapters/a.tgz``). The store fetches that object
through the source of its scheme, extracts it with
:func:`lorapool.formats.extract_archive` (member names, links and sizes
checked; nothing is unpickled or executed) and hands out the adapter's files
one by one, so the disk tier treats it like any other remote adapter.

Expansion is capped (a :class:`~lorapool.sources.caps.FetchLimit`: the
per-adapter cap, or the disk tier's ``disk_bytes`` when that is smaller): the
sizes the archive declares are added up first and an archive declaring more is
refused before anything is extracted; then the bytes actually written are
counted while extracting, since headers can lie. A refused archive leaves
nothing behind once :meth:`ArchiveFiles.cleanup` ran.
"""

from __future__ import annotations

import asyncio
import errno
import lzma
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from lorapool.errors import AdapterValidationError, DiskFull, SourceNotFound
from lorapool.formats import ARCHIVE_SUFFIXES, ValidationLimits, extract_archive

from .caps import DEFAULT_LIMIT, FetchLimit

__all__ = ["ArchiveFiles", "is_archive_uri", "split_archive_uri"]

_UNREADABLE = (
    OSError,
    EOFError,
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # a zip compression method zipfile lacks
    RuntimeError,  # an encrypted zip member
)
"""What reading a damaged or unsupported archive raises."""

FetchObject = Callable[[Path], Awaitable[int]]
"""Writes the archive object to the given path; returns the bytes written."""


def is_archive_uri(uri: str) -> bool:
    """True if ``uri`` names an adapter archive rather than an adapter directory."""
    path = urlsplit(uri).path if "://" in uri else uri
    return path.lower().rstrip("/").endswith(ARCHIVE_SUFFIXES)


def split_archive_uri(uri: str) -> tuple[str, str]:
    """``(parent, file name)`` of an archive URI, the form a source's ``fetch`` takes."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or not parent:
        return str(Path(uri).expanduser().resolve().parent), Path(uri).name
    return parent, name


class ArchiveFiles:
    """Fetch an archive once, extract it, and hand out its adapter files.

    Call it like a source's per-file fetch: ``await files(name, dest)`` moves
    the extracted ``name`` to ``dest``. The first call downloads and
    extracts the archive into a private directory under ``workdir``, at most
    ``limit`` bytes expanded (``too_large`` naming the cap beyond it);
    :meth:`cleanup` removes it (also safe after a failure). An archive that
    cannot be read is refused with ``not_peft``.
    """

    def __init__(
        self,
        label: str,
        fetch_object: FetchObject,
        workdir: Path,
        limit: FetchLimit = DEFAULT_LIMIT,
    ) -> None:
        self.label = label
        self._fetch_object = fetch_object
        self._workdir = workdir
        self._limit = limit
        self._scratch: Path | None = None
        self._root: Path | None = None
        self._lock = asyncio.Lock()

    async def _extracted(self) -> Path:
        async with self._lock:
            if self._root is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="archive-", dir=self._workdir))
                archive = self._scratch / Path(urlsplit(self.label).path or self.label).name
                await self._fetch_object(archive)
                self._root = await asyncio.to_thread(
                    _extract, archive, self._scratch / "x", self.label, self._limit
                )
            return self._root

    async def __call__(self, name: str, dest: Path) -> int:
        """Move the archive's file ``name`` to ``dest``; return its size."""
        root = await self._extracted()
        try:
            return await asyncio.to_thread(_move, root / name, dest)
        except FileNotFoundError:
            raise SourceNotFound(f"{self.label}!{name}", "not in the archive") from None

    async def cleanup(self) -> None:
        """Remove the downloaded archive and whatever was not handed out."""
        if self._scratch is not None:
            scratch, self._scratch, self._root = self._scratch, None, None
            await asyncio.to_thread(shutil.rmtree, scratch, True)


def _move(src: Path, dest: Path) -> int:
    if not src.is_file():
        raise FileNotFoundError(src)
    os.replace(src, dest)
    return dest.stat().st_size


def _extract(archive: Path, dest: Path, label: str, limit: FetchLimit) -> Path:
    """Extract ``archive`` into ``dest`` within ``limit``: declared sizes first, then
    the bytes written (:func:`~lorapool.formats.extract_archive` counts them)."""
    try:
        declared = _declared_bytes(archive, ValidationLimits.max_archive_members)
        if limit.exceeded(declared):
            raise limit.refuse(f"{label} (it declares {declared} bytes expanded)")
        root = extract_archive(archive, dest, ValidationLimits(max_total_bytes=limit.max_bytes))
    except _UNREADABLE as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left extracting {label}: {exc}") from None
        raise AdapterValidationError(
            "not_peft", f"{label} is not a readable archive: {type(exc).__name__}: {exc}"
        ) from None
    archive.unlink()  # the extracted files are what is needed now
    return root


def _declared_bytes(archive: Path, max_members: int) -> int:
    """The bytes the archive's headers say its members expand to.

    Reads the zip central directory, or the tar headers (decompressing a
    compressed tar, writing nothing). Stops counting after ``max_members``
    members; :func:`~lorapool.formats.extract_archive` refuses such an archive.
    """
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            return sum(info.file_size for info in zf.infolist()[: max_members + 1])
    total = 0
    with tarfile.open(archive, "r:*") as tf:
        for count, member in enumerate(tf, 1):
            total += max(member.size, 0)
            if count > max_members:
                break
    return total
