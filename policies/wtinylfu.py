"""W-TinyLFU: a small LRU window, a frequency filter, and a segmented LRU main area."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Container, Hashable

from lorapool.abc import EvictionPolicy

from ._sketch import FrequencySketch
from ._util import Clock, allowed

__all__ = ["WTinyLFUPolicy"]


class WTinyLFUPolicy(EvictionPolicy):
    """Einziger et al.'s W-TinyLFU, the policy of Caffeine, without its hill climber.

    New entries enter an LRU *window*. When the tier is full, the window's
    least recently used entry (the candidate) meets main's probation LRU entry
    (the victim), and a count-min sketch of recent uses decides: the candidate
    moves to main only if it was used more often lately; otherwise it is the
    one evicted. Main is a segmented LRU: a used probation entry is promoted to
    *protected* (``protected_fraction`` of main); protected overflow is demoted
    back to probation. One-hit keys (a scan) thus pass through the window
    without displacing frequent ones.

    The policy knows no capacity: the window is ``window_fraction`` of the
    entries tracked (at least one) and every segment keeps at least one entry,
    so it works down to a handful of device slots. The sketch grows with the
    largest number of entries tracked and never with the number of distinct
    keys seen; its counts halve after ``sample_factor`` uses per tracked entry.
    The defaults (1% window, 80% protected, halving every 20 uses per entry)
    come from the simulator (``python -m lorapool.bench cache``). Unlike
    Caffeine, admission has no random element, so runs repeat exactly.
    ``clock`` is accepted for uniform construction and not used.
    """

    def __init__(
        self,
        *,
        window_fraction: float = 0.01,
        protected_fraction: float = 0.8,
        sample_factor: int = 20,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0.0 < window_fraction < 1.0 or not 0.0 < protected_fraction < 1.0:
            raise ValueError("fractions must be between 0 and 1")
        self.window_fraction = window_fraction
        self.protected_fraction = protected_fraction
        self.clock = clock
        self.sketch = FrequencySketch(sample_factor=sample_factor)
        self._window: OrderedDict[Hashable, None] = OrderedDict()  # LRU first
        self._probation: OrderedDict[Hashable, None] = OrderedDict()
        self._protected: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def _window_target(self) -> int:
        return max(1, round(self.window_fraction * len(self)))

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Count the use and put the entry at the window's MRU end."""
        if key in self._window or key in self._probation or key in self._protected:
            self.on_access(key)
            return
        self.sketch.increment(key)
        self._window[key] = None
        self.sketch.ensure_capacity(len(self))
        # While the tier fills (no evictions yet), window overflow flows into probation.
        while len(self._window) > self._window_target():
            moved, _ = self._window.popitem(last=False)
            self._probation[moved] = None

    def on_access(self, key: Hashable) -> None:
        """Count the use; promote a probation entry to protected."""
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._probation:
            del self._probation[key]
            self._protected[key] = None
            main = len(self._probation) + len(self._protected)
            limit = min(int(self.protected_fraction * main), main - 1)
            while len(self._protected) > max(limit, 0):
                demoted, _ = self._protected.popitem(last=False)
                self._probation[demoted] = None
        elif key in self._protected:
            self._protected.move_to_end(key)
        else:
            return
        self.sketch.increment(key)

    def on_remove(self, key: Hashable) -> None:
        """Forget an entry (its sketch counts fade with the periodic halving)."""
        self._window.pop(key, None)
        self._probation.pop(key, None)
        self._protected.pop(key, None)

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """The loser of the window candidate against main's victim, by recent frequency."""
        if not evictable:
            return None
        ok = allowed(evictable)
        candidate = _first(self._window, ok)
        victim = _first(self._probation, ok)
        if victim is None:
            victim = _first(self._protected, ok)
        if candidate is None or victim is None:
            found = candidate if victim is None else victim
            return found if found is not None else next(iter(evictable))
        if len(self._window) < self._window_target():
            return victim
        if self.sketch.estimate(candidate) > self.sketch.estimate(victim):
            del self._window[candidate]
            self._probation[candidate] = None
            return victim
        return candidate


def _first(segment: OrderedDict[Hashable, None], ok: Container[Hashable]) -> Hashable | None:
    for key in segment:
        if key in ok:
            return key
    return None
