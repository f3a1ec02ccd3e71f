"""OpenAIServerBackend's translation, replayed against recorded real vLLM 0.32 responses
(tests/fixtures/vllm-0.32-cpu/README.md says how they were recorded)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from lorapool.backends._http import error_message
from lorapool.backends.openai import OpenAIServerBackend, ServerError, parse_sse_line
from lorapool.errors import (
    BackendClosed,
    BackendError,
    BackendNotStarted,
    BackendServerError,
    InvalidRequest,
    LoadError,
)
from lorapool.types import GenerationRequest, LoadedAdapter, LoraConfig, SamplingParams

FIXTURES = Path(__file__).parent.parent / "fixtures" / "vllm-0.32-cpu"
MODELS = (FIXTURES / "models_after_load.txt").read_text().split("\n\n", 1)[1]


def recorded(name: str) -> httpx.Response:
    head, _, body = (FIXTURES / name).read_text().partition("\n\n")
    status = int(next(line for line in head.splitlines() if line.startswith("STATUS:")).split()[1])
    ctype = next(line for line in head.splitlines() if line.startswith("CONTENT-TYPE:"))
    headers = {} if ctype.endswith("None") else {"content-type": ctype.split(": ", 1)[1]}
    return httpx.Response(status, content=body.encode(), headers=headers)


Route = str | Callable[[httpx.Request], httpx.Response]


def backend(
    routes: dict[str, Route], seen: list[httpx.Request] | None = None
) -> OpenAIServerBackend:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, content=MODELS.encode())
        route = routes[request.url.path]
        return recorded(route) if isinstance(route, str) else route(request)

    return OpenAIServerBackend(
        "http://vllm.test", transport=httpx.MockTransport(handler), retries=1, retry_backoff=0
    )


def adapter(tmp: Path) -> LoadedAdapter:
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj",))
    return LoadedAdapter("r16-all", cfg, b"weights", "ab" * 32)


async def test_start_finds_the_base_model_among_the_listed_models() -> None:
    b = backend({})
    await b.start()
    assert b.capabilities.base_model == "smollm2-base"  # the listed model without a parent
    await b.aclose()


async def test_streamed_completion_becomes_chunks_with_usage_on_the_last(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    b = backend(
        {
            "/v1/load_lora_adapter": "load_ok_r8.txt",
            "/v1/completions": "completions_stream_lora_usage.txt",
            "/v1/unload_lora_adapter": "unload_ok.txt",
        },
        seen,
    )
    await b.start()
    await b.load(adapter(tmp_path), 0)
    load = json.loads(seen[-1].content)
    assert load["lora_name"] == "r16-all" and load["lora_path"].endswith("ab" * 32)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    chunks = [
        c async for c in b.generate(GenerationRequest("r1", "The capital", params, "r16-all", 0))
    ]
    body = json.loads(seen[-1].content)
    assert body["model"] == "r16-all" and body["stream"] and body["return_token_ids"]
    assert body["stream_options"] == {"include_usage": True}
    assert "".join(c.text for c in chunks) == " Paris. This is a common convention in"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    await b.aclose()
    assert seen[-1].url.path == "/v1/unload_lora_adapter"  # close unloads what it loaded


async def test_chat_stream_reads_delta_content() -> None:
    b = backend({"/v1/chat/completions": "chat_stream_lora.txt"})
    await b.start()
    messages = [{"role": "user", "content": "Say hi"}]
    chunks = [
        c
        async for c in b.generate(
            GenerationRequest("r", messages, SamplingParams(max_tokens=16), None)
        )
    ]
    assert "".join(c.text for c in chunks).strip()
    assert chunks[-1].finish_reason in ("stop", "length")
    await b.aclose()


async def test_server_errors_map_to_typed_errors(tmp_path: Path) -> None:
    b = backend({"/v1/load_lora_adapter": "load_rank_too_big.txt"})
    await b.start()
    with pytest.raises(LoadError, match="greater than max_lora_rank"):
        await b.load(adapter(tmp_path), 0)
    await b.aclose()

    b = backend({"/v1/completions": "completions_too_long.txt"})
    await b.start()
    with pytest.raises(InvalidRequest, match="maximum context length"):
        async for _ in b.generate(GenerationRequest("r", "x", SamplingParams(), None)):
            pass
    await b.aclose()

    b = backend({"/v1/completions": "completions_unknown_model.txt"})
    await b.start()
    with pytest.raises(ServerError) as err:
        async for _ in b.generate(GenerationRequest("r", "x", SamplingParams(), None)):
            pass
    assert err.value.status == 404 and "does not exist" in err.value.server_message
    await b.aclose()


async def test_unloading_what_the_server_forgot_is_not_an_error(tmp_path: Path) -> None:
    b = backend(
        {"/v1/load_lora_adapter": "load_ok_r8.txt", "/v1/unload_lora_adapter": "unload_unknown.txt"}
    )
    await b.start()
    await b.load(adapter(tmp_path), 0)
    await b.unload("r16-all")  # 404: already gone (e.g. the server restarted)
    await b.aclose()


async def test_lifecycle_misuse_is_a_typed_error() -> None:
    b = backend({"/v1/completions": "completions_stream_lora_usage.txt"})
    with pytest.raises(BackendNotStarted, match="OpenAIServerBackend is not started"):
        b.capabilities  # noqa: B018
    with pytest.raises(BackendNotStarted):
        await anext(b.generate(GenerationRequest("r", "x", SamplingParams(), None)))
    await b.start()
    caps = b.capabilities
    await b.start()  # idempotent: the server is not asked again, the same capabilities
    assert b.capabilities is caps
    await b.aclose()
    await b.aclose()  # idempotent
    assert not await b.health()
    with pytest.raises(BackendClosed, match="create a new one"):
        await b.start()
    with pytest.raises(BackendClosed):
        await anext(b.generate(GenerationRequest("r", "x", SamplingParams(), None)))
    assert isinstance(BackendClosed("x"), RuntimeError)  # what the old bare errors were


async def test_transient_statuses_are_retried_then_keep_their_status() -> None:
    calls: list[int] = []

    def busy(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503, json={"error": {"message": "try later"}})
        return recorded("completions_stream_lora_usage.txt")

    b = backend({"/v1/completions": busy})  # retries=1
    await b.start()
    params = SamplingParams(max_tokens=8, temperature=0.0)
    chunks = [c async for c in b.generate(GenerationRequest("r", "The capital", params, None))]
    assert len(calls) == 2 and chunks[-1].usage is not None
    always = backend({"/v1/completions": lambda r: httpx.Response(503, text="down")})
    await always.start()
    with pytest.raises(BackendServerError) as err:
        await anext(always.generate(GenerationRequest("r", "x", params, None)))
    assert err.value.status == 503 and err.value.server_message == "down"
    await always.aclose()
    await b.aclose()


async def test_a_stream_cut_after_its_first_token_is_not_sent_again() -> None:
    calls: list[int] = []

    def cut(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        events = recorded("completions_stream_lora_usage.txt").text.split("\n\n")
        first_two = "\n\n".join(events[:2]) + "\n\n"  # a chunk is sent when the next arrives

        async def body() -> AsyncIterator[bytes]:
            yield first_two.encode()
            raise httpx.RemoteProtocolError("peer closed connection", request=request)

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    b = backend({"/v1/completions": cut})
    await b.start()
    stream = b.generate(GenerationRequest("r", "x", SamplingParams(max_tokens=8), None))
    received = []
    with pytest.raises(BackendError, match="peer closed connection"):
        async for chunk in stream:
            received.append(chunk)
    # A token already went to the caller: sending the request again would repeat it.
    assert len(received) == 1 and len(calls) == 1
    await b.aclose()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": {"message": "rank too big", "type": "BadRequestError"}}, "rank too big"),
        ({"object": "error", "message": "no such model"}, "no such model"),
        ({"error": "Input validation error", "error_type": "validation"}, "Input validation error"),
        ({"detail": "odd"}, '{"detail": "odd"}'),
    ],
)
def test_error_bodies_of_openai_vllm_and_tgi(body: object, message: str) -> None:
    assert error_message(httpx.Response(400, json=body)) == message
    assert error_message(httpx.Response(500, text=" plain text \n")) == "plain text"


def test_server_error_is_the_typed_backend_server_error() -> None:
    assert ServerError is BackendServerError


def test_sse_lines() -> None:
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line('data: {"choices": []}') == {"choices": []}


async def test_missing_engine_package_names_the_extra() -> None:
    pytest.importorskip("torch")  # the main venv; the vLLM venv has vllm and skips this
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here")
    from lorapool.backends.vllm import VLLMBackend
    from lorapool.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"pip install 'lorapool\[vllm\]'"):
        await VLLMBackend("any-model").start()
