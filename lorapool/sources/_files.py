"""Writing a fetched file from the event loop without blocking it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["FileWriter", "open_for_writing"]


class FileWriter:
    """A binary file open for writing whose writes run on a worker thread."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    async def write(self, data: bytes) -> int:
        """Write ``data``; the bytes written."""
        return await asyncio.to_thread(self._file.write, data)


@contextlib.asynccontextmanager
async def open_for_writing(path: Path) -> AsyncIterator[FileWriter]:
    """``path`` opened (truncated) for binary writing, closed on exit; each call on a thread.

    The close runs to completion on its thread even if the task is cancelled meanwhile.
    """
    file = await asyncio.to_thread(open, path, "wb")
    try:
        yield FileWriter(file)
    finally:
        await asyncio.to_thread(file.close)
