"""Following a registry store that other replicas change: act when its version moves.

Replicas sharing one registry store (PostgreSQL behind a load balancer, a Ray actor, a
SQLite file on one machine) each keep adapters in their own tiers. When one replica
unregisters or forgets an adapter, the others see the registry change at once (their
lookups read the store's :meth:`~lorapool.abc.RegistryStore.version`), but their copies of
the adapter's weights would stay in their device slots, RAM and disk tier until evicted.
:class:`RegistryFollower` watches the version (a number in memory for PostgreSQL, pushed
by ``NOTIFY``) and calls back when it moves, so the pool can drop what left the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

__all__ = ["RegistryFollower"]

log = logging.getLogger(__name__)


class RegistryFollower:
    """Calls ``on_change()`` after the store's ``version()`` moved, checking every
    ``interval`` seconds; one call at a time, an error logged and the next change tried."""

    def __init__(
        self,
        version: Callable[[], int],
        on_change: Callable[[], Awaitable[None]],
        *,
        interval: float = 0.2,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, not {interval}")
        self._version = version
        self._on_change = on_change
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.changes = 0
        """Changes acted on."""

    def start(self) -> None:
        """Start following (on the running event loop). Idempotent."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop following. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        seen = self._read()
        while True:
            await asyncio.sleep(self.interval)
            now = self._read()
            if now is None or now == seen:
                continue
            seen = now
            self.changes += 1
            try:
                await self._on_change()
            except Exception:
                log.exception("acting on a registry change failed; the next change retries")

    def _read(self) -> int | None:
        try:
            return self._version()
        except Exception as exc:  # the store away: keep the last view, try again later
            log.debug("registry version unreadable: %s", exc)
            return None
