"""HTTP glue of the backends that reach a server: client, retries, error bodies, SSE.

:class:`RemoteBackend` is the base of :class:`~lorapool.backends.openai.OpenAIServerBackend`
and :class:`~lorapool.backends.tgi.TGIBackend`: one :class:`httpx.AsyncClient`, ``GET
/health``, calls retried with exponential backoff on transient failures
(:meth:`RemoteBackend._request`), and streams retried the same way until their first
chunk (:meth:`RemoteBackend._stream`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar

import httpx

from lorapool.errors import BackendError, BackendServerError
from lorapool.types import Chunk

from .base import BaseBackend

__all__ = ["Reopen", "RemoteBackend", "RetryLater", "error_message", "parse_sse_line"]

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
    at most 10 s); transient failures are retried ``retries`` times, ``retry_backoff``
    seconds apart, doubling. ``transport`` replaces httpx's (tests, proxies). ``label``
    names the server in errors.
    """

    transient_status: ClassVar[frozenset[int]] = frozenset({502, 503, 504})
    """Statuses retried: the server is restarting or overloaded."""
    requires_model = True

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        retries: int,
        retry_backoff: float,
        transport: httpx.AsyncBaseTransport | None,
        *,
        label: str,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._label = f"{label} at {self.base_url}"
        headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

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

    async def _backoff(self, attempt: int, failure: BaseException) -> None:
        """Wait before retry ``attempt + 1``; raise ``failure`` when no retry is left."""
        if attempt >= self.retries:
            raise failure
        await asyncio.sleep(self.retry_backoff * 2**attempt)

    async def _request(
        self, method: str, path: str, *, what: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """One call, retried on connection errors and transient statuses.

        An error status becomes :class:`~lorapool.errors.BackendServerError`; a server
        that stays unreachable, :class:`~lorapool.errors.BackendError`.
        """
        attempt = 0
        while True:
            failure: BackendError
            try:
                response = await self._client.request(method, path, json=body)
            except httpx.TransportError as exc:
                failure = BackendError(f"{self._label} is unreachable: {exc}")
                failure.__cause__ = exc
            else:
                if response.status_code < 400:
                    return response
                failure = BackendServerError(
                    response.status_code, error_message(response), what=what
                )
                if response.status_code not in self.transient_status:
                    raise failure
            await self._backoff(attempt, failure)
            attempt += 1

    async def _stream(
        self, path: str, body: dict[str, Any], consume: Consume
    ) -> AsyncIterator[Chunk]:
        """POST ``body`` to ``path`` and yield what ``consume`` reads from the response.

        Until the first chunk, a dropped connection or :class:`RetryLater` opens the
        stream again after a backoff, and :class:`Reopen` at once. After the first
        chunk nothing is sent again (the caller has the tokens): a failure is raised as
        :class:`~lorapool.errors.BackendError`. Closing the iterator closes the HTTP
        stream (the server aborts the request).
        """
        attempt = 0
        while True:
            started = False
            try:
                async with self._client.stream("POST", path, json=body) as response:
                    async for chunk in consume(response):
                        started = True
                        yield chunk
                    return
            except Reopen:
                continue
            except (RetryLater, httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                if isinstance(exc, RetryLater):
                    failure = exc.final or BackendError(f"{self._label} failed: {exc}")
                else:
                    failure = BackendError(f"{self._label} failed: {exc!r}")
                if started:
                    raise failure from exc
                await self._backoff(attempt, failure)
                attempt += 1
