"""Adapters in a local directory (a plain path or a ``file://`` URI)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lorapool.abc import Source
from lorapool.errors import AdapterValidationError, SourceError, SourceNotFound
from lorapool.formats.limits import MIB

from ._files import no_space_is_disk_full
from .caps import FetchLimit, fetch_limit

__all__ = ["LocalSource", "copy_adapter_file", "copy_capped", "local_path_of"]


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
        """Copy one file of the adapter to ``dest``, under the cap (:mod:`.caps`)."""
        return await copy_adapter_file(local_path_of(uri), name, dest)

    async def aclose(self) -> None:
        """Nothing to release."""

    def can_delete(self, uri: str) -> bool:
        """A local adapter directory or archive can be deleted; never a filesystem root, the
        home directory, or a path through a symbolic link (a directory on the way swapped
        for a link would point the delete at someone else's files)."""
        path = local_path_of(uri).absolute()
        through_link = os.path.realpath(path.parent) != str(path.parent)
        return path.parent != path and path != Path.home() and not through_link

    async def delete(self, uri: str) -> list[str]:
        """Delete the adapter directory and everything in it (a symlink in it is removed,
        never followed), or the archive file; the paths of the files deleted, then the
        directory's."""
        return await asyncio.to_thread(_delete_tree, local_path_of(uri))


def _delete_tree(root: Path) -> list[str]:
    parent = root.absolute().parent
    if os.path.realpath(parent) != str(parent):
        # A directory on the way swapped for a link would point the delete elsewhere
        # (another tenant's files): refuse rather than follow it.
        raise SourceError(
            str(root), "its path goes through a symbolic link; not deleted", transient=False
        )
    if root.is_symlink() or root.is_file():
        root.unlink()
        return [str(root)]
    if not root.is_dir():
        return []
    deleted = sorted(str(p) for p in root.rglob("*") if p.is_symlink() or not p.is_dir())
    shutil.rmtree(root)
    return [*deleted, str(root)]


async def copy_adapter_file(
    directory: Path, name: str, dest: Path, *, follow_symlinks: bool = True
) -> int:
    """Copy file ``name`` of a local adapter directory to ``dest`` under the cap (:mod:`.caps`).

    On a thread, with :func:`copy_capped`. Raises :class:`SourceNotFound` when
    the file does not exist, :class:`SourceError` when it cannot be read, and
    :class:`AdapterValidationError` when it is too large, a symlink (unless
    ``follow_symlinks``) or not a regular file.
    """
    src = directory / name
    limit = fetch_limit()
    try:
        with no_space_is_disk_full(str(dest)):
            return await asyncio.to_thread(
                copy_capped, src, dest, limit, follow_symlinks=follow_symlinks
            )
    except FileNotFoundError:
        raise SourceNotFound(str(src)) from None
    except OSError as exc:
        raise SourceError(str(directory), f"cannot copy {src}: {exc}", transient=False) from exc


def copy_capped(src: Path, dest: Path, limit: FetchLimit, *, follow_symlinks: bool = True) -> int:
    """Copy the regular file ``src`` to ``dest``; return the bytes copied.

    The size is checked with ``fstat`` before a byte is read and counted while
    reading (a file that grows meanwhile is stopped one byte past the cap):
    over ``limit`` it raises ``too_large`` and ``dest`` is removed. Without
    ``follow_symlinks`` a symlink is refused (``symlink``). Something other
    than a regular file (a FIFO, a device) is refused (``unsafe_path``) without
    being read. Raises ``OSError`` (``FileNotFoundError``) when ``src`` cannot be read.
    """
    # Non-blocking, so that opening a FIFO does not wait for a writer.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        if not follow_symlinks and src.is_symlink():
            raise OSError(errno.ELOOP, "a symlink", str(src))
        fd = os.open(src, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise AdapterValidationError(
                "symlink", f"{src.name} is a symlink; copy the real file into the adapter"
            ) from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdapterValidationError("unsafe_path", f"{src.name} is not a regular file")
        if limit.exceeded(info.st_size):
            raise limit.refuse(str(src))
        written = 0
        try:
            with dest.open("wb") as out:
                while chunk := f.read(min(MIB, limit.max_bytes - written + 1)):
                    written += len(chunk)
                    if limit.exceeded(written):
                        raise limit.refuse(str(src))
                    out.write(chunk)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    return written
