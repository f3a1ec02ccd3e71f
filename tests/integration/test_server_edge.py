"""The server's edge: bounded bodies and prompts, tokenisation off the event loop, typed errors.

uvicorn on 127.0.0.1 with TorchBackend over the real model; requests go over real HTTP
(raw sockets where the body's framing matters, httpx or the official ``openai`` client
otherwise). The big requests and the ``/health`` probes run on threads of their own, so the
event loop measured is the server's alone.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool, TieredStore  # noqa: E402
from lorapool.server import ApiKeys, Registration, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

KEY = "key-acme"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4 * 1024 * 1024
"""The documented default of ``create_app(max_body_bytes=...)``: 4 MiB."""
MAX_SEQ_LEN = 256


@dataclass
class Edge:
    url: str
    port: int
    pool: AdapterPool
    registry_file: Path

    def client(self) -> Any:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def edge(
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    refusing_source: str,
    adapters: dict[str, Path],
) -> AsyncIterator[Edge]:
    from lorapool.backends.torch import TorchBackend

    root = tmp_path_factory.mktemp("edge")
    backend = TorchBackend(
        model_dir, max_slots=2, max_rank=32, max_batch=4, max_seq_len=MAX_SEQ_LEN
    )
    store = TieredStore(disk_dir=root / "disk", disk_bytes="200MiB")
    pool = AdapterPool(backend, store=store, registry=root / "registry.sqlite")
    # acme may register from the test adapters and from the refusing loopback source.
    sources = (str(adapters["r8-attn"].parent), f"{refusing_source}/")
    app = create_app(
        pool,
        auth=ApiKeys({KEY: "acme"}),
        shutdown_timeout=5,
        registration=Registration(tenant_sources=sources),
    )
    async with serve_app(app) as running:
        yield Edge(running.url, running.port, pool, root / "registry.sqlite")


# -- raw HTTP on blocking sockets (threads) ------------------------------------------------


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of one HTTP/1.1 response read from ``sock``."""
    reader = sock.makefile("rb")
    response = http.client.HTTPResponse(sock)
    response.fp = reader
    response.begin()
    return response.status, response.read()


def _send_big(
    port: int,
    path: str,
    body_parts: list[bytes],
    *,
    content_length: int | None,
    pause_after: int,
    resume: threading.Event,
) -> tuple[int, bytes]:
    """POST ``body_parts`` (chunked unless ``content_length``), pausing until ``resume``.

    After ``pause_after`` parts the sender waits for ``resume``, so the request is in flight
    while the probes run; then it sends the rest and reads the answer.
    """
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}"]
    head.append("Content-Type: application/json")
    if content_length is None:
        head.append("Transfer-Encoding: chunked")
    else:
        head.append(f"Content-Length: {content_length}")
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for i, part in enumerate(body_parts):
            if i == pause_after:
                assert resume.wait(60), "the probes never ran"
            if content_length is None:
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            else:
                sock.sendall(part)
        if content_length is None:
            sock.sendall(b"0\r\n\r\n")
        return _read_response(sock)


def _probe_health(port: int, stop: threading.Event, started: threading.Event) -> list[float]:
    """GET /health over and over until ``stop``; each round trip's seconds.

    ``started`` is set after five probes, so the sender knows the probes overlap its request.
    """
    latencies: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        while not stop.is_set() or len(latencies) < 10:
            t0 = time.perf_counter()
            conn.request("GET", "/health")
            answer = conn.getresponse()
            answer.read()
            latencies.append(time.perf_counter() - t0)
            assert answer.status == 200
            if len(latencies) == 5:
                started.set()
            time.sleep(0.005)
    finally:
        conn.close()
    return latencies


def _while_probing(
    port: int, send: Any, parts: list[bytes], content_length: int | None
) -> tuple[int, bytes, list[float]]:
    """Send one big request while /health is probed; the answer and every probe's latency."""
    stop, started = threading.Event(), threading.Event()
    latencies: list[float] = []

    def prober() -> None:
        latencies.extend(_probe_health(port, stop, started))

    thread = threading.Thread(target=prober, daemon=True)
    thread.start()
    try:
        status, body = send(
            port,
            "/v1/completions",
            parts,
            content_length=content_length,
            pause_after=len(parts) // 2,
            resume=started,
        )
    finally:
        stop.set()
        thread.join(60)
    return status, body, latencies


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _completion_body(total: int, model: str) -> bytes:
    """A completions body of exactly ``total`` bytes (the prompt pads it)."""
    empty = json.dumps({"model": model, "max_tokens": 4, "prompt": ""}).encode()
    return json.dumps(
        {"model": model, "max_tokens": 4, "prompt": "a" * (total - len(empty))}
    ).encode()


