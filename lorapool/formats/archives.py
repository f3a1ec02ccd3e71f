"""Adapter archives (``.tar``, ``.tar.gz``, ``.zip``) extracted safely.

Member names are checked before anything is written (no absolute paths, no
``..``, no duplicates, a capped count); links, devices and other special
members are refused; extracted bytes are counted against a cap as they are
written, so a compressed bomb stops at the cap.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import IO

from ..errors import AdapterValidationError
from .limits import MIB, ValidationLimits
from .peft import CONFIG_FILE

__all__ = [
    "ARCHIVE_SUFFIXES",
    "check_archive_members",
    "check_member_name",
    "extract_archive",
    "is_archive",
]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
"""Archive kinds :func:`extract_archive` extracts (safely)."""


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file named like an archive :func:`extract_archive` reads."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def check_member_name(name: str) -> None:
    """Refuse an archive member (or relative source) name that could escape its directory."""
    if not name or "\0" in name or "\\" in name:
        raise AdapterValidationError("unsafe_path", f"member name {name[:200]!r} is not allowed")
    pure = PurePosixPath(name)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise AdapterValidationError(
            "unsafe_path", f"member {name[:200]!r} is an absolute path; archives must be relative"
        )
    if ".." in pure.parts:
        raise AdapterValidationError(
            "unsafe_path",
            f"member {name[:200]!r} contains '..'; archives must not leave their root",
        )


def check_archive_members(names: Iterable[str], *, max_members: int | None = None) -> None:
    """Refuse a list of archive member names with any unsafe one, duplicates, or too many."""
    cap = ValidationLimits.max_archive_members if max_members is None else max_members
    seen: set[str] = set()
    for count, name in enumerate(names, 1):
        if count > cap:
            raise AdapterValidationError(
                "too_large", f"the archive has more than {cap} members; an adapter needs two"
            )
        check_member_name(name)
        key = str(PurePosixPath(name))
        if key in seen:
            raise AdapterValidationError("unsafe_path", f"member {name[:200]!r} appears twice")
        seen.add(key)


def _copy_capped(src: IO[bytes], dest: Path, budget: int, name: str) -> int:
    written = 0
    with dest.open("xb") as out:
        while chunk := src.read(MIB):
            written += len(chunk)
            if written > budget:
                raise AdapterValidationError(
                    "too_large", f"archive member {name!r} takes the archive above its size cap"
                )
            out.write(chunk)
    return written


def extract_archive(archive: Path, dest: Path, limits: ValidationLimits | None = None) -> Path:
    """Extract a ``.tar``/``.tar.gz``/``.zip`` adapter archive into ``dest`` safely.

    Member names are checked with :func:`check_archive_members`; links,
    devices and other special members are refused; the extracted bytes are
    counted against ``limits.max_total_bytes`` as they are written (a
    compressed bomb stops at the cap). Returns the directory that holds
    ``adapter_config.json`` (the root or its single top-level folder).
    """
    limits = limits or ValidationLimits()
    if archive.name.lower().endswith(".zip"):
        _extract_zip(archive, dest, limits)
    else:
        _extract_tar(archive, dest, limits)
    roots = sorted(p.parent for p in dest.rglob(CONFIG_FILE))
    if len(roots) != 1:
        raise AdapterValidationError(
            "not_peft",
            f"the archive holds {len(roots)} {CONFIG_FILE} files; it must hold exactly one adapter",
        )
    return roots[0]


def _extract_zip(archive: Path, dest: Path, limits: ValidationLimits) -> None:
    budget = limits.max_total_bytes
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        check_archive_members([i.filename for i in infos], max_members=limits.max_archive_members)
        for info in infos:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise AdapterValidationError(
                    "symlink", f"archive member {info.filename!r} is a symlink"
                )
            target = dest / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                budget -= _copy_capped(src, target, budget, info.filename)


def _extract_tar(archive: Path, dest: Path, limits: ValidationLimits) -> None:
    budget = limits.max_total_bytes
    with tarfile.open(archive, "r:*") as tf:
        members = []
        for count, member in enumerate(tf, 1):
            if count > limits.max_archive_members:
                raise AdapterValidationError(
                    "too_large",
                    f"the archive has more than {limits.max_archive_members} members",
                )
            members.append(member)
        check_archive_members([m.name for m in members], max_members=limits.max_archive_members)
        for member in members:
            if member.issym() or member.islnk():
                raise AdapterValidationError("symlink", f"archive member {member.name!r} is a link")
            target = dest / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise AdapterValidationError(
                    "unsafe_path", f"archive member {member.name!r} is not a regular file"
                )
            if member.size > budget:
                raise AdapterValidationError(
                    "too_large", f"archive member {member.name!r} is above the size cap"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tf.extractfile(member)
            if data is None:  # pragma: no cover - isfile() members always have data
                continue
            with data:
                budget -= _copy_capped(data, target, budget, member.name)
