"""One tenant's hostile request leaves another tenant's streams exactly as they were.

With tenant B streaming, tenant A sends each hostile request of :data:`HOSTILE`; B's
streams complete with the same tokens as without A, and A is answered with a 4xx or a
typed error (never a 500) where its request is refused.

Through the real server: uvicorn on 127.0.0.1 over a :class:`TorchBackend` with the real
model and real PEFT adapters, driven with httpx (the hostile bodies are sent as raw
bytes, which the ``openai`` client would not send). B runs two greedy streams (a
completion and a chat, ``temperature=0``, ``ignore_eos`` and a fixed ``max_tokens``) on its
adapter; A's request goes out once both have streamed their first token, while they are
still running.

The reference is B's two streams with A idle. The embedded engine's greedy tokens for a
row do not depend on which other rows share its forward passes (``test_row_faults``
relies on the same); the ``benign`` row of the table checks it here too, with an ordinary
request from A on A's own adapter running beside B. The API returns text, not token
ids, so "the same tokens" is compared as the same sequence of streamed text deltas, the
same ``finish_reason`` and the same usage.

Add a hostile request by adding a row to :data:`HOSTILE`: an ``async`` function that
sends A's request (``ctx`` has the server and a client with A's key) and asserts what A
got. A row whose fix has not landed yet takes ``marks=pytest.mark.xfail(strict=True,
reason=...)``: it fails until the fix lands, and then the mark must go.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool, FairScheduler  # noqa: E402
from lorapool.server import ApiKeys, Registration, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

KEY_A, KEY_B = "key-tenant-a", "key-tenant-b"
KEYS = {KEY_A: "tenanta", KEY_B: "tenantb"}
B_ADAPTER = "tenantb/helper"
A_ADAPTER = "tenanta/own"
A_NAN_ADAPTER = "tenanta/overflow"
B_TOKENS = 32  # each of B's streams; A's requests are far shorter
A_TOKENS = 6
B_STREAMS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": "Once upon a time, in a quiet village,"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Describe the sea."}]}),
]


@dataclass
class Stream:
    """What one streamed response carried: its text deltas, finish reason and usage."""

    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False


@dataclass
class Served:
    """The server on loopback and the pool behind it."""

    url: str
    pool: AdapterPool
    b_source: str  # where B's adapter is on the server's disk


@dataclass
class Ctx:
    """What a hostile request needs: the server, and a client with A's key."""

    served: Served
    http: Any  # httpx.AsyncClient

    async def post(self, path: str, body: dict[str, Any] | bytes) -> Any:
        """POST ``body`` (JSON, or raw bytes sent as they are) with A's key."""
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            return await self.http.post(path, content=body, headers=headers)
        return await self.http.post(path, json=body)


