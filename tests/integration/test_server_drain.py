"""Shutdown drains with the listener up (lorapool.server.run): new requests get a 503 with
Retry-After, /health answers, /ready says 503, streams in flight finish; a stream past
``shutdown_timeout`` ends with an SSE error event and ``data: [DONE]``, billed what it
produced. In-process (uvicorn on loopback, the exit signal delivered to the server's
handler) over a MockBackend whose streams wait on the test, so nothing depends on speed;
then a real process: SIGTERM, a 503 on a new connection, the stream finished, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool  # noqa: E402
from lorapool.server import ApiKeys, create_app  # noqa: E402
from lorapool.server.run import DrainingServer  # noqa: E402
from lorapool.testing import MockBackend  # noqa: E402
from lorapool.types import Chunk, GenerationRequest  # noqa: E402

from .serving import free_port  # noqa: E402

HANG_GUARD_S = 120.0
"""Only a guard against hangs: nothing here waits for a time to pass."""


@dataclass
class GatedBackend(MockBackend):
    """A MockBackend whose streams stop after ``before_gate`` tokens until ``gate`` is set."""

    before_gate: int = 2
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """The mock's tokens, waiting at the gate after ``before_gate`` of them."""
        n = 0
        async for chunk in super().generate(request):
            if n == self.before_gate:
                self.waiting.set()
                await self.gate.wait()
            n += 1
            yield chunk


@contextlib.asynccontextmanager
async def draining_server(
    app: Any,
) -> AsyncIterator[tuple[str, DrainingServer, asyncio.Task[None]]]:
    """``app`` under a DrainingServer on a free loopback port."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = DrainingServer(config, app.state.drain)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            while not server.started:
                if task.done():
                    await task
                    raise AssertionError("the server stopped before it started")
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}", server, task
    finally:
        if not task.done():
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, HANG_GUARD_S)


def data_lines(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


async def read_until(lines: AsyncIterator[str], seen: list[str], want: int) -> None:
    """Read SSE lines into ``seen`` until ``want`` data lines came."""
    async with asyncio.timeout(HANG_GUARD_S):
        while len(data_lines(seen)) < want:
            seen.append(await anext(lines))


HEADERS = {"Authorization": "Bearer key-acme"}
BODY = {"model": "mock", "prompt": "hi", "max_tokens": 6, "stream": True}


async def test_the_drain_keeps_the_listener_up_refuses_new_work_and_finishes_streams() -> None:
    backend = GatedBackend()
    pool = AdapterPool(backend)
    app = create_app(pool, auth=ApiKeys({"key-acme": "acme"}), shutdown_timeout=HANG_GUARD_S)
    async with (
        draining_server(app) as (url, server, task),
        httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as http,
        httpx.AsyncClient(
            base_url=url, timeout=HANG_GUARD_S, limits=httpx.Limits(max_connections=1)
        ) as kept,
    ):
        assert (await kept.get("/health")).status_code == 200  # a kept-alive connection
        async with http.stream("POST", "/v1/completions", json=BODY, headers=HEADERS) as stream:
            assert stream.status_code == 200
            lines, seen = stream.aiter_lines(), []
            await read_until(lines, seen, 2)
            await asyncio.wait_for(backend.waiting.wait(), HANG_GUARD_S)

            server.handle_exit(signal.SIGTERM, None)
            async with asyncio.timeout(HANG_GUARD_S):
                while not app.state.drain.draining:
                    await asyncio.sleep(0.01)

            # The listener is up: a new connection is answered, 503 with Retry-After.
            async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as fresh:
                refused = await fresh.post("/v1/completions", json=BODY, headers=HEADERS)
                assert refused.status_code == 503
                assert int(refused.headers["retry-after"]) >= 1
                assert refused.json()["error"]["type"] == "unavailable"
                assert (await fresh.get("/health")).status_code == 200
                assert (await fresh.get("/ready")).status_code == 503
            # A kept-alive connection's next request is refused the same way.
            again = await kept.post("/v1/completions", json=BODY, headers=HEADERS)
            assert again.status_code == 503 and "retry-after" in again.headers
            assert not task.done()

            backend.gate.set()  # the stream in flight goes on to its end
            async with asyncio.timeout(HANG_GUARD_S):
                async for line in lines:
                    seen.append(line)
        events = data_lines(seen)
        assert events[-1] == "[DONE]"
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finishes[-1] == "length" and "error" not in "".join(events)
        await asyncio.wait_for(task, HANG_GUARD_S)  # the server exits after the drain
    assert backend.closed  # the pool closed after the drain
    assert pool.usage("acme").completion_tokens == 6


async def test_a_stream_past_the_shutdown_timeout_ends_with_an_error_event_then_done() -> None:
    backend = GatedBackend()  # the gate never opens: the stream outlives any timeout
    pool = AdapterPool(backend)
    app = create_app(pool, auth=ApiKeys({"key-acme": "acme"}), shutdown_timeout=0.2)
    async with (
        draining_server(app) as (url, server, task),
        httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as http,
    ):
        async with http.stream("POST", "/v1/completions", json=BODY, headers=HEADERS) as stream:
            lines, seen = stream.aiter_lines(), []
            await read_until(lines, seen, 2)
            server.handle_exit(signal.SIGTERM, None)
            async with asyncio.timeout(HANG_GUARD_S):
                async for line in lines:
                    seen.append(line)
        events = data_lines(seen)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and error["type"] == "unavailable"
        assert "shutting down" in error["message"]
        assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["base "] * 2
        await asyncio.wait_for(task, HANG_GUARD_S)
    usage = pool.usage("acme")
    assert usage.completion_tokens == 2  # billed what it produced


async def test_the_official_client_sees_the_cut_as_an_error() -> None:
    backend = GatedBackend()
    pool = AdapterPool(backend)
    app = create_app(pool, auth=ApiKeys({"key-acme": "acme"}), shutdown_timeout=0.2)
    async with draining_server(app) as (url, server, task):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="key-acme", max_retries=0)
        stream = await client.completions.create(
            model="mock", prompt="hi", max_tokens=6, stream=True
        )
        texts = []
        with pytest.raises(openai.APIError, match="shutting down"):
            async with asyncio.timeout(HANG_GUARD_S):
                async for event in stream:
                    texts.append(event.choices[0].text)
                    if len(texts) == 2:
                        server.handle_exit(signal.SIGTERM, None)
        assert texts == ["base "] * 2
        await asyncio.wait_for(task, HANG_GUARD_S)


# -- a real process ------------------------------------------------------------------------

SERVER = textwrap.dedent(
    """
    import sys
    from lorapool.server.config import ServerConfig, load_config
    from lorapool.server.run import serve
    from lorapool.testing import MockBackend

    # The mock sleeps at least token_delay per token: its streams last at least
    # max_tokens * token_delay seconds however fast the machine is.
    ServerConfig.build_backend = lambda self: MockBackend(token_delay=float(sys.argv[2]))
    serve(load_config(sys.argv[1]))
    """
)


def start_server(tmp: Path, port: int, token_delay: float) -> subprocess.Popen[bytes]:
    config = tmp / "server.toml"
    config.write_text(
        f"""
