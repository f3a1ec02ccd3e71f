"""A token bucket on an injectable clock, for admission and for the store's prefetch rate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full.

    :meth:`try_take` never waits and :meth:`wait_time` says how long until an
    amount is there, which is what a refusal's ``retry_after`` reports.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._tokens

    def wait_time(self, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens are there (0 if they are; inf if above ``burst``)."""
        if amount > self.burst:
            return float("inf")
        self._refill()
        return max(0.0, (amount - self._tokens) / self.rate)

    def try_take(self, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if they are there."""
        if self.wait_time(amount) > 0:
            return False
        self._tokens -= amount
        return True

    async def take(self, amount: float = 1.0) -> None:
        """Wait for ``amount`` tokens (in real time) and take them."""
        while True:
            if self.try_take(amount):
                return
            await asyncio.sleep(max(self.wait_time(amount), 1e-3))
