"""HTTP glue of the backends that reach a server: client, retries, error bodies, SSE.

:class:`RemoteBackend` is the base of :class:`~lorapool.backends.openai.OpenAIServerBackend`
and :class:`~lorapool.backends.tgi.TGIBackend`: one :class:`httpx.AsyncClient`, ``GET
/health``, calls retried under a :class:`~lorapool.retry.RetryPolicy` (capped, jittered
exponential backoff) on transient failures (:meth:`RemoteBackend._request`), and
streams retried the same way until their first chunk (:meth:`RemoteBackend._stream`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import httpx

from lorapool.errors import BackendError, BackendServerError
from lorapool.retry import RetryPolicy
from lorapool.types import Chunk

from .base import BaseBackend

__all__ = ["Reopen", "RemoteBackend", "RetryLater", "error_message", "parse_sse_line"]

log = logging.getLogger(__name__)

Consume = Callable[[httpx.Response], AsyncIterator[Chunk]]
"""Reads one streamed response: checks its status, yields its chunks."""


class RetryLater(Exception):
    """A transient failure before the stream's first chunk: try the request again.

    ``final`` is the error to raise instead when no retry is left.
    """

    def __init__(self, message: str, final: BackendError | None = None) -> None:
        super().__init__(message)
        self.final = final


class Reopen(Exception):
    """Open the stream again now, without counting a retry (e.g. after reloading an adapter)."""


class _Transient(Exception):
    """A failure worth retrying; ``failure`` is what the caller sees when none is left."""

    def __init__(self, failure: BackendError) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _Transient)


async def _aclose(chunks: AsyncIterator[Chunk]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


def error_message(response: httpx.Response) -> str:
    """The server's message in an error body (OpenAI's, vLLM's or TGI's shape), or its text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text.strip()[:500]
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])  # OpenAI: {"error": {"message": ...}}
        if isinstance(body.get("message"), str):
            return str(body["message"])  # {"object": "error", "message": ...}
        if "error" in body and not isinstance(error, Mapping):
            return str(error)  # TGI: {"error": "...", "error_type": "..."}
    return json.dumps(body)[:500]


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """One ``data: {...}`` line of an SSE stream as JSON; ``None`` for other lines and [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    event = json.loads(data)
    if not isinstance(event, dict):
        raise BackendError(f"the server streamed a non-object event: {data[:200]}")
    return event


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a streamed response (``data:`` lines; comments and [DONE] skipped)."""
    async for line in response.aiter_lines():
        event = parse_sse_line(line)
        if event is not None:
            yield event


class RemoteBackend(BaseBackend):
    """A backend whose engine is a server at ``base_url``, reached through httpx.

    ``api_key`` is sent as a Bearer token; ``timeout`` bounds each call (connecting:
    at most 10 s); transient failures (connection errors, :attr:`transient_status`) are
    retried under ``retry``. ``transport`` replaces httpx's (tests, proxies). ``label``
    names the server in errors.
    """

    transient_status: ClassVar[frozenset[int]] = frozenset({502, 503, 504})
    """Statuses retried: the server is restarting or overloaded."""
    default_retry: ClassVar[RetryPolicy] = RetryPolicy()
    """The policy of a backend given none: 4 attempts, 0.5 s doubling up to 10 s, jittered."""
    requires_model = True

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        retry: RetryPolicy,
        transport: httpx.AsyncBaseTransport | None,
        *,
        label: str,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        """How transient failures are retried."""
        self._label = f"{label} at {self.base_url}"
        headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    @property
    def retries(self) -> int:
        """Retries after the first try (``retry.attempts - 1``)."""
        return self.retry.retries

    @property
    def retry_backoff(self) -> float:
        """Ceiling of the first retry's wait, in seconds (``retry.initial``)."""
        return self.retry.initial

    async def _aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def health(self) -> bool:
        """``GET /health`` answers 200."""
        if self._closed:
            return False
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _on_retry(self, exc: BaseException, delay: float) -> None:
        log.info("%s: retrying in %.2fs after: %s", self._label, delay, exc)

    async def _retried(self, fn: Callable[[], Any]) -> Any:
        """``await fn()`` under :attr:`retry`; what it raises as :class:`_Transient` is
        retried, and raised as its ``failure`` when no retry is left."""
        try:
            return await self.retry.call(fn, _is_transient, on_retry=self._on_retry)
        except _Transient as exc:
            raise exc.failure from exc.__cause__

    async def _request(
        self, method: str, path: str, *, what: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """One call, retried on connection errors and transient statuses.

        An error status becomes :class:`~lorapool.errors.BackendServerError`; a server
        that stays unreachable, :class:`~lorapool.errors.BackendError`.
        """

        async def attempt() -> httpx.Response:
            try:
                response = await self._client.request(method, path, json=body)
            except httpx.TransportError as exc:
                failure = BackendError(f"{self._label} is unreachable: {exc}")
                raise _Transient(failure) from exc
            if response.status_code < 400:
                return response
            error = BackendServerError(response.status_code, error_message(response), what=what)
            if response.status_code in self.transient_status:
                raise _Transient(error)
            raise error

        response: httpx.Response = await self._retried(attempt)
        return response

    async def _stream(
        self, path: str, body: dict[str, Any], consume: Consume
    ) -> AsyncIterator[Chunk]:
        """POST ``body`` to ``path`` and yield what ``consume`` reads from the response.

        Until the first chunk, a dropped connection or :class:`RetryLater` opens the
        stream again under :attr:`retry`, and :class:`Reopen` at once. After the first
        chunk nothing is sent again (the caller has the tokens): a failure is raised as
        :class:`~lorapool.errors.BackendError`. Closing the iterator closes the HTTP
        stream (the server aborts the request).
        """

        async def first_chunk() -> tuple[AsyncExitStack, AsyncIterator[Chunk], Chunk | None]:
            while True:
                stack = AsyncExitStack()
                try:
                    response = await stack.enter_async_context(
                        self._client.stream("POST", path, json=body)
                    )
                    chunks = consume(response)
                    stack.push_async_callback(_aclose, chunks)
                    first = await anext(aiter(chunks), None)
                except Reopen:
                    await stack.aclose()
                    continue
                except _RETRIED as exc:
                    await stack.aclose()
                    raise _Transient(self._stream_failure(exc)) from exc
                except BaseException:
                    await stack.aclose()
                    raise
                return stack, chunks, first

        stack, chunks, first = await self._retried(first_chunk)
        async with stack:
            if first is None:
                return
            yield first
            try:
                async for chunk in chunks:
                    yield chunk
            except _RETRIED as exc:  # the caller has tokens: never sent again
                raise self._stream_failure(exc) from exc

    def _stream_failure(self, exc: BaseException) -> BackendError:
        if isinstance(exc, RetryLater):
            return exc.final or BackendError(f"{self._label} failed: {exc}")
        return BackendError(f"{self._label} failed: {exc!r}")


_RETRIED = (RetryLater, httpx.ConnectError, httpx.RemoteProtocolError)
"""What fails a stream transiently (before its first chunk)."""
