"""Adapters in a local directory (a plain path or a ``file://`` URI)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lorapool.abc import Source
from lorapool.errors import SourceError, SourceNotFound

__all__ = ["LocalSource", "local_path_of"]


def local_path_of(uri: str) -> Path:
    """The filesystem path of a plain path or a ``file://`` URI."""
    if uri.lower().startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise SourceError(uri, "file:// URIs must name a local path", transient=False)
        return Path(unquote(parts.path))
    return Path(uri).expanduser()


class LocalSource(Source):
    """Reads adapter directories in place; :meth:`fetch` copies a file when asked."""

    def local_path(self, uri: str) -> Path | None:
        """The directory the URI names."""
        return local_path_of(uri)

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        """Copy one file of the adapter to ``dest``."""
        src = local_path_of(uri) / name
        try:
            return await asyncio.to_thread(_copy, src, dest)
        except FileNotFoundError:
            raise SourceNotFound(str(src)) from None
        except OSError as exc:
            raise SourceError(uri, f"cannot copy {src}: {exc}", transient=False) from exc

    async def aclose(self) -> None:
        """Nothing to release."""


def _copy(src: Path, dest: Path) -> int:
    shutil.copyfile(src, dest)
    return dest.stat().st_size
