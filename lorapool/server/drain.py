"""Shutdown that drains: refuse new work, let streams in flight finish, cut the rest.

:class:`Drain` is the app's (``app.state.drain``): :meth:`Drain.begin` makes new
generation requests a 503 with ``Retry-After`` and ``/ready`` a 503, while ``/health``
and the listener stay up; :meth:`Drain.run` waits up to ``timeout`` seconds for the
requests in flight to finish, then cuts the rest (each stream ends with an SSE error
event and ``data: [DONE]``, billed what it produced). The runner
(:func:`lorapool.server.run.serve`) drives it at the first SIGTERM/SIGINT and closes the
listener only after it; the app's lifespan runs it too (a no-op when already done), so
an app served another way still drains before its pool closes.

:func:`paced` reads a stream of chunks for the response: it yields ``None`` when
``ping`` seconds pass without a chunk (an SSE keep-alive comment goes out) and raises
:class:`ShuttingDown` once the drain cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

__all__ = ["Drain", "ShuttingDown", "paced"]

log = logging.getLogger("lorapool.server")

T = TypeVar("T")

CUT_GRACE_S = 10.0
"""Seconds the cut streams have to write their error event and settle their bill."""


class ShuttingDown(Exception):
    """The server's shutdown timeout ended this request before it finished."""

    retry_after = 5.0

    def __init__(self) -> None:
        super().__init__(
            "the server is shutting down and its shutdown timeout ended this request; "
            "what was generated so far is billed: retry it"
        )


class Drain:
    """The app's shutdown state: draining or not, requests in flight, the cut."""

    def __init__(self, timeout: float, retry_after: int = 5) -> None:
        self.timeout = timeout
        """Seconds :meth:`run` lets requests in flight go on."""
        self.retry_after = retry_after
        """``Retry-After`` seconds of the 503 a request gets while draining."""
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.cut = asyncio.Event()
        """Set when the timeout ended: the requests still running end now."""
        self._ran: asyncio.Future[int] | None = None

    def begin(self) -> None:
        """Refuse new requests from now on (503); those in flight go on."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.inflight)
        self.draining = True

    def enter(self) -> None:
        """A request started streaming."""
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        """A request ended (however it ended)."""
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    async def run(self) -> int:
        """Drain: :meth:`begin`, wait for the requests in flight up to :attr:`timeout`,
        then cut the rest and wait (briefly) for them to end. Returns how many were cut;
        a second call waits for the first and returns its answer."""
        if self._ran is not None:
            return await asyncio.shield(self._ran)
        self._ran = asyncio.get_running_loop().create_future()
        cut = 0
        try:
            self.begin()
            try:
                await asyncio.wait_for(self._idle.wait(), self.timeout)
            except TimeoutError:
                cut = self.inflight
                log.warning(
                    "%d requests still running after the %.0f s shutdown timeout; ending them",
                    cut,
                    self.timeout,
                )
                self.cut.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), CUT_GRACE_S)
        finally:
            self._ran.set_result(cut)
        return cut


async def paced(
    stream: AsyncIterator[T], cut: asyncio.Event, ping: float | None = None
) -> AsyncGenerator[T | None, None]:
    """``stream``'s items; ``None`` after every ``ping`` seconds without one; raises
    :class:`ShuttingDown` when ``cut`` is set (the pending read is cancelled first).

    Each read runs as a task of its own, so a wait can end on the cut or the ping timer
    without abandoning it; leaving early cancels the pending read.
    """
    it = aiter(stream)

    async def read() -> T:
        return await anext(it)

    stop: asyncio.Future[Any] = asyncio.ensure_future(cut.wait())
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if cut.is_set():
                raise ShuttingDown
            if pending is None:
                pending = asyncio.ensure_future(read())
            done, _ = await asyncio.wait(
                {pending, stop}, timeout=ping, return_when=asyncio.FIRST_COMPLETED
            )
            if pending in done:
                got, pending = pending, None
                try:
                    item: T = got.result()
                except StopAsyncIteration:
                    return
                yield item
            elif stop in done:
                raise ShuttingDown
            else:
                yield None
    finally:
        stop.cancel()
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
