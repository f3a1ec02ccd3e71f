"""Prefetch: warming adapters before requests need them, without harming the ones that do.

Hints (``pool.prefetch``, ``pool.session``) and the prefetch policies'
proposals become background warm tasks. They pass a bounded queue (beyond
``max_pending`` a hint is dropped and counted), a concurrency gate and a
token bucket on the store's clock (``pool.preload`` skips the bucket). The
warming itself is the store's (:meth:`TieredStore.warm`): speculative, it
displaces nothing a request has used.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

from lorapool.abc import PrefetchPolicy, conform
from lorapool.ratelimit import TokenBucket
from lorapool.store.stats import StoreStats
from lorapool.types import AdapterInfo

if TYPE_CHECKING:
    from lorapool.abc import TierName, Warm

__all__ = ["Prefetcher", "WarmFn"]


class WarmFn(Protocol):
    """Brings an adapter to a tier speculatively; returns the nearest tier it reached."""

    def __call__(
        self, info: AdapterInfo, tier: TierName, *, limited: bool
    ) -> Coroutine[Any, Any, str | None]: ...


class Prefetcher:
    """The prefetch policies, the background tasks, the gate and the token bucket.

    ``infos`` maps the adapter ids the store knows to their registrations
    (policies name adapters by id); ``warm`` does the warming.
    """

    def __init__(
        self,
        policies: Sequence[PrefetchPolicy],
        stats: StoreStats,
        *,
        infos: Mapping[str, AdapterInfo],
        warm: WarmFn,
        concurrency: int,
        rate: float,
        max_pending: int,
        clock: Callable[[], float],
    ) -> None:
        self.policies = [conform(p, PrefetchPolicy) for p in policies]
        self.pending: set[asyncio.Task[Any]] = set()
        """Background tasks (warms, preloads, loads for requests that did not wait)."""
        self.closed = False
        self._stats = stats
        self._infos = infos
        self._warm = warm
        self._gate = asyncio.Semaphore(concurrency)
        self._bucket = TokenBucket(rate, max(1.0, rate), clock)
        self._max_pending = max_pending

    # -- background tasks ------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> None:
        """Run ``coro`` in the background until it ends or the store closes."""
        task = asyncio.create_task(coro, name=name)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    def close(self) -> None:
        """Accept no more hints and cancel the background tasks."""
        self.closed = True
        for task in list(self.pending):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait for the cancelled background tasks to end."""
        await asyncio.gather(*self.pending, return_exceptions=True)

    @asynccontextmanager
    async def turn(self, *, limited: bool) -> AsyncIterator[None]:
        """One warm's turn: a place under the concurrency gate and, if ``limited``, a token."""
        async with self._gate:
            if limited:
                await self._bucket.take()
            self._stats.prefetches += 1
            yield

    # -- proposals -------------------------------------------------------------------

    def keep_warm(self) -> frozenset[str]:
        """Adapters the prefetch policies want kept on the device now."""
        out: set[str] = set()
        for policy in self.policies:
            out.update(policy.keep_warm())
        return frozenset(out)

    def on_start(self, infos: Sequence[AdapterInfo]) -> None:
        """Warm the policies' start proposals among ``infos`` in the background."""
        by_id = {i.adapter_id: i for i in infos}
        proposals = [
            (by_id[warm.adapter_id], warm.tier)
            for policy in self.policies
            for warm in policy.on_start(list(by_id))
            if warm.adapter_id in by_id
        ]
        if proposals:
            self.spawn(self._preload(proposals), name="preload at start")

    async def _preload(self, proposals: Sequence[tuple[AdapterInfo, TierName]]) -> None:
        """Warm the start proposals in the background, with a progress bar on a terminal."""
        from tqdm.auto import tqdm

        with tqdm(total=len(proposals), desc="preload", unit="adapter", disable=None) as bar:

            async def one(info: AdapterInfo, tier: TierName) -> None:
                await self._warm(info, tier, limited=False)
                bar.update(1)

            await asyncio.gather(*(one(info, tier) for info, tier in proposals))

    def hint(self, info: AdapterInfo, tier: TierName) -> bool:
        """Warm ``info`` into ``tier`` in the background, rate-limited; False if dropped.

        The policies see the hint too and may propose more.
        """
        accepted = self._hint(info, tier)
        for policy in self.policies:
            self._follow(policy.on_hint(info.adapter_id))
        return accepted

    def request_done(self, adapter_id: str) -> None:
        """A request for ``adapter_id`` finished: warm what the policies propose."""
        for policy in self.policies:
            self._follow(policy.on_request(adapter_id))

    def _follow(self, proposals: Iterable[Warm]) -> None:
        # Policies name adapters; the store knows every registered one it was told about.
        for warm in proposals:
            info = self._infos.get(warm.adapter_id)
            if info is not None:
                self._hint(info, warm.tier)

    def _hint(self, info: AdapterInfo, tier: TierName) -> bool:
        if self.closed or len(self.pending) >= self._max_pending:
            self._stats.prefetch_dropped += 1
            return False
        self.spawn(self._warm(info, tier, limited=True))
        return True
