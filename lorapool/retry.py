"""One retry policy for every remote call: capped, jittered exponential backoff.

The store's source fetches (:class:`~lorapool.store.TieredStore`) and the remote
backends' calls (:class:`~lorapool.backends.openai.OpenAIServerBackend`,
:class:`~lorapool.backends.tgi.TGIBackend`) retry their transient failures under a
:class:`RetryPolicy`; the loop itself is tenacity's
(:class:`tenacity.asyncio.AsyncRetrying`), built by :meth:`RetryPolicy.retrying`.

Retry ``n`` (the first is ``n = 0``) waits a random time in ``[(1 - jitter) * c, c]``
where ``c = min(initial * multiplier**n, max_delay)``: the ceiling grows
exponentially up to the cap, and the jitter is taken *below* the ceiling, so the cap
is never exceeded and replicas that reach the cap together still wait different
times. (tenacity's own ``wait_exponential_jitter`` adds its jitter and then caps the
sum, which makes every replica at the cap wait exactly ``max``: the thundering herd
this policy exists to avoid.) The random numbers come from the operating system
(:class:`random.SystemRandom`) unless a generator is given, so forked workers do
not share a sequence.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.asyncio import AsyncRetrying
from tenacity.wait import wait_base

__all__ = ["RetryPolicy", "resolve_retry"]

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]
"""How to wait (``asyncio.sleep`` unless a test records the delays instead)."""
OnRetry = Callable[[BaseException, float], None]
"""Told of each retry before its wait: the failure, and the seconds about to be waited."""

_SYSTEM_RANDOM = random.SystemRandom()


class RetryPolicy(BaseModel):
    """How often and how far apart a transient failure is tried again.

    ``attempts`` counts every try, the first included (``1``: never retried).
    The wait before retry ``n`` (from 0) is drawn from ``[(1 - jitter) * c, c]`` with
    ``c = min(initial * multiplier**n, max_delay)`` seconds: ``jitter=0`` is plain
    exponential backoff, ``jitter=1`` AWS's "full jitter", the default ``0.5`` its
    "equal jitter" (never less than half the ceiling). ``initial=0`` retries at once.

    Immutable and validated; a mapping of these fields (a TOML table) is accepted
    wherever a policy is, e.g. ``[backend.options.retry]`` in the server's config.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(default=4, ge=1)
    """Tries in all, the first included."""
    initial: float = Field(default=0.5, ge=0)
    """Ceiling of the first retry's wait, in seconds."""
    multiplier: float = Field(default=2.0, ge=1)
    """Growth of the ceiling from one retry to the next."""
    max_delay: float = Field(default=10.0, ge=0)
    """Cap on any one wait, in seconds (jitter included)."""
    jitter: float = Field(default=0.5, ge=0, le=1)
    """Fraction of the ceiling that is random: the wait is at least ``(1 - jitter)`` of it."""

    @property
    def retries(self) -> int:
        """Retries after the first try (``attempts - 1``)."""
        return self.attempts - 1

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry ``retry`` (from 0): exponential, capped."""
        try:
            grown = self.initial * self.multiplier**retry
        except OverflowError:
            grown = self.max_delay
        return min(grown, self.max_delay)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """A wait before retry ``retry`` (from 0), drawn with ``rng`` (the OS's by default)."""
        high = self.ceiling(retry)
        if high <= 0 or self.jitter == 0:
            return high
        draw = (rng or _SYSTEM_RANDOM).random()
        return high - self.jitter * high * draw

    def delays(self, rng: random.Random | None = None) -> list[float]:
        """One draw of the waits between all the attempts (``attempts - 1`` of them)."""
        return [self.delay(n, rng) for n in range(self.retries)]

    def with_legacy(self, retries: int | None, retry_backoff: float | None) -> RetryPolicy:
        """This policy with the older ``retries``/``retry_backoff`` keywords applied.

        ``retries`` is ``attempts - 1``; ``retry_backoff`` is ``initial``.
        """
        update: dict[str, Any] = {}
        if retries is not None:
            update["attempts"] = retries + 1
        if retry_backoff is not None:
            update["initial"] = retry_backoff
        if not update:
            return self
        return RetryPolicy.model_validate(self.model_dump() | update)

    def retrying(
        self,
        transient: Callable[[BaseException], bool],
        *,
        on_retry: OnRetry | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
    ) -> AsyncRetrying:
        """A tenacity retrier that tries again what ``transient`` says is worth it.

        The last failure is raised as it is (never a ``tenacity.RetryError``), and so
        is any failure ``transient`` rejects, at once; ``sleep`` and ``rng`` replace
        ``asyncio.sleep`` and the OS's random numbers (tests).
        """

        def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                failure = state.outcome.exception()
                if failure is not None:
                    on_retry(failure, state.upcoming_sleep)

        return AsyncRetrying(
            sleep=sleep or _sleep,
            stop=stop_after_attempt(self.attempts),
            wait=_JitteredBackoff(self, rng),
            retry=retry_if_exception(transient),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        transient: Callable[[BaseException], bool],
        *,
        on_retry: OnRetry | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
    ) -> T:
        """``await fn()``, tried again under this policy while it fails transiently."""
        retrying = self.retrying(transient, on_retry=on_retry, sleep=sleep, rng=rng)

        async def attempt() -> T:  # a coroutine function: tenacity awaits only those
            return await fn()

        result: T = await retrying(attempt)
        return result


def resolve_retry(
    retry: RetryPolicy | Mapping[str, Any] | None,
    retries: int | None,
    retry_backoff: float | None,
    default: RetryPolicy,
) -> RetryPolicy:
    """The policy a constructor was given: ``retry`` (a policy or its fields), or ``default``
    with the older ``retries``/``retry_backoff`` keywords applied; not both."""
    if retry is not None and (retries is not None or retry_backoff is not None):
        raise TypeError("pass retry=RetryPolicy(...) or retries/retry_backoff, not both")
    if retry is None:
        return default.with_legacy(retries, retry_backoff)
    if isinstance(retry, RetryPolicy):
        return retry
    return RetryPolicy.model_validate(dict(retry))


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class _JitteredBackoff(wait_base):
    """tenacity's wait for a :class:`RetryPolicy` (``attempt_number`` 1 waits before retry 0)."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None) -> None:
        self.policy = policy
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.policy.delay(retry_state.attempt_number - 1, self.rng)
