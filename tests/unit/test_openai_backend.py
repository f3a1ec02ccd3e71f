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
from lorapool.types import (
    Chunk,
    GenerationRequest,
    LoadedAdapter,
    LoraConfig,
    SamplingParams,
    Usage,
)

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
    # The server knows the adapter by its id and content hash (issue 28).
    assert load["lora_name"] == "r16-all#" + "ab" * 8 and load["lora_path"].endswith("ab" * 32)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    chunks = [
        c async for c in b.generate(GenerationRequest("r1", "The capital", params, "r16-all", 0))
    ]
    body = json.loads(seen[-1].content)
    assert body["model"] == "r16-all#" + "ab" * 8 and body["stream"] and body["return_token_ids"]
    assert body["stream_options"] == {"include_usage": True}
    assert "".join(c.text for c in chunks) == " Paris. This is a common convention in"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    await b.aclose()
    assert seen[-1].url.path == "/v1/unload_lora_adapter"  # close unloads what it loaded


async def test_a_request_s_cache_scope_is_sent_as_vllm_s_cache_salt() -> None:
    """vLLM keeps each tenant's prefix blocks apart by ``cache_salt`` (issue 28)."""
    seen: list[httpx.Request] = []
    b = backend({"/v1/chat/completions": "chat_stream_lora.txt"}, seen)
    await b.start()
    messages = [{"role": "user", "content": "Say hi"}]
    params = SamplingParams(max_tokens=16)
    scoped = GenerationRequest("r", messages, params, None, cache_scope="0f" * 16)
    _ = [c async for c in b.generate(scoped)]
    assert json.loads(seen[-1].content)["cache_salt"] == "0f" * 16
    _ = [c async for c in b.generate(GenerationRequest("r2", messages, params, None))]
    assert "cache_salt" not in json.loads(seen[-1].content)
    await b.aclose()


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


# -- the sampling set (issue 26) ------------------------------------------------------


def sse(*events: dict[str, object]) -> httpx.Response:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})


