"""Small helpers shared by the built-in policies."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection, Container, Hashable, Mapping, Set

__all__ = ["Clock", "allowed", "stable_hash"]

Clock = Callable[[], float]
"""What every policy accepts as ``clock``: seconds, like ``time.monotonic``."""


def allowed(evictable: Collection[Hashable]) -> Container[Hashable]:
    """``evictable`` with O(1) membership tests (sets, dicts and key views are used as is)."""
    if isinstance(evictable, (Set, Mapping)):
        return evictable
    return set(evictable)


def stable_hash(key: Hashable) -> int:
    """A hash that does not change between processes for ``str``, ``bytes`` and ``int`` keys."""
    if isinstance(key, str):
        return zlib.crc32(key.encode())
    if isinstance(key, bytes):
        return zlib.crc32(key)
    return hash(key)
