"""Time to live: entries idle for ``ttl`` seconds go first, then least recently used."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Hashable

from lorapool.abc import EvictionPolicy

from ._util import Clock, allowed

__all__ = ["TTLPolicy"]


class TTLPolicy(EvictionPolicy):
    """Evict expired entries first, then the least recently used one.

    An entry expires ``ttl`` seconds after its last insert or access, read from
    ``clock``. Since one ttl applies to every entry, the expired entries are
    exactly the head of the recency order, so victims come in LRU order; what
    this policy adds is :meth:`expired`, which lets a tier drop stale entries
    before it is full (for example a device slot held by an adapter nobody used
    for an hour).
    """

    def __init__(self, *, ttl: float = 3600.0, clock: Clock = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = ttl
        self.clock = clock
        self._last: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Track an entry as used now."""
        self._last[key] = self.clock()
        self._last.move_to_end(key)

    def on_access(self, key: Hashable) -> None:
        """Restart an entry's ttl."""
        if key in self._last:
            self._last[key] = self.clock()
            self._last.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        """Forget an entry."""
        self._last.pop(key, None)

    def expired(self) -> list[Hashable]:
        """Entries idle for ``ttl`` seconds or more, longest idle first."""
        deadline = self.clock() - self.ttl
        stale: list[Hashable] = []
        for key, last in self._last.items():
            if last > deadline:
                break
            stale.append(key)
        return stale

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """The longest idle evictable entry (expired ones are the longest idle)."""
        if not evictable:
            return None
        ok = allowed(evictable)
        for key in self._last:
            if key in ok:
                return key
        return next(iter(evictable))
