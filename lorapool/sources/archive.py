"""Adapters packed in one ``.tar``/``.tar.gz``/``.tgz``/``.zip`` file, from any source.

An archive URI names one object (``s3://bucket/acme/support.tar.gz``,
``https://host/a.zip``, ``/srv/adapters/a.tgz``). The store fetches that object
through the source of its scheme, extracts it with
:func:`lorapool.validation.extract_archive` (member names, links and sizes
checked; nothing is unpickled or executed) and hands out the adapter's files
one by one, so the disk tier treats it like any other remote adapter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from lorapool.errors import SourceNotFound
from lorapool.formats import ARCHIVE_SUFFIXES, extract_archive

__all__ = ["ArchiveFiles", "is_archive_uri", "split_archive_uri"]

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
    extracts the archive into a private directory under ``workdir``;
    :meth:`cleanup` removes it (also safe after a failure).
    """

    def __init__(self, label: str, fetch_object: FetchObject, workdir: Path) -> None:
        self.label = label
        self._fetch_object = fetch_object
        self._workdir = workdir
        self._scratch: Path | None = None
        self._root: Path | None = None
        self._lock = asyncio.Lock()

    async def _extracted(self) -> Path:
        async with self._lock:
            if self._root is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="archive-", dir=self._workdir))
                archive = self._scratch / Path(urlsplit(self.label).path or self.label).name
                await self._fetch_object(archive)
                self._root = await asyncio.to_thread(extract_archive, archive, self._scratch / "x")
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
