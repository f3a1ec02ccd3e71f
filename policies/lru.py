"""Least recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable

__all__ = ["LRUPolicy"]


class LRUPolicy:
    """Evict the entry used longest ago. O(1) bookkeeping per event."""

    def __init__(self) -> None:
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
        allowed = evictable if isinstance(evictable, (set, frozenset, dict)) else set(evictable)
        for key in self._order:
            if key in allowed:
                return key
        return next(iter(evictable))
