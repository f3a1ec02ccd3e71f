"""What every response carries: ``x-request-id`` (401s, 404s, generations, /health, 500s),
and a stream's SSE headers and keep-alive pings (``: ping`` while no token comes), which the
official client ignores. Uvicorn on loopback over a MockBackend whose streams wait on the
test, so a ping is certain to be sent before the stream goes on: nothing waits on a clock."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from starlette.types import Message, Receive, Scope, Send  # noqa: E402

from lorapool import AdapterPool  # noqa: E402
from lorapool.server import ApiKeys, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402
from .test_server_drain import HANG_GUARD_S, GatedBackend  # noqa: E402

HEADERS = {"Authorization": "Bearer key-acme"}
BODY = {"model": "mock", "prompt": "hi", "max_tokens": 4, "stream": True}


class PingSpy:
    """The app, with an event set once a response body carried an SSE ping."""

    def __init__(self, app: Any) -> None:
        self.app, self.pinged = app, asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def spy(message: Message) -> None:
            if message["type"] == "http.response.body" and b": ping" in message.get("body", b""):
                self.pinged.set()
            await send(message)

        await self.app(scope, receive, spy)


def app_over(backend: GatedBackend, **kw: Any) -> Any:
    return create_app(AdapterPool(backend), auth=ApiKeys({"key-acme": "acme"}), **kw)


async def open_gate_after_a_ping(backend: GatedBackend, spy: PingSpy) -> None:
    await asyncio.wait_for(spy.pinged.wait(), HANG_GUARD_S)
    backend.gate.set()


async def test_a_stream_has_sse_headers_and_pings_while_it_waits_for_a_token() -> None:
    backend = GatedBackend()
    app = app_over(backend, sse_ping_interval=0.05)
    async with (
        serve_app(app) as running,
        httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD_S) as http,
        http.stream("POST", "/v1/completions", json=BODY, headers=HEADERS) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        lines: list[str] = []
        async with asyncio.timeout(HANG_GUARD_S):
            async for line in stream.aiter_lines():
                lines.append(line)
                if line == ": ping":
                    backend.gate.set()  # the stream goes on once a ping came
    assert ": ping" in lines
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == "base " * 4


async def test_the_official_client_reads_a_stream_with_pings() -> None:
    backend = GatedBackend()
    spy = PingSpy(app_over(backend, sse_ping_interval=0.05))
    async with serve_app(spy) as running:
        client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="key-acme", max_retries=0)
        opener = asyncio.create_task(open_gate_after_a_ping(backend, spy))
        stream = await client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        async with asyncio.timeout(HANG_GUARD_S):
            events = [event async for event in stream]
        await opener
    assert spy.pinged.is_set()
    assert "".join(e.choices[0].delta.content or "" for e in events) == "base " * 4
    assert events[-1].choices[0].finish_reason == "length"


async def test_no_ping_when_tokens_keep_coming() -> None:
    backend = GatedBackend()
    backend.gate.set()
    app = app_over(backend)  # the default interval (15 s) is far above this stream's gaps
    async with (
        serve_app(app) as running,
        httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD_S) as http,
    ):
        response = await http.post("/v1/completions", json=BODY, headers=HEADERS)
    assert ": ping" not in response.text and response.text.endswith("data: [DONE]\n\n")


async def test_every_response_has_a_request_id(caplog: pytest.LogCaptureFixture) -> None:
    backend = GatedBackend()
    backend.gate.set()
    app = app_over(backend)
    async with (
        serve_app(app) as running,
        httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD_S) as http,
    ):
        responses = {
            "401": await http.get("/v1/models", headers={"Authorization": "Bearer wrong"}),
            "404 route": await http.get("/v1/nothing-here", headers=HEADERS),
            "404 model": await http.post(
                "/v1/completions", json={**BODY, "model": "acme/none"}, headers=HEADERS
            ),
            "health": await http.get("/health"),
            "ready": await http.get("/ready"),
            "models": await http.get("/v1/models", headers=HEADERS),
        }
        for what, response in responses.items():
            assert response.headers["x-request-id"], what
        assert responses["401"].status_code == 401
        assert responses["404 route"].status_code == 404
        assert responses["404 route"].json()["error"]["code"] == 404
        assert responses["404 model"].status_code == 404
        ids = {r.headers["x-request-id"] for r in responses.values()}
        assert len(ids) == len(responses)  # one of its own each

        # A generation without one: its completion id. With a sane one: echoed, and the
        # request's log line has both.
        plain = await http.post("/v1/completions", json={**BODY, "stream": False}, headers=HEADERS)
        assert plain.headers["x-request-id"] == plain.json()["id"]
        with caplog.at_level(logging.INFO, logger="lorapool.server"):
            mine = await http.post(
                "/v1/completions",
                json={**BODY, "stream": False},
                headers={**HEADERS, "x-request-id": "client-abc.123"},
            )
            streamed = await http.post(
                "/v1/completions", json=BODY, headers={**HEADERS, "x-request-id": "client-s"}
            )
        assert mine.headers["x-request-id"] == "client-abc.123"
        assert streamed.headers["x-request-id"] == "client-s"
        logged = {r.request_id: r for r in caplog.records if r.getMessage() == "request"}  # type: ignore[attr-defined]
        assert logged["client-abc.123"].completion_id == mine.json()["id"]  # type: ignore[attr-defined]
        assert "client-s" in logged

        # An id that is too long or carries odd characters is not echoed: one is made.
        for bad in ("x" * 200, "evil\tid", "a b"):
            response = await http.get("/health", headers={"x-request-id": bad})
            assert response.headers["x-request-id"] not in (bad, "")
