"""Writing a fetched file from the event loop without blocking it, counting against a cap."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from lorapool.errors import DiskFull

from .caps import FetchLimit

__all__ = ["FileWriter", "no_space_is_disk_full", "open_for_writing"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def no_space_is_disk_full(label: str) -> Iterator[None]:
    """A full disk (``ENOSPC``, ``EDQUOT``) while writing ``label`` is :class:`DiskFull`.

    Not a source error: the source is fine, and retrying the fetch cannot help until
    room is made (sources would otherwise report it as a transient failure and retry).
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise DiskFull(f"no space left writing {label}: {exc.strerror}") from exc
        raise


class FileWriter:
    """A binary file open for writing whose writes run on a worker thread.

    Every write is counted: one that would take the file past ``limit`` is
    refused (``too_large``) before any of it is written.
    """

    def __init__(self, file: BinaryIO, label: str, limit: FetchLimit) -> None:
        self._file = file
        self._label = label
        self._limit = limit
        self.written = 0
        """Bytes written so far."""

    def room(self) -> int:
        """Bytes that may still be written before the limit."""
        return self._limit.max_bytes - self.written

    def check_declared(self, size: int | None) -> None:
        """Refuse at once a file whose announced size (a Content-Length) is over the limit."""
        if size is not None and self._limit.exceeded(size):
            raise self._limit.refuse(self._label)

    async def write(self, data: bytes) -> int:
        """Write ``data``; the bytes written."""
        if self._limit.exceeded(self.written + len(data)):
            raise self._limit.refuse(self._label)
        with no_space_is_disk_full(self._label):
            n = await asyncio.to_thread(self._file.write, data)
        self.written += n
        return n


@contextlib.asynccontextmanager
async def open_for_writing(path: Path, label: str, limit: FetchLimit) -> AsyncIterator[FileWriter]:
    """``path`` opened (truncated) for binary writing, closed on exit; each call on a thread.

    The close runs to completion on its thread even if the task is cancelled
    meanwhile. When the block raises, the incomplete file is removed.
    """
    with no_space_is_disk_full(label):
        file = await asyncio.to_thread(open, path, "wb")
    try:
        yield FileWriter(file, label, limit)
    except BaseException:
        await asyncio.to_thread(_close_and_remove, file, path)
        raise
    try:
        with no_space_is_disk_full(label):  # buffered bytes reach the disk here
            await asyncio.to_thread(file.close)
    except DiskFull:
        await asyncio.to_thread(path.unlink, True)
        raise


def _close_and_remove(file: BinaryIO, path: Path) -> None:
    file.close()
    path.unlink(missing_ok=True)
