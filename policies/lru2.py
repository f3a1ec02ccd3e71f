"""LRU-2 (LRU-K with K = 2): evict by the age of the second-to-last use."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Collection, Hashable

from lorapool.abc import EvictionPolicy

from ._util import Clock, allowed

__all__ = ["LRU2Policy"]


class LRU2Policy(EvictionPolicy):
    """O'Neil et al.'s LRU-K for K = 2, on a logical clock of events.

    An entry used only once has an infinite backward 2-distance and goes first
    (least recently used first among those); otherwise the entry whose
    second-to-last use is oldest goes. A one-off scan therefore cannot push out
    entries used twice. The last use of recently evicted keys is remembered
    (at most as many keys as are tracked, plus 8), so a key that comes back
    counts its earlier use. ``clock`` is accepted for uniform construction;
    ordering uses event counts, so it is deterministic.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._tick = 0
        self._once: OrderedDict[Hashable, int] = OrderedDict()  # key -> last use
        self._twice: dict[Hashable, tuple[int, int]] = {}  # key -> (penultimate, last)
        # (penultimate, push tick, key); the tick keeps keys from being compared
        self._heap: list[tuple[int, int, Hashable]] = []
        self._history: OrderedDict[Hashable, int] = OrderedDict()  # evicted key -> last use

    def __len__(self) -> int:
        return len(self._once) + len(self._twice)

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Track a new entry, remembering its previous use if it was seen lately."""
        if key in self._once or key in self._twice:
            self.on_access(key)
            return
        self._tick += 1
        previous = self._history.pop(key, None)
        if previous is None:
            self._once[key] = self._tick
        else:
            self._promote(key, previous)

    def on_access(self, key: Hashable) -> None:
        """Record a use."""
        if key in self._once:
            self._tick += 1
            self._promote(key, self._once.pop(key))
        elif key in self._twice:
            self._tick += 1
            self._promote(key, self._twice[key][1])

    def _promote(self, key: Hashable, penultimate: int) -> None:
        self._twice[key] = (penultimate, self._tick)
        heapq.heappush(self._heap, (penultimate, self._tick, key))
        if len(self._heap) > 2 * len(self._twice) + 16:
            self._heap = [(p, last, k) for k, (p, last) in self._twice.items()]
            heapq.heapify(self._heap)

    def on_remove(self, key: Hashable) -> None:
        """Forget an entry, keeping its last use in the bounded history."""
        last = self._once.pop(key, None)
        if last is None:
            uses = self._twice.pop(key, None)
            if uses is None:
                return
            last = uses[1]
        self._history[key] = last
        while len(self._history) > len(self) + 8:
            self._history.popitem(last=False)

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """A once-used entry (least recent first), else the oldest second-to-last use."""
        if not evictable:
            return None
        ok = allowed(evictable)
        for key in self._once:
            if key in ok:
                return key
        skipped: list[tuple[int, int, Hashable]] = []
        found: Hashable | None = None
        while self._heap:
            item = heapq.heappop(self._heap)
            penultimate, _, key = item
            uses = self._twice.get(key)
            if uses is None or uses[0] != penultimate:
                continue  # stale
            skipped.append(item)
            if key in ok:
                found = key
                break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return found if found is not None else next(iter(evictable))