async def test_health_answers_within_100ms_while_maximal_bodies_are_refused(edge: Edge) -> None:
    """The issue's measurement: /health's worst latency over probes made while a body just
    under the limit, and bodies far over it (counted while received; declared by
    Content-Length), are in flight and refused. Bound: 100 ms."""
    base = edge.pool.backend.capabilities.base_model
    under = _completion_body(LIMIT - 1, base)
    assert len(under) == LIMIT - 1
    far_over = _completion_body(5 * LIMIT, base)
    cases = [
        ("just under the limit, chunked", under, None, 400, "too long"),
        ("far over, chunked", far_over, None, 413, "too large"),
        ("far over, Content-Length", far_over, len(far_over), 413, "too large"),
    ]
    for name, data, length, want, words in cases:
        parts = _split(data, 256 * 1024)
        status, body, latencies = await asyncio.to_thread(
            _while_probing, edge.port, _send_big, parts, length
        )
        assert len(latencies) >= 10, name
        worst = max(latencies)
        assert worst < 0.1, f"{name}: /health took {worst * 1000:.0f} ms at worst"
        assert status == want, (name, body[:300])
        error = json.loads(body)["error"]
        assert words in error["message"] and error["code"] == want, (name, error)


async def test_a_body_over_the_limit_is_413_in_openai_error_json(edge: Edge) -> None:
    base = edge.pool.backend.capabilities.base_model
    body = _completion_body(LIMIT + 1, base)
    async with httpx.AsyncClient(base_url=edge.url, headers=AUTH, timeout=60) as http:
        answer = await http.post("/v1/completions", content=body)
        assert answer.status_code == 413
        error = answer.json()["error"]
        assert error["type"] == "request_too_large" and error["code"] == 413
        assert f"{LIMIT} bytes" in error["message"]
        # Exactly at the limit is read (and then refused for the prompt's length).
        at_limit = _completion_body(LIMIT, base)
        answer = await http.post("/v1/completions", content=at_limit)
        assert answer.status_code == 400, answer.text[:300]
        # Streamed without a Content-Length: counted while received.

        async def chunks() -> AsyncIterator[bytes]:
            for part in _split(body, 64 * 1024):
                yield part

        answer = await http.post("/v1/completions", content=chunks())
        assert answer.status_code == 413
        assert answer.json()["error"]["type"] == "request_too_large"


async def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(
    edge: Edge, tokenizer_calls: list[str]
) -> None:
    client = edge.client()
    base = edge.pool.backend.capabilities.base_model
    for call in (
        client.completions.create(model=base, prompt="word " * 100_000, max_tokens=4),
        client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": "word " * 100_000}], max_tokens=4
        ),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await call
        message = caught.value.body["message"]
        assert "too long" in message and "characters" in message and "shorten" in message
    assert tokenizer_calls == []  # refused before the tokenizer saw it
    await client.close()


@pytest.fixture
def tokenizer_calls(edge: Edge) -> Iterator[list[str]]:
    """The real tokenizer, watched: the thread of each encode / chat-template call."""
    backend: Any = edge.pool.backend
    real = backend._tokenizer
    calls: list[str] = []

    class Watched:
        def __getattr__(self, name: str) -> Any:
            attr = getattr(real, name)
            if name not in ("encode", "apply_chat_template"):
                return attr

            def watched(*args: Any, **kwargs: Any) -> Any:
                calls.append(threading.current_thread().name)
                return attr(*args, **kwargs)

            return watched

    backend._tokenizer = Watched()
    try:
        yield calls
    finally:
        backend._tokenizer = real


