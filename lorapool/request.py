"""One request's life in the pool: the stream a slot hand-off can stop.

:class:`Relay` reads a backend's stream in a task of its own, so that the scheduler
can stop the request in the engine (a slot hand-off, see
:mod:`lorapool.scheduler.handoff`) while the caller keeps one uninterrupted stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from lorapool.types import Chunk

__all__ = ["Relay"]


class Relay:
    """A backend stream, read by a task of its own so that a hand-off can stop it.

    Iterating the relay yields the backend's chunks. :meth:`hand_off` closes the
    backend's stream (the engine drops the request) while the caller keeps
    iterating: the chunks already produced still come, then the iteration ends
    with :attr:`handed_off` set. Errors of the backend's stream are raised to the
    caller as they are. :meth:`aclose` stops the stream (the caller left).
    """

    def __init__(self, stream: AsyncIterator[Chunk]) -> None:
        self.handed_off = False
        self._stream = stream
        self._queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        end: Exception | None = None
        try:
            async for chunk in self._stream:
                self._queue.put_nowait(chunk)
        except asyncio.CancelledError:
            if not self.handed_off:
                raise
        except Exception as exc:  # handed to the reader, raised there
            end = exc
        finally:
            # The reader's last item goes first: closing the stream may itself be cut short.
            self._queue.put_nowait(end)
            closing = getattr(self._stream, "aclose", None)
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing()

    def hand_off(self) -> bool:
        """Stop the backend's stream for a hand-off; False if it has already ended."""
        if self._task.done() or self.handed_off:
            return False
        self.handed_off = True
        self._task.cancel()
        return True

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> Chunk:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop the backend's stream (if it still runs) and wait until it is closed."""
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait([self._task])  # never raises: a cancel of the caller still does
