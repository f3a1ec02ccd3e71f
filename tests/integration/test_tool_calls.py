"""Tool calls through the example server with the official ``openai`` client: uvicorn on
127.0.0.1 over TorchBackend with the real model (SmolLM2, whose chat template knows no
tools: lorapool renders them). A required or named call's arguments always validate
against the function's schema; ``auto`` without tools is text; a ``tool`` message carries
the conversation on; the same through ``AdapterPool.complete``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_asyncio

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # hang guards, not speed

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool, SamplingParams  # noqa: E402
from lorapool.server import ApiKeys, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

KEY = "key-acme"
TIMEOUT = 1800.0
"""A request's hang guard, never a speed requirement (2 busy cores run this)."""
MAX_TOKENS = 160
"""Room for a whole call: a call cut short would be text, and the test would say so."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two whole numbers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 1000},
                "b": {"type": "integer", "minimum": 0, "maximum": 1000},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}},
            "required": ["order_id"],
        },
    },
}
TOOLS = [WEATHER, ADD, LOOKUP]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}  # type: ignore[index]
ASKS = [
    "What is the weather in Paris?",
    "What is 12 plus 30?",
    "Where is my order AB1234?",
]


@dataclass
class Server:
    url: str
    model: str
    pool: AdapterPool

    def client(self) -> Any:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT
        )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_dir: Path) -> AsyncIterator[Server]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=8, max_seq_len=1024)
    pool = AdapterPool(backend)
    app = create_app(pool, auth=ApiKeys({KEY: "acme"}), shutdown_timeout=5)
    async with serve_app(app) as running:
        yield Server(running.url, backend.capabilities.base_model, pool)


def _check_calls(choice: Any, names: set[str]) -> list[Any]:
    """The choice's calls, each of a named function with arguments valid for its schema."""
    assert choice.finish_reason == "tool_calls", choice.message.content
    calls = choice.message.tool_calls
    assert calls, choice.message
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return list(calls)


async def test_a_required_call_always_validates(server: Server) -> None:
    client = server.client()
    for i, ask in enumerate(ASKS):
        r = await client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": ask}],
            tools=TOOLS,
            tool_choice="required",
            temperature=0.9,
            seed=i,
            max_completion_tokens=MAX_TOKENS,
        )
        _check_calls(r.choices[0], set(SCHEMAS))


async def test_a_named_call_always_validates(server: Server) -> None:
    client = server.client()
    for i, tool in enumerate(TOOLS):
        name = tool["function"]["name"]  # type: ignore[index]
        parallel = i == 1  # one call, or an array of one or more
        r = await client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": ASKS[i]}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": name}},
            parallel_tool_calls=parallel,
            temperature=0.9,
            seed=3 + i,
            max_completion_tokens=MAX_TOKENS,
        )
        calls = _check_calls(r.choices[0], {name})
        if not parallel:
            assert len(calls) == 1
        assert r.choices[0].message.content is None


async def test_a_named_call_streams_as_one_whole_call(server: Server) -> None:
    client = server.client()
    stream = await client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": ASKS[1]}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False,
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    deltas = [ch.delta for c in chunks for ch in c.choices]
    assert not "".join(d.content or "" for d in deltas)  # the call is never shown as text
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "add"
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["add"])
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["tool_calls"] and chunks[-1].usage is not None


async def test_auto_without_tools_is_text(server: Server) -> None:
    client = server.client()
    r = await client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": ASKS[0]}],
        tool_choice="auto",
        temperature=0,
        max_completion_tokens=24,
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)


async def test_auto_with_tools_answers_text_or_valid_calls(server: Server) -> None:
    client = server.client()
    r = await client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": ASKS[0]}],
        tools=TOOLS,
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
    )
    choice = r.choices[0]
    if choice.message.tool_calls:
        _check_calls(choice, set(SCHEMAS))  # parsed calls name defined functions, valid JSON
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


async def test_a_tool_message_carries_the_conversation_on(server: Server) -> None:
    client = server.client()
    ask = [{"role": "user", "content": ASKS[0]}]
    first = await client.chat.completions.create(
        model=server.model,
        messages=ask,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
    )
    (call,) = _check_calls(first.choices[0], {"get_weather"})
    follow_up = [
        *ask,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    second = await client.chat.completions.create(
        model=server.model,
        messages=follow_up,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_completion_tokens=32,
    )
    choice = second.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None and choice.message.content
    # Without tools (tool_choice none), the history alone is the prompt: the call and its
    # result are rendered into it.
    again = await client.chat.completions.create(
        model=server.model,
        messages=follow_up,
        temperature=0,
        max_completion_tokens=32,
    )
    bare = await client.chat.completions.create(
        model=server.model, messages=ask, temperature=0, max_completion_tokens=1
    )
    assert again.usage.prompt_tokens > bare.usage.prompt_tokens + 10
    assert again.choices[0].message.content


async def test_pool_complete_fills_tool_calls(server: Server) -> None:
    done = await server.pool.complete(
        [{"role": "user", "content": ASKS[1]}],
        tenant="acme",
        params=SamplingParams(max_tokens=160, temperature=0),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert done.finish_reason == "tool_calls" and done.text == ""
    (call,) = done.tool_calls
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert done.usage.completion_tokens == len(done.token_ids)
