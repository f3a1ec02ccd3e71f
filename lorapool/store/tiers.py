"""Building blocks of the store: a byte-bounded tier and single flight.

A :class:`Tier` is bookkeeping only: which keys it holds, their sizes, and
which to give up when something new must fit. It asks its eviction policy for
victims among the entries the store says are evictable, and it refuses
(rather than overfills) when those are not enough. What the entries are
(bytes in RAM, directories on disk) and how they are freed is the store's
business.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lorapool.abc import EvictionPolicy

__all__ = ["SingleFlight", "Tier", "parse_size"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"512MiB"`` / ``"2 GB"``."""
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {size!r}; use bytes or e.g. '512MiB', '2GiB', '1GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int
    speculative: bool


class Tier(Generic[K, V]):
    """Entries with sizes under a byte capacity (``None``: unbounded), evicted by a policy.

    An entry put there by a prefetch is *speculative* until a request uses
    it; a speculative insert may only displace other speculative entries, so
    prefetching never pushes out the working set.
    """

    def __init__(self, name: str, capacity: int | None, policy: EvictionPolicy) -> None:
        self.name = name
        self.capacity = capacity
        self.policy = policy
        self._entries: dict[K, _Entry[V]] = {}
        self.used = 0
        self.evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def get(self, key: K, *, use: bool = True) -> V | None:
        """The entry's value; ``use`` counts an access (and ends speculation)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if use:
            entry.speculative = False
            self.policy.on_access(key)
        return entry.value

    def size_of(self, key: K) -> int:
        """Bytes the entry occupies (0 if absent)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.size

    def make_room(
        self, size: int, *, protected: Callable[[K], bool], speculative: bool = False
    ) -> list[tuple[K, V]] | None:
        """Evict until ``size`` more bytes fit, and return what was evicted.

        Returns ``None``, evicting nothing, when it cannot be done without
        touching protected entries (or, for a speculative insert, entries a
        request has used).
        """
        if self.capacity is None:
            return []
        if size > self.capacity:
            return None
        need = self.used + size - self.capacity
        if need <= 0:
            return []
        candidates = {
            k
            for k, e in self._entries.items()
            if not protected(k) and (e.speculative or not speculative)
        }
        if sum(self._entries[k].size for k in candidates) < need:
            return None
        evicted: list[tuple[K, V]] = []
        while self.used + size > self.capacity:
            choice = self.policy.victim(candidates)
            if choice not in candidates:
                log.warning(
                    "%s tier: eviction policy %r proposed %r, which is not evictable; "
                    "evicting another entry",
                    self.name,
                    type(self.policy).__name__,
                    choice,
                )
                choice = next(iter(candidates))
            key: K = choice
            candidates.discard(key)
            evicted.append((key, self._drop(key)))
            self.evictions += 1
        return evicted

    def expire(self, *, protected: Callable[[K], bool]) -> list[tuple[K, V]]:
        """Drop the entries the policy says have expired (:meth:`EvictionPolicy.expired`).

        Protected entries stay whatever the policy says.
        """
        dropped: list[tuple[K, V]] = []
        for key in list(self.policy.expired()):
            if key in self._entries and not protected(key):
                dropped.append((key, self._drop(key)))
                self.evictions += 1
        return dropped

    def put(self, key: K, value: V, size: int, *, cost: float, speculative: bool = False) -> None:
        """Record an entry (after :meth:`make_room` made space for it)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old.size
            self.policy.on_remove(key)
        self._entries[key] = _Entry(value, size, speculative)
        self.used += size
        self.policy.on_insert(key, size, cost)

    def pop(self, key: K) -> V | None:
        """Remove an entry; ``None`` if absent."""
        if key not in self._entries:
            return None
        return self._drop(key)

    def _drop(self, key: K) -> V:
        entry = self._entries.pop(key)
        self.used -= entry.size
        self.policy.on_remove(key)
        return entry.value


class SingleFlight(Generic[K, T]):
    """At most one running task per key; concurrent callers await the same result.

    A caller that is cancelled stops waiting, but the shared task runs on for
    the others (and its result is kept by the tier it fills).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: dict[K, asyncio.Task[T]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, key: K, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Join the task running for ``key``, or start ``make()`` as that task."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(make(), name=f"{self._name} {key}")
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def wait(self, key: K) -> None:
        """Wait until no task runs for ``key`` (whatever its outcome)."""
        task = self._tasks.get(key)
        if task is not None:
            await asyncio.wait([task])

    def cancel_all(self) -> None:
        """Cancel every running task (at shutdown)."""
        for task in self._tasks.values():
            task.cancel()
