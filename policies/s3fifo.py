"""S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost FIFO."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Container, Hashable

from lorapool.abc import EvictionPolicy

from ._util import Clock, allowed

__all__ = ["S3FIFOPolicy"]

_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    """Yang et al.'s S3-FIFO (SOSP '23).

    New entries go to a small FIFO (``small_fraction`` of the tracked entries,
    at least one). An entry leaving it that was used at least
    ``move_threshold`` times since insertion moves to the main FIFO; the others
    are evicted and their keys kept in a ghost FIFO. A key found in the ghost
    FIFO is inserted straight into main. Main is a CLOCK: an entry at its tail
    with a nonzero use count (capped at 3) is reinserted with the count
    decremented. The ghost FIFO holds at most as many keys as are tracked.
    The policy knows no capacity: the small queue is sized from the number of
    entries it tracks when the tier asks for a victim. ``clock`` is accepted
    for uniform construction and not used.
    """

    def __init__(
        self,
        *,
        small_fraction: float = 0.1,
        move_threshold: int = 2,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0.0 < small_fraction < 1.0:
            raise ValueError("small_fraction must be between 0 and 1")
        self.small_fraction = small_fraction
        self.move_threshold = move_threshold
        self.clock = clock
        self._small: OrderedDict[Hashable, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._proposed: Hashable | None = None

    def __len__(self) -> int:
        return len(self._freq)

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Add an entry to main if its key is a ghost, else to the small FIFO."""
        if key in self._freq:
            self.on_access(key)
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def on_access(self, key: Hashable) -> None:
        """Count a use (up to 3)."""
        freq = self._freq.get(key)
        if freq is not None and freq < _MAX_FREQ:
            self._freq[key] = freq + 1

    def on_remove(self, key: Hashable) -> None:
        """Forget an entry; an evicted small-FIFO entry leaves its key in the ghost FIFO."""
        if self._freq.pop(key, None) is None:
            return
        if key in self._small:
            del self._small[key]
            if key == self._proposed:
                self._ghost[key] = None
                while len(self._ghost) > max(1, len(self._freq)):
                    self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)
        if key == self._proposed:
            self._proposed = None

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """Evict from the small FIFO while it is at its share, else from main."""
        if not evictable:
            return None
        ok = allowed(evictable)
        found: Hashable | None = None
        if len(self._small) >= max(1, round(self.small_fraction * len(self._freq))):
            found = self._evict_small(ok)
        if found is None:
            found = self._evict_main(ok)
        if found is None:
            found = next((k for k in self._small if k in ok), None)
        if found is None:
            found = next(iter(evictable))
        self._proposed = found
        return found

    def _evict_small(self, ok: Container[Hashable]) -> Hashable | None:
        for key in list(self._small):
            if key not in ok:
                continue
            if self._freq[key] < self.move_threshold:
                return key
            del self._small[key]
            self._main[key] = None
            self._freq[key] = 0
        return None

    def _evict_main(self, ok: Container[Hashable]) -> Hashable | None:
        # Every evictable count reaches zero within _MAX_FREQ + 1 laps.
        for _ in range((_MAX_FREQ + 1) * len(self._main) + 1):
            if not self._main:
                break
            key = next(iter(self._main))
            if key in ok:
                freq = self._freq[key]
                if freq == 0:
                    return key
                self._freq[key] = freq - 1
            self._main.move_to_end(key)
        return None