async def test_prompts_are_tokenized_off_the_event_loop(
    edge: Edge, tokenizer_calls: list[str]
) -> None:
    client = edge.client()
    base = edge.pool.backend.capabilities.base_model
    done = await client.completions.create(model=base, prompt="Colours:", max_tokens=2)
    assert done.usage is not None and done.usage.prompt_tokens > 0
    chat = await client.chat.completions.create(
        model=base, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content is not None
    loop_thread = threading.current_thread().name  # the server runs on this loop
    assert len(tokenizer_calls) == 2 and loop_thread not in tokenizer_calls, tokenizer_calls
    await client.close()


SURROGATE_BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "prompt": ("/v1/completions", {"prompt": "a\ud800b"}),
    "messages.0.content": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "\udfff"}]},
    ),
    "messages.0.content.0.text": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\ud83d"}]}]},
    ),
    "stop": ("/v1/completions", {"prompt": "Hi", "stop": "\ud800"}),
    "stop.1": ("/v1/completions", {"prompt": "Hi", "stop": ["ok", "\ud800"]}),
}


async def test_lone_surrogates_are_refused_with_400_and_pairs_are_text(edge: Edge) -> None:
    """Every text field that reaches the tokenizer: a lone surrogate (JSON's ``"\\ud800"``)
    is a 400 naming the field (it was a plain-text 500 from the tokenizer); a pair is an
    ordinary character."""
    base = edge.pool.backend.capabilities.base_model
    async with httpx.AsyncClient(base_url=edge.url, headers=AUTH, timeout=60) as http:
        for where, (path, fields) in SURROGATE_BODIES.items():
            body = json.dumps({"model": base, "max_tokens": 2, **fields})  # \\uXXXX escapes
            assert "\\ud" in body
            answer = await http.post(path, content=body.encode())
            assert answer.status_code == 400, (where, answer.text[:300])
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"] == (
                f"{where} contains an unpaired surrogate; send valid UTF-8 text"
            ), error
        pair = json.dumps({"model": base, "max_tokens": 2, "prompt": "smile \ud83d\ude00"})
        answer = await http.post("/v1/completions", content=pair.encode())
        assert answer.status_code == 200, answer.text[:300]


class _Refusing(BaseHTTPRequestHandler):
    """Answers every GET with the status in the path's first segment (``/403/...``)."""

    def do_GET(self) -> None:
        self.send_error(int(self.path.split("/")[1]), "refused")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def refusing_source() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


async def test_source_errors_are_typed_statuses(edge: Edge, refusing_source: str) -> None:
    """A source that refuses for good is the caller's to fix (400); one that fails for now
    is the upstream's (502). Neither is a 500."""
    cases = [
        ("forbidden", 403, 400, "source_error", "lora_path"),
        ("flaky", 503, 502, "source_unavailable", "try again"),
    ]
    async with httpx.AsyncClient(base_url=edge.url, headers=AUTH, timeout=120) as http:
        for name, upstream, status, kind, advice in cases:
            answer = await http.post(
                "/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": f"{refusing_source}/{upstream}/adapter"},
            )
            assert answer.status_code == status, answer.text[:300]
            error = answer.json()["error"]
            assert error["type"] == kind and advice in error["message"], error
    assert edge.pool.list_adapters(tenant="acme") == []


async def test_a_registry_that_cannot_write_is_503_saying_what_to_do(
    edge: Edge, adapters: dict[str, Path]
) -> None:
    """The registry's SQLite file locked by another process's writer: a 503 that says to
    retry, and nothing about the server's files."""
    other = sqlite3.connect(edge.registry_file, timeout=0)
    other.execute("BEGIN EXCLUSIVE")
    try:
        async with httpx.AsyncClient(base_url=edge.url, headers=AUTH, timeout=120) as http:
            answer = await http.post(
                "/v1/load_lora_adapter",
                json={"lora_name": "locked", "lora_path": str(adapters["r8-attn"])},
            )
    finally:
        other.rollback()
        other.close()
    assert answer.status_code == 503, answer.text[:300]
    assert "Retry-After" in answer.headers
    error = answer.json()["error"]
    assert error["type"] == "registry_unavailable" and "retry" in error["message"]
    assert str(edge.registry_file.parent) not in error["message"]


async def test_the_openapi_document_is_served(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        answer = await http.get("/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/health"} <= set(document["paths"])
    ops = document["paths"]["/v1/completions"]["post"]
    assert "413" in ops["responses"] and "400" in ops["responses"]