def speller(model_dir: Path) -> Path:
    """A directory with a tokenizer.json whose tokens are 'a'..'e' (ids 0..4)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {c: i for i, c in enumerate("abcde")}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    tok.save(str(model_dir / "tokenizer.json"))
    return model_dir


def test_request_body_sends_what_a_request_sets_in_each_flavors_fields() -> None:
    from lorapool.backends.openai import request_body
    from lorapool.types import StructuredOutput

    params = SamplingParams(
        max_tokens=9,
        top_k=3,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={7: -100.0},
        stop_token_ids=[4],
        min_tokens=2,
        n=2,
        logprobs=True,
        top_logprobs=3,
        structured=StructuredOutput.json_schema({"type": "object"}),
    )
    body = request_body(params, "vllm", chat=False)
    assert {k: body[k] for k in ("top_k", "min_p", "repetition_penalty", "min_tokens", "n")} == {
        "top_k": 3,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "min_tokens": 2,
        "n": 2,
    }
    assert body["logit_bias"] == {"7": -100.0} and body["stop_token_ids"] == [4]
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.5
    assert body["logprobs"] == 3 and body["return_tokens_as_token_ids"] is True
    assert body["structured_outputs"] == {
        "json": {"type": "object"},
    }
    chat = request_body(params, "vllm", chat=True)
    assert chat["logprobs"] is True and chat["top_logprobs"] == 3
    sglang = request_body(params, "sglang", chat=True)
    assert sglang["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object"}},
    }
    choice = SamplingParams(structured=StructuredOutput.choice(["a.b", "c"]))
    assert request_body(choice, "sglang", chat=False)["regex"] == r"(a\.b|c)"
    assert request_body(choice, "vllm", chat=False)["structured_outputs"] == {
        "choice": ["a.b", "c"]
    }
    plain = request_body(SamplingParams(max_tokens=4), "vllm", chat=False)
    assert set(plain) == {
        "max_tokens",
        "temperature",
        "top_p",
        "stream",
        "stream_options",
        "return_token_ids",
    }


async def test_n_samples_logprobs_and_a_stop_token_from_a_completions_stream(
    tmp_path: Path,
) -> None:
    """Two samples interleaved, log-probabilities as token_id:N (spelled with the local
    tokenizer), sample 1 ended by a stop token (not returned, counted), usage last."""

    def lp(ids: list[int], tops: list[dict[int, float]]) -> dict[str, object]:
        return {
            "tokens": [f"token_id:{i}" for i in ids],
            "token_logprobs": [tops[k][i] for k, i in enumerate(ids)],
            "top_logprobs": [{f"token_id:{t}": v for t, v in top.items()} for top in tops],
        }

    def choice(
        index: int, text: str, ids: list[int], tops: list[dict[int, float]], **kw: object
    ) -> dict[str, object]:
        return {"index": index, "text": text, "token_ids": ids, "logprobs": lp(ids, tops), **kw}

    events = [
        {"choices": [choice(0, "a", [0], [{0: -0.1, 1: -2.0, 2: -3.0}])]},
        {"choices": [choice(1, "b", [1], [{1: -0.5, 0: -1.0}])]},
        {"choices": [choice(0, "c", [2], [{2: -0.2, 3: -1.5}], finish_reason="length")]},
        {
            "choices": [
                choice(1, "e", [4], [{4: -0.3, 1: -0.9}], finish_reason="stop", stop_reason=4)
            ]
        },
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}},
    ]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, content=MODELS.encode())
        return sse(*events)

    b = OpenAIServerBackend(
        "http://vllm.test",
        model_path=speller(tmp_path),
        transport=httpx.MockTransport(handler),
        retries=0,
    )
    await b.start()
    assert {"logprobs", "top_logprobs", "n", "structured.grammar"} <= b.capabilities.sampling
    params = SamplingParams(
        max_tokens=2, n=2, logprobs=True, top_logprobs=1, stop_token_ids=[4], temperature=0.0
    )
    chunks = [c async for c in b.generate(GenerationRequest("r", "x", params, None))]
    await b.aclose()
    by_index = {i: [c for c in chunks if c.index == i] for i in (0, 1)}
    assert [c.token_ids for c in by_index[0]] == [(0,), (2,)]
    assert [c.token_ids for c in by_index[1]] == [(1,)]  # the stop token is not returned
    assert "".join(c.text for c in by_index[1]) == "b"
    assert by_index[0][-1].finish_reason == "length" and by_index[1][-1].finish_reason == "stop"
    assert [c.finish_reason for c in chunks].count(None) == len(chunks) - 2
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    first = by_index[0][0].logprobs
    assert len(first) == 1 and first[0].token_id == 0 and first[0].token == "a"
    assert first[0].logprob == -0.1 and [(t.token_id, t.token) for t in first[0].top] == [(0, "a")]
    assert [e.token_id for e in by_index[1][-1].logprobs] == [1]
    body = json.loads(seen[-1].content)
    assert body["n"] == 2 and body["return_tokens_as_token_ids"] is True


async def test_what_the_server_backend_does_not_serve_is_refused_before_a_request(
    tmp_path: Path,
) -> None:
    """No local tokenizer: log-probabilities are not served; a narrowed backend refuses
    the rest too; nothing is sent for a refused request."""
    from lorapool.errors import UnsupportedParameter

    seen: list[httpx.Request] = []
    b = backend({}, seen)
    await b.start()
    assert "logprobs" not in b.capabilities.sampling and "top_k" in b.capabilities.sampling
    with pytest.raises(UnsupportedParameter) as err:
        await anext(b.generate(GenerationRequest("r", "x", SamplingParams(logprobs=True), None)))
    assert err.value.backend == "OpenAIServerBackend" and err.value.parameters == ["logprobs"]
    await b.aclose()
    narrow = OpenAIServerBackend(
        "http://vllm.test",
        sampling={"max_tokens", "temperature"},
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=MODELS.encode())),
    )
    await narrow.start()
    with pytest.raises(UnsupportedParameter, match="top_k"):
        await anext(narrow.generate(GenerationRequest("r", "x", SamplingParams(top_k=2), None)))
    await narrow.aclose()
    assert [r.url.path for r in seen] == ["/v1/models"]
    with pytest.raises(ValueError, match="cannot send"):
        OpenAIServerBackend("http://vllm.test", sampling={"beam_width"})
    sglang = OpenAIServerBackend(
        "http://sglang.test",
        flavor="sglang",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=MODELS.encode())),
    )
    await sglang.start()
    assert "structured.grammar" not in sglang.capabilities.sampling
    assert "structured.regex" in sglang.capabilities.sampling
    await sglang.aclose()


# -- adapters named by content (issue 28) -------------------------------------------


class FakeVLLM:
    """A vLLM OpenAI server's LoRA routes and completions, by lora name, with vLLM 0.32's
    messages: it holds what was loaded, answers a completion for a name it does not hold
    with 404, and echoes the name it served as the events' ``model``."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}  # lora_name -> lora_path
        self.log: list[tuple[str, str]] = []  # (route, lora_name or model)
        self.refuse: str | None = None  # a completion refused with 400, naming the model

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, content=MODELS.encode())
        body = json.loads(request.content)
        if request.url.path == "/v1/load_lora_adapter":
            self.log.append(("load", body["lora_name"]))
            self.held[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}' added")
        if request.url.path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            self.log.append(("unload", name))
            if self.held.pop(name, None) is None:
                message = f"The lora adapter '{name}' cannot be found."
                return httpx.Response(404, json={"error": {"message": message, "code": 404}})
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' removed")
        model = body["model"]
        self.log.append(("generate", model))
        if model not in self.held:
            message = f"The model `{model}` does not exist. Valid aliases: {sorted(self.held)}."
            return httpx.Response(404, json={"error": {"message": message, "code": 404}})
        if self.refuse is not None:
            message = f"{self.refuse} (model `{model}`)"
            return httpx.Response(400, json={"error": {"message": message, "code": 400}})
        event = {
            "model": model,
            "choices": [{"index": 0, "text": " hi", "token_ids": [7], "finish_reason": "length"}],
        }
        details = {"cached_tokens": 2}  # vLLM's prefix-cache hits
        counts = {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": details}
        return sse(event, {"model": model, "choices": [], "usage": counts})


def version(adapter_id: str, sha256: str) -> LoadedAdapter:
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj",))
    return LoadedAdapter(adapter_id, cfg, b"weights of " + sha256.encode(), sha256)


async def test_the_server_knows_adapters_by_content_and_callers_only_by_id() -> None:
    """The server is asked to load ``acme/x#<sha256[:16]>``, generates under that name and
    unloads it; a re-registered ``acme/x`` (other weights) is another name, loaded before
    the old one is unloaded; chunks, errors and load failures say ``acme/x``, never the
    name with the hash (another version's, or this one's)."""
    from lorapool.backends.vllm import engine_lora_name

    server = FakeVLLM()
    b = OpenAIServerBackend(
        "http://vllm.test", transport=httpx.MockTransport(server), retries=0, retry_backoff=0
    )
    await b.start()
    old, new = "a" * 64, "b" * 64
    old_name, new_name = engine_lora_name("acme/x", old), engine_lora_name("acme/x", new)
    assert (old_name, new_name) == ("acme/x#" + "a" * 16, "acme/x#" + "b" * 16)

    async def run(rid: str) -> list[Chunk]:
        request = GenerationRequest(rid, "hello", SamplingParams(max_tokens=1), "acme/x")
        return [c async for c in b.generate(request)]

    await b.load(version("acme/x", old), 0)
    assert server.log == [("load", old_name)] and server.held[old_name].endswith(old)
    chunks = await run("r1")
    assert server.log[-1] == ("generate", old_name)  # the content name, not "acme/x"
    assert [c.adapter_id for c in chunks] == ["acme/x"] and chunks[-1].text == " hi"
    assert chunks[-1].usage == Usage(3, 1, cached_tokens=2)

    await b.load(version("acme/x", new), 1)  # re-registered: new weights, the same id
    assert server.log[-2:] == [("load", new_name), ("unload", old_name)]
    assert list(server.held) == [new_name]
    await run("r2")
    assert server.log[-1] == ("generate", new_name)

    server.refuse = "this prompt is refused"
    with pytest.raises(InvalidRequest) as refused:
        await run("r3")
    assert "acme/x" in str(refused.value) and "#" not in str(refused.value)
    server.refuse = None

    server.held.clear()  # the server restarted: a 404 for the name, loaded again, served
    assert [c.text for c in await run("r4")] == [" hi"] and b.reloads == 1
    assert server.log[-3:] == [("generate", new_name), ("load", new_name), ("generate", new_name)]

    def refuse_load(request: httpx.Request) -> httpx.Response:
        name = json.loads(request.content)["lora_name"]
        message = f"The lora adapter '{name}' has already been loaded."
        return httpx.Response(400, json={"error": {"message": message, "code": 400}})

    failing = OpenAIServerBackend(
        "http://vllm.test",
        transport=httpx.MockTransport(
            lambda r: refuse_load(r) if r.url.path.endswith("load_lora_adapter") else server(r)
        ),
        retries=0,
    )
    await failing.start()
    with pytest.raises(LoadError) as load_error:
        await failing.load(version("acme/y", old), 0)
    assert "'acme/y'" in str(load_error.value) and "#" not in str(load_error.value)
    await failing.aclose()

    await b.unload("acme/x")
    assert server.log[-1] == ("unload", new_name) and server.held == {}
    await b.aclose()
