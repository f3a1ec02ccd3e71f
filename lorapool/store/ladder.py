"""The tier ladder: one generic get-or-fill, used by every tier.

A request climbs ``device <- host <- disk <- source``. At each tier it does
the same three things: look the adapter up, count a hit or a miss, and on a
miss run the tier's *fill*, which brings the adapter in from the tier below
(and so climbs one rung further down). A :class:`Rung` is that step, written
once; the tiers differ only in their lookup and their fill.

Concurrent misses for one key share one fill (:class:`SingleFlight`). A fill
that fails leaves nothing behind: the waiting callers get its error and the
next caller starts a new fill.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from lorapool.store.stats import StoreStats
from lorapool.store.tiers import SingleFlight

__all__ = ["Fill", "Lookup", "Rung"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Lookup = Callable[[K, bool], V | None]
"""``lookup(key, use)``: the tier's value for ``key``, or ``None`` when the tier lacks it.

``use`` is true when a request (not a prefetch) looks: the tier then counts an
access for its eviction policy and the entry stops being speculative.
"""

Fill = Callable[[], Coroutine[Any, Any, V]]
"""Brings the missing entry into the tier (from the tier below) and returns its value."""


class Rung(Generic[K, V]):
    """One tier's get-or-fill: look up, count a hit or a miss, else fill once per key.

    Hits and misses are counted in ``stats.hits[name]`` and
    ``stats.misses[name]``, for requests only: a prefetch (``speculative``)
    counts neither, and its lookup is not a use.

    With ``recheck``, a request that waited for a fill looks the key up again
    (a use, not counted as a second hit or miss) and fills again while the
    entry is still missing. The device tier needs it: a request may have
    joined a prefetch's load, which gives up (``None``) when no slot is free
    for a speculative entry, and every request that waited for a load counts
    as a use of the adapter. Without ``recheck`` the caller gets the fill's
    own result, which the tier may not have kept (the host tier serves an
    adapter it has no room for).
    """

    def __init__(
        self,
        name: str,
        lookup: Lookup[K, V],
        stats: StoreStats,
        *,
        recheck: bool = False,
    ) -> None:
        self.name = name
        self.flights: SingleFlight[K, V] = SingleFlight(f"{name} fill")
        """The fills running now, one per key."""
        self._lookup = lookup
        self._stats = stats
        self._recheck = recheck

    async def get(self, key: K, fill: Fill[V], *, speculative: bool = False) -> V:
        """The tier's value for ``key``; on a miss, the result of a fill.

        The first caller to miss starts ``fill()``; callers that miss while it
        runs wait for it instead of starting their own. A caller that is
        cancelled stops waiting, and the fill runs on for the others.
        """
        value = self._lookup(key, not speculative)
        if not speculative:
            counts = self._stats.hits if value is not None else self._stats.misses
            counts[self.name] += 1
        if value is not None:
            return value
        if speculative or not self._recheck:
            return await self.flights.run(key, fill)
        while value is None:
            await self.flights.run(key, fill)
            value = self._lookup(key, True)
        return value
