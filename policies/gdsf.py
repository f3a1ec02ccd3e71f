"""GDSF: Greedy-Dual-Size-Frequency, a cost- and size-aware policy."""

from __future__ import annotations

import heapq
import time
from collections.abc import Collection, Hashable
from dataclasses import dataclass

from lorapool.abc import EvictionPolicy

from ._util import Clock, allowed

__all__ = ["GDSFPolicy"]

_MIN_COST = 1e-9


@dataclass(slots=True)
class _Entry:
    priority: float
    freq: int
    cost: float
    size: int
    seq: int


class GDSFPolicy(EvictionPolicy):
    """Cherkasova's Greedy-Dual-Size-Frequency.

    Each entry's priority is ``L + freq * cost / size``: ``cost`` is the seconds
    the tier measured to load it from the tier below (a floor of 1 ns stands in
    for zero), ``size`` its bytes (at least 1), ``freq`` its uses since it
    entered. The entry with the lowest priority goes, and ``L`` (the inflation
    value) rises to that priority, so entries that are not used again age out
    however costly they were. Cheap, large, rarely used entries go first.
    ``clock`` is accepted for uniform construction and not used.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.inflation = 0.0
        self._entries: dict[Hashable, _Entry] = {}
        self._heap: list[tuple[float, int, Hashable]] = []  # stale items are skipped
        self._seq = 0
        self._proposed: tuple[Hashable, float] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def priority(self, key: Hashable) -> float | None:
        """An entry's current priority (``None`` if not tracked)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.priority

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Track an entry with one use."""
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(0.0, 0, max(cost, _MIN_COST), max(size, 1), 0)
            self._entries[key] = entry
        else:
            entry.cost, entry.size = max(cost, _MIN_COST), max(size, 1)
        self._use(key, entry)

    def on_access(self, key: Hashable) -> None:
        """Count a use and raise the entry's priority."""
        entry = self._entries.get(key)
        if entry is not None:
            self._use(key, entry)

    def _use(self, key: Hashable, entry: _Entry) -> None:
        self._seq += 1
        entry.freq += 1
        entry.seq = self._seq
        entry.priority = self.inflation + entry.freq * entry.cost / entry.size
        heapq.heappush(self._heap, (entry.priority, self._seq, key))
        if len(self._heap) > 2 * len(self._entries) + 16:
            self._heap = [(e.priority, e.seq, k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)

    def on_remove(self, key: Hashable) -> None:
        """Forget an entry; evicting the proposed victim raises ``L`` to its priority."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if self._proposed is not None and self._proposed[0] == key:
            self.inflation = max(self.inflation, self._proposed[1])
            self._proposed = None

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """The evictable entry with the lowest priority (the oldest use on ties)."""
        if not evictable:
            return None
        ok = allowed(evictable)
        skipped: list[tuple[float, int, Hashable]] = []
        found: Hashable | None = None
        while self._heap:
            item = heapq.heappop(self._heap)
            priority, seq, key = item
            entry = self._entries.get(key)
            if entry is None or entry.seq != seq:
                continue  # stale
            skipped.append(item)
            if key in ok:
                found = key
                self._proposed = (key, priority)
                break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return found if found is not None else next(iter(evictable))