def _overflowing_copy(src: Path, dst: Path) -> Path:
    """A copy of the PEFT adapter at ``src`` whose weights are finite but so large that
    its LoRA delta overflows float32: every logit of a row using it is NaN or Inf.

    Validation refuses NaN/Inf weights outright; finite weights this large are a norm
    anomaly, which ``force=True`` accepts (an operator overriding the check).
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: (v.float() * 1e20).to(v.dtype) for k, v in tensors.items()}, weights)
    return dst


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(
    model_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=4, max_rank=32, max_batch=8, max_seq_len=256)
    pool = AdapterPool(backend, scheduler=FairScheduler())
    # Each tenant may register from its own directory under ``root``, and from nowhere else.
    root = tmp_path_factory.mktemp("tenant-adapters")
    registration = Registration(tenant_sources=(f"{root}/{{tenant}}",))
    app = create_app(pool, auth=ApiKeys(KEYS), shutdown_timeout=30, registration=registration)
    async with serve_app(app) as running:
        url = running.url
        await pool.register(B_ADAPTER, str(adapters["r16-all"]), tenant="tenantb")
        # A registers its own adapter over HTTP, from its own directory: allowed.
        own = shutil.copytree(adapters["r8-attn"], root / "tenanta" / "own")
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(
                "/v1/load_lora_adapter",
                json={"lora_name": "own", "lora_path": str(own)},
                headers={"Authorization": f"Bearer {KEY_A}"},
            )
        assert r.status_code == 200, r.text
        # The operator registers A's overflowing adapter (over the norm check: force).
        overflow = _overflowing_copy(adapters["r32-attn"], root / "tenanta" / "overflow")
        await pool.register(A_NAN_ADAPTER, str(overflow), tenant="tenanta", force=True)
        for adapter, tenant in [(B_ADAPTER, "tenantb"), (A_ADAPTER, "tenanta")]:
            await pool.pin(adapter, tenant=tenant)  # no cold start inside a case
        await pool.pin(A_NAN_ADAPTER, tenant="tenanta")
        yield Served(url, pool, str(adapters["r16-all"]))


async def _stream_b(http: Any, index: int, started: asyncio.Event) -> Stream:
    """One of B's greedy streams, to the end; ``started`` is set at its first token."""
    path, prompt = B_STREAMS[index]
    body = {
        "model": B_ADAPTER,
        **prompt,
        "max_tokens": B_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = Stream()
    try:
        async with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    break
                event = json.loads(line[6:])
                assert "error" not in event, event
                out.usage = event.get("usage") or out.usage
                for choice in event["choices"]:
                    text = choice["text"] if "text" in choice else choice["delta"].get("content")
                    if text:
                        out.deltas.append(text)
                        started.set()
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
    finally:
        started.set()  # also when the stream failed: the caller then sees why
    return out


async def _b_beside(
    served: Served, hostile: Callable[[Ctx], Awaitable[None]] | None
) -> list[Stream]:
    """B's two streams, with A's ``hostile`` request sent while both are running."""
    auth_b = {"Authorization": f"Bearer {KEY_B}"}
    auth_a = {"Authorization": f"Bearer {KEY_A}"}
    async with (
        httpx.AsyncClient(base_url=served.url, headers=auth_b, timeout=None) as b_http,
        httpx.AsyncClient(base_url=served.url, headers=auth_a, timeout=None) as a_http,
    ):
        started = [asyncio.Event() for _ in B_STREAMS]
        streams = [
            asyncio.create_task(_stream_b(b_http, i, started[i])) for i in range(len(B_STREAMS))
        ]
        for event in started:
            await event.wait()
        b_running = not any(s.done() for s in streams)
        try:
            if hostile is not None:
                await hostile(Ctx(served, a_http))
        finally:
            done = await asyncio.gather(*streams)
        assert b_running, "B's streams ended before A's request was sent"
    # Every request is over and freed, A's included (a cancelled one ends a step later).
    backend: Any = served.pool.backend
    while backend.live_sequences:  # the test's timeout is the hang guard
        await asyncio.sleep(0.02)
    return done


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def b_alone(served: Served) -> list[Stream]:
    """B's streams with A idle: the reference."""
    streams: list[Stream] = await _b_beside(served, None)
    for s in streams:
        assert s.done and s.finish_reason == "length", s
        assert s.usage is not None and s.usage["completion_tokens"] == B_TOKENS, s
    return streams


# -- A's requests ------------------------------------------------------------------------


def _a_completion(model: str = A_ADAPTER, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": "The capital of France is",
        "max_tokens": A_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def _refused(response: Any, *statuses: int) -> dict[str, Any]:
    """A's request was refused with one of ``statuses`` (a 4xx), OpenAI's error body."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] and error["message"], error
    return error


async def benign(ctx: Ctx) -> None:
    """An ordinary request on A's own adapter, running beside B's (the control)."""
    r = await ctx.post("/v1/completions", _a_completion())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == A_TOKENS


async def tiny_temperature(ctx: Ctx) -> None:
    """Sampling at temperature 1e-300: ``logits / T`` overflows unless scaled with care;
    it used to raise in the engine step and fail every tenant's running requests."""
    r = await ctx.post("/v1/completions", _a_completion(temperature=1e-300, seed=3))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == A_TOKENS


async def non_finite_logits(ctx: Ctx) -> None:
    """A's adapter overflows: its row's logits are not finite. A's request ends with a
    typed backend error (502), the step's other rows go on."""
    r = await ctx.post("/v1/completions", _a_completion(A_NAN_ADAPTER))
    assert r.status_code == 502, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["type"] == "backend_error" and "not finite" in error["message"], error


async def enormous_body(ctx: Ctx) -> None:
    """A 20 MB JSON body: refused (too large, or the prompt too long), never a 500."""
    body = json.dumps(_a_completion(prompt="lorem ipsum " * (20_000_000 // 12))).encode()
    assert len(body) >= 20_000_000
    _refused(await ctx.post("/v1/completions", body), 400, 413)


async def lone_surrogate(ctx: Ctx) -> None:
    """A prompt holding an unpaired surrogate (valid JSON, not valid text): a 400."""
    raw = json.dumps(_a_completion()).replace("France", "Fr\\ud800ance").encode()
    assert b"\\ud800" in raw
    _refused(await ctx.post("/v1/completions", raw), 400)
    chat = _a_completion()
    del chat["prompt"]
    chat["messages"] = [{"role": "user", "content": "Hello \\ud800"}]
    raw = json.dumps(chat).replace("\\\\ud800", "\\ud800").encode()
    assert b"\\ud800" in raw and b"\\\\ud800" not in raw
    _refused(await ctx.post("/v1/chat/completions", raw), 400)


async def _register_refused(ctx: Ctx, path: str) -> None:
    """A registers ``path`` (a path on the server) over HTTP: refused, nothing recorded."""
    registry = ctx.served.pool.registry
    body = {"lora_name": "taken", "lora_path": path}
    try:
        _refused(await ctx.post("/v1/load_lora_adapter", body), 400, 403, 404)
    finally:
        if "tenanta/taken" in registry:  # it got through: leave the next case a clean pool
            await ctx.served.pool.unregister("taken", tenant="tenanta")
            raise AssertionError(f"A registered {path!r}")


async def path_outside(ctx: Ctx) -> None:
    """Registering a server path outside A's adapter sources (``/etc``): refused."""
    for path in ("/etc", "file:///etc", "/etc/passwd"):
        await _register_refused(ctx, path)


async def b_adapter_path(ctx: Ctx) -> None:
    """Registering B's adapter by its path on the server's disk: a valid adapter, but
    outside the sources A may register from, so refused; A does not get B's weights under
    a name of its own."""
    await _register_refused(ctx, ctx.served.b_source)


async def disconnect(ctx: Ctx) -> None:
    """A streams on its own adapter and hangs up after two chunks: its request is
    cancelled in the engine (checked after B's streams end: no live sequence is left)."""
    body = _a_completion(max_tokens=100, stream=True)
    seen = 0
    async with ctx.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 2:
                break  # leaving the block closes the connection mid-stream
    assert seen == 2


HOSTILE = [
    pytest.param(benign, id="benign"),
    pytest.param(tiny_temperature, id="temperature-1e-300"),
    pytest.param(non_finite_logits, id="adapter-with-non-finite-logits"),
    pytest.param(enormous_body, id="20MB-body"),
    pytest.param(lone_surrogate, id="lone-surrogate"),
    pytest.param(path_outside, id="register-/etc"),
    pytest.param(b_adapter_path, id="register-B-adapter-path"),
    pytest.param(disconnect, id="disconnect-mid-stream"),
]


def _billed(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stream's usage without the prefix cache's share of the prompt."""
    if usage is None:
        return None
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_b_streams_the_same_tokens_whatever_a_sends(
    served: Served, b_alone: list[Stream], hostile: Callable[[Ctx], Awaitable[None]]
) -> None:
    beside = await _b_beside(served, hostile)
    for index, (mine, ref) in enumerate(zip(beside, b_alone, strict=True)):
        where = f"B's stream {index} ({B_STREAMS[index][0]})"
        assert mine.done, f"{where} did not end with [DONE]"
        assert mine.deltas == ref.deltas, f"{where}: {''.join(mine.deltas)!r}"
        assert (mine.finish_reason, _billed(mine.usage)) == (
            ref.finish_reason,
            _billed(ref.usage),
        ), where
        # How much of the prompt the prefix cache served depends on what ran before (the
        # reference run filled it), never on A: only its bound is fixed.
        cached = (mine.usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)
        assert 0 <= cached < (mine.usage or {})["prompt_tokens"], where
