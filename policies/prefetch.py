"""Prefetch policies: which adapters to warm before a request needs them.

A prefetch policy only proposes (:class:`Warm`: an adapter and the tier to
bring it to). The store decides what it acts on: proposals go through a rate
limit and a bounded queue, and a warmed entry may only displace other
speculative entries, never ones a request has used. Like eviction policies
they are pure and synchronous, with an injectable clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence

from lorapool.abc import PrefetchPolicy, TierName, Warm

__all__ = ["KeepWarm", "PrefetchPolicy", "Preload", "SessionHint", "TierName", "Warm"]


class Preload(PrefetchPolicy):
    """Bulk preload at start: every registered adapter (or ``adapters``) into ``tier``.

    The default tier is ``host``: RAM holds far more adapters than the device
    has slots, and a host-to-device switch is milliseconds.
    """

    def __init__(self, adapters: Iterable[str] | None = None, *, tier: TierName = "host") -> None:
        self.adapters = None if adapters is None else list(adapters)
        self.tier: TierName = tier

    def on_start(self, adapter_ids: Sequence[str]) -> Iterable[Warm]:
        """Warm the chosen adapters that are registered."""
        chosen = (
            adapter_ids
            if self.adapters is None
            else [a for a in self.adapters if a in set(adapter_ids)]
        )
        return [Warm(a, self.tier) for a in chosen]


class SessionHint(PrefetchPolicy):
    """Honour session-start hints by warming the adapter into ``tier``."""

    def __init__(self, *, tier: TierName = "device") -> None:
        self.tier: TierName = tier

    def on_hint(self, adapter_id: str) -> Iterable[Warm]:
        """Warm the hinted adapter."""
        return [Warm(adapter_id, self.tier)]


class KeepWarm(PrefetchPolicy):
    """After each request keep its adapter on the device for ``window`` seconds.

    Soft: the device tier evicts adapters outside the window first, and ones
    inside it only when nothing else can go. Bookkeeping is bounded by
    ``max_tracked`` adapters.
    """

    def __init__(
        self,
        window: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 4096,
    ) -> None:
        if window < 0:
            raise ValueError("window must be >= 0 seconds")
        self.window = window
        self._clock = clock
        self._max = max_tracked
        self._last: OrderedDict[str, float] = OrderedDict()

    def on_request(self, adapter_id: str) -> Iterable[Warm]:
        """Start (or restart) the adapter's window."""
        self._last[adapter_id] = self._clock()
        self._last.move_to_end(adapter_id)
        while len(self._last) > self._max:
            self._last.popitem(last=False)
        return ()

    def keep_warm(self) -> Collection[str]:
        """Adapters used within the window."""
        horizon = self._clock() - self.window
        while self._last:
            oldest, stamp = next(iter(self._last.items()))
            if stamp >= horizon:
                break
            del self._last[oldest]
        return frozenset(self._last)
