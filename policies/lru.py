"""Least recently used."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Hashable

from lorapool.abc import EvictionPolicy

from ._util import Clock, allowed

__all__ = ["LRUPolicy"]


class LRUPolicy(EvictionPolicy):
    """Evict the entry used longest ago. O(1) bookkeeping per event.

    ``clock`` is accepted so every policy is built the same way; LRU orders by
    events, not by time.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Track a new entry as most recently used."""
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Hashable) -> None:
        """Mark an entry most recently used."""
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        """Forget an entry."""
        self._order.pop(key, None)

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """The least recently used evictable entry."""
        if not evictable:
            return None
        ok = allowed(evictable)
        for key in self._order:
            if key in ok:
                return key
        return next(iter(evictable))
