"""SIEVE: a FIFO queue with a visited bit and a moving hand."""

from __future__ import annotations

import time
from collections.abc import Collection, Hashable

from lorapool.abc import EvictionPolicy

from ._util import Clock, allowed

__all__ = ["SievePolicy"]


class _Node:
    __slots__ = ("key", "newer", "older", "visited")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.visited = False
        self.newer: _Node | None = None
        self.older: _Node | None = None


class SievePolicy(EvictionPolicy):
    """Zhang et al.'s SIEVE (NSDI '24): lazy promotion, quick demotion.

    New entries join the head of a queue; a use only sets the entry's visited
    bit. To evict, a hand walks from the tail towards the head, clearing
    visited bits, and stops at the first unvisited entry; the hand stays where
    it stopped for the next eviction. Entries that are not evictable are
    passed over untouched. O(1) per use, amortised O(1) per eviction.
    ``clock`` is accepted for uniform construction and not used.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._nodes: dict[Hashable, _Node] = {}
        self._head: _Node | None = None  # newest
        self._tail: _Node | None = None  # oldest
        self._hand: _Node | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Add an entry at the head, unvisited."""
        if key in self._nodes:
            self.on_access(key)
            return
        node = _Node(key)
        node.older = self._head
        if self._head is not None:
            self._head.newer = node
        self._head = node
        if self._tail is None:
            self._tail = node
        self._nodes[key] = node

    def on_access(self, key: Hashable) -> None:
        """Mark an entry visited."""
        node = self._nodes.get(key)
        if node is not None:
            node.visited = True

    def on_remove(self, key: Hashable) -> None:
        """Unlink an entry; the hand moves on to the next newer entry."""
        node = self._nodes.pop(key, None)
        if node is None:
            return
        if self._hand is node:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._head = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._tail = node.newer
        node.newer = node.older = None

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """The first unvisited evictable entry from the hand on."""
        if not evictable:
            return None
        ok = allowed(evictable)
        node = self._hand or self._tail
        # Two laps clear every visited bit on the way, so an evictable entry is found.
        for _ in range(2 * len(self._nodes) + 1):
            if node is None:
                break
            if node.key in ok:
                if not node.visited:
                    self._hand = node
                    return node.key
                node.visited = False
            node = node.newer or self._tail
        return next(iter(evictable))