[keys]
"key-acme" = {{ tenant = "acme" }}

[server]
port = {port}
shutdown_timeout = 600
"""
    )
    script = tmp / "serve.py"
    script.write_text(SERVER)
    log = (tmp / "server.log").open("wb")
    return subprocess.Popen(
        [sys.executable, str(script), str(config), str(token_delay)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip


def text_of(log: Path) -> str:
    return log.read_text()


async def wait_ready(http: httpx.AsyncClient, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        assert proc.poll() is None, text_of(log)
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/ready")).status_code == 200:
                return
        assert time.monotonic() < deadline, text_of(log)
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_sigterm_drains_a_real_server_process_and_it_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    # 100 tokens at >= 0.1 s each: the stream outlasts the checks below by a wide margin
    # on any machine (the delay is a floor, never a ceiling).
    proc = start_server(tmp_path, port, token_delay=0.1)
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    body = {**BODY, "max_tokens": 100}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as http:
            await wait_ready(http, proc, log)
            async with http.stream("POST", "/v1/completions", json=body, headers=HEADERS) as s:
                assert s.status_code == 200
                lines, seen = s.aiter_lines(), []
                await read_until(lines, seen, 1)
                os.kill(proc.pid, signal.SIGTERM)
                async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as fresh:
                    async with asyncio.timeout(HANG_GUARD_S):
                        while (await fresh.get("/ready")).status_code != 503:
                            await asyncio.sleep(0.05)
                    refused = await fresh.post("/v1/completions", json=body, headers=HEADERS)
                    assert refused.status_code == 503, refused.text
                    assert int(refused.headers["retry-after"]) >= 1
                    assert refused.json()["error"]["type"] == "unavailable"
                    assert (await fresh.get("/health")).text == "ok"
                assert proc.poll() is None
                async with asyncio.timeout(HANG_GUARD_S * 2):
                    async for line in lines:
                        seen.append(line)
            events = data_lines(seen)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
            assert len(events) == 101
        assert proc.wait(timeout=HANG_GUARD_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    done = [r for r in records if r.get("event") == "request" and r.get("outcome") == "ok"]
    assert len(done) == 1 and done[0]["completion_tokens"] == 100
    assert all("\x1b[" not in line for line in log.read_text().splitlines())


@pytest.mark.slow
async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(tmp_path, port, token_delay=0.1)
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as http:
            await wait_ready(http, proc, log)
            body = {**BODY, "max_tokens": 10_000}
            async with http.stream("POST", "/v1/completions", json=body, headers=HEADERS) as s:
                await read_until(s.aiter_lines(), [], 1)
                os.kill(proc.pid, signal.SIGTERM)
                async with asyncio.timeout(HANG_GUARD_S):
                    while (await http.get("/ready")).status_code != 503:
                        await asyncio.sleep(0.05)
                os.kill(proc.pid, signal.SIGTERM)
                assert proc.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
