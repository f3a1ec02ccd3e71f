"""Write your own eviction policy, check it, simulate it, and hand it to a store.

A policy subclasses ``lorapool.abc.EvictionPolicy`` and defines its four required
methods (``on_insert``, ``on_access``, ``on_remove``, ``victim``); the optional
``expired`` keeps the seam's default (nothing expires). This one
evicts the largest entry (oldest first among equals), which frees the most
memory per eviction. No model is needed to run this script:

    python examples/custom_policy.py
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Collection, Hashable

import lorapool
from lorapool.abc import EvictionPolicy
from lorapool.bench.cache import belady, simulate, zipf_trace
from lorapool.plugins import load_policy
from lorapool.testing import ManualClock, check_policy


class LargestFirstPolicy(EvictionPolicy):
    """Evict the largest evictable entry; among equal sizes, the one inserted first."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # unused, accepted like every built-in policy
        self._entries: dict[Hashable, tuple[int, int]] = {}  # key -> (size, insertion order)
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """Remember the entry's size."""
        self._entries[key] = (size, next(self._order))

    def on_access(self, key: Hashable) -> None:
        """Uses do not matter to this policy."""

    def on_remove(self, key: Hashable) -> None:
        """Forget the entry (unknown keys are fine)."""
        self._entries.pop(key, None)

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """The largest evictable entry, or ``None`` when nothing may be evicted."""
        if not evictable:
            return None
        known = [k for k in evictable if k in self._entries]
        if not known:
            return next(iter(evictable))
        return max(known, key=lambda k: (self._entries[k][0], -self._entries[k][1]))


def main() -> None:
    """Check the policy, compare it with two built-ins, and build a store with it."""
    # 1. The conformance suite every built-in policy passes (raises AssertionError if not).
    check_policy(lambda clock: LargestFirstPolicy(clock=clock))
    print("conformance suite: passed")

    # 2. The simulator: 20,000 Zipf requests over 300 adapters of 1, 2, 4 or 8 units,
    #    in a tier holding 10% of all units.
    rng = random.Random(0)
    keys = zipf_trace(300, 1.0, 20_000, rng)
    sizes = {k: rng.choice((1, 2, 4, 8)) for k in range(300)}
    capacity = sum(sizes.values()) // 10
    print(f"{'policy':<14}{'miss ratio':>12}{'byte miss ratio':>17}")
    for name in ("largest-first", "lru", "sieve"):
        clock = ManualClock()
        policy = LargestFirstPolicy(clock=clock) if name == "largest-first" else load_policy(name)
        result = simulate(policy, keys, capacity, sizes, clock)
        print(f"{name:<14}{result.miss_ratio:>12.3f}{result.byte_miss_ratio:>17.3f}")
    best = belady(keys, capacity, sizes)
    print(f"{'belady (~opt)':<14}{best.miss_ratio:>12.3f}{best.byte_miss_ratio:>17.3f}")

    # 3. Use it: a policy object is passed as is (a registered name works the same way).
    store = lorapool.TieredStore(eviction=LargestFirstPolicy())
    print(f"{type(store).__name__}(eviction=LargestFirstPolicy()) ready for an AdapterPool")


if __name__ == "__main__":
    main()
