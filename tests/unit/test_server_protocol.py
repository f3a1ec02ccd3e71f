"""The server's OpenAI fidelity without a model: bodies refused or mapped field by field,
answers shaped as OpenAI's (n choices, logprobs, tool calls, fingerprint), over a backend
double that honours every sampling parameter, n and tools (ASGI in process)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

pytest.importorskip("starlette")

from lorapool import AdapterPool
from lorapool.sampling import SamplingParams
from lorapool.server import ApiKeys, create_app
from lorapool.testing import MockBackend
from lorapool.types import (
    Capabilities,
    Chunk,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
EVERYTHING = frozenset(SamplingParams.model_fields) | {f"structured.{k}" for k in KINDS}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
USER = [{"role": "user", "content": "hi"}]


@dataclasses.dataclass(eq=False)
class SamplingMock(MockBackend):
    """Honours everything: ``n`` samples ("a", "b" per sample), logprobs, tools (a call)."""

    seen: list[GenerationRequest] = dataclasses.field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, tools=True, sampling=EVERYTHING)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.seen.append(request)
        params = request.params
        n = params.n
        pieces = [CALL[:10], CALL[10:]] if request.tools else ["a", "b"]
        for i in range(n):
            for j, piece in enumerate(pieces):
                lp = TokenLogprob(
                    j,
                    piece,
                    -0.5,
                    tuple(TopLogprob(9, "z", -1.5) for _ in range(params.top_logprobs)),
                )
                last = j == len(pieces) - 1
                yield Chunk(
                    text=piece,
                    token_ids=(j,),
                    finish_reason="stop" if last else None,
                    usage=Usage(3, len(pieces) * n) if last and i == n - 1 else None,
                    index=i,
                    logprobs=(lp,) if params.logprobs else (),
                )


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, SamplingMock]]:
    backend = SamplingMock()
    pool = AdapterPool(backend)
    app = create_app(pool, auth=ApiKeys({"k": "t"}))
    async with pool:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer k"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as http:
            yield http, backend


async def _chat(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"model": "mock", "messages": USER, **body})


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize(
    ("field", "value"),
    [("frobnicate", 1), ("best_of", 2), ("use_beam_search", True), ("guided_regex", "a+")],
)
async def test_an_unknown_field_is_refused_by_name(
    client: tuple[httpx.AsyncClient, SamplingMock], field: str, value: object
) -> None:
    http, _ = client
    r = await _chat(http, **{field: value})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == f"Unrecognized request argument supplied: {field}"
    assert error["param"] == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", True),
        ("audio", {"voice": "x"}),
        ("metadata", {"a": "b"}),
        ("reasoning_effort", "high"),
        ("functions", [{"name": "f"}]),
        ("modalities", ["text", "audio"]),
    ],
)
async def test_a_field_that_cannot_be_honoured_is_refused_by_name(
    client: tuple[httpx.AsyncClient, SamplingMock], field: str, value: object
) -> None:
    http, _ = client
    r = await _chat(http, **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


async def test_defaults_the_official_client_may_send_are_accepted(
    client: tuple[httpx.AsyncClient, SamplingMock],
) -> None:
    http, _ = client
    r = await _chat(http, store=False, modalities=["text"], service_tier="auto", user="u")
    assert r.status_code == 200


async def test_fields_map_to_sampling_params(
    client: tuple[httpx.AsyncClient, SamplingMock],
) -> None:
    http, backend = client
    r = await _chat(
        http,
        max_tokens=50,
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop=["x"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100},
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=1,
        stop_token_ids=[7],
        ignore_eos=True,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    )
    assert r.status_code == 200, r.text
    params = backend.seen[-1].params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.5, 0.9, 3)
    assert params.stop == ("x",) and params.logit_bias == {42: -100.0}
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.1, 1.2)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.min_tokens == 1 and params.stop_token_ids == (7,) and params.ignore_eos
    assert params.structured is not None and params.structured.kind == "json_schema"
    r = await _chat(http, structured_outputs={"regex": "[ab]+"})
    assert backend.seen[-1].params.structured.kind == "regex"  # type: ignore[union-attr]
    r = await _chat(http, structured_outputs={"choice": ["yes", "no"]})
    assert backend.seen[-1].params.structured.choices == ("yes", "no")  # type: ignore[union-attr]
    r = await _chat(
        http, structured_outputs={"regex": "a"}, response_format={"type": "json_object"}
    )
    assert r.status_code == 400
    r = await _chat(http, logit_bias={"the": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


async def test_n_choices_logprobs_and_fingerprint(
    client: tuple[httpx.AsyncClient, SamplingMock],
) -> None:
    http, _ = client
    r = await _chat(http, n=2, logprobs=True, top_logprobs=2)
    body = r.json()
    assert body["system_fingerprint"].startswith("fp_")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["ab", "ab"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    content = body["choices"][1]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["a", "b"]
    assert content[0]["bytes"] == [97] and content[0]["logprob"] == -0.5
    assert content[0]["top_logprobs"] == [{"token": "z", "logprob": -1.5, "bytes": [122]}] * 2
    r = await _chat(http, top_logprobs=2)
    assert r.status_code == 400


async def test_streamed_n_choices_and_usage(
    client: tuple[httpx.AsyncClient, SamplingMock],
) -> None:
    http, _ = client
    r = await _chat(http, n=2, stream=True, stream_options={"include_usage": True})
    events = _events(r)
    assert all(e["system_fingerprint"].startswith("fp_") for e in events)
    assert all("usage" in e for e in events)
    opening = events[0]["choices"]
    assert [c["delta"]["role"] for c in opening] == ["assistant", "assistant"]
    text = {0: "", 1: ""}
    finishes = {}
    for e in events[1:-1]:
        for c in e["choices"]:
            text[c["index"]] += c["delta"].get("content", "")
            if c["finish_reason"]:
                finishes[c["index"]] = c["finish_reason"]
    assert text == {0: "ab", 1: "ab"} and finishes == {0: "stop", 1: "stop"}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 7


async def test_completions_legacy_logprobs(
    client: tuple[httpx.AsyncClient, SamplingMock],
) -> None:
    http, _ = client
    r = await http.post("/v1/completions", json={"model": "mock", "prompt": "hi", "logprobs": 1})
    choice = r.json()["choices"][0]
    assert choice["text"] == "ab"
    assert choice["logprobs"] == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"a": -0.5, "z": -1.5}, {"b": -0.5, "z": -1.5}],
        "text_offset": [0, 1],
    }
    r = await http.post("/v1/completions", json={"model": "mock", "prompt": "hi", "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


async def test_tool_calls_whole_and_streamed(
    client: tuple[httpx.AsyncClient, SamplingMock],
) -> None:
    http, backend = client
    r = await _chat(http, tools=[TOOL])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert backend.seen[-1].tools == (TOOL,)
    r = await _chat(http, tools=[TOOL], stream=True)
    deltas = [c["delta"] for e in _events(r) for c in e["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["function"]["name"] == "get_weather"
    assert all(not d.get("content") for d in deltas)  # the call's text is never shown
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = await _chat(http, tools=[TOOL], tool_choice=named, parallel_tool_calls=False)
    structured = backend.seen[-1].params.structured
    assert structured is not None and structured.kind == "json_schema"
    r = await _chat(http, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "x"}})
    assert r.status_code == 400 and "does not define" in r.json()["error"]["message"]


async def test_tool_messages_are_accepted_and_checked(
    client: tuple[httpx.AsyncClient, SamplingMock],
) -> None:
    http, backend = client
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{}"},
    }
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = await http.post("/v1/chat/completions", json={"model": "mock", "messages": history})
    assert r.status_code == 200, r.text
    prompt = backend.seen[-1].prompt
    assert prompt[1]["tool_calls"][0]["id"] == "call_1"  # type: ignore[index]
    assert prompt[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    bad = [*USER, {"role": "tool", "content": "sunny"}]
    r = await http.post("/v1/chat/completions", json={"model": "mock", "messages": bad})
    assert r.status_code == 400
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    r = await http.post("/v1/chat/completions", json={"model": "mock", "messages": image})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


async def test_a_parameter_the_backend_cannot_honour_is_a_400_naming_it() -> None:
    pool = AdapterPool(MockBackend())  # the basic parameters only, no tools
    app = create_app(pool, auth=ApiKeys({"k": "t"}))
    async with pool:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer k"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as http:
            r = await _chat(http, top_k=3)
            assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
            r = await _chat(http, response_format={"type": "json_object"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
            r = await _chat(http, tools=[TOOL])
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
            assert "MockBackend" in r.json()["error"]["message"]
