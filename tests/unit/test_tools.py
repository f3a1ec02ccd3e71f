"""lorapool.tools: definitions, tool_choice, schemas, rendering and parsing (no model)."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from lorapool import AdapterPool
from lorapool.backends.base import BaseBackend, chat_messages, prompt_chars
from lorapool.errors import InvalidRequest, UnsupportedParameter
from lorapool.sampling import BASIC_PARAMETERS, SamplingParams, StructuredOutput
from lorapool.testing import MockBackend
from lorapool.tools import (
    MAX_TOOLS,
    ToolPrompt,
    prompt_tools,
    render_messages,
    template_renders_tools,
    tool_request,
)
from lorapool.types import Capabilities, Chunk, GenerationRequest, LoadedAdapter

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _parse(request: Any, pieces: list[str]) -> tuple[str, Any]:
    parser = request.parser()
    shown = "".join(parser.feed(p) for p in pieces)
    rest, calls = parser.finish()
    return shown + rest, calls


# -- definitions and tool_choice -------------------------------------------------------------


def test_definitions_are_validated() -> None:
    request = tool_request([WEATHER, TIME])
    assert request is not None
    assert [t.name for t in request.tools] == ["get_weather", "get_time"]
    assert request.tools[1].parameters == {"type": "object", "properties": {}}
    assert request.choice == "auto" and request.parallel


@pytest.mark.parametrize(
    ("tool", "says"),
    [
        ({"type": "function"}, "tools[0].function"),
        ({"type": "retrieval", "function": {"name": "x"}}, "tools[0] must be"),
        ({"type": "function", "function": {"name": "has space"}}, "function.name"),
        ({"type": "function", "function": {"name": "x" * 65}}, "function.name"),
        ({"type": "function", "function": {"name": "f", "parameters": []}}, "parameters"),
        (
            {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}},
            "object",
        ),
        ({"type": "function", "function": {"name": "f", "description": 3}}, "description"),
    ],
)
def test_malformed_definitions_are_refused(tool: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest, match=says.replace("[", r"\[").replace("]", r"\]")):
        tool_request([tool])


def test_caps_on_count_size_and_names() -> None:
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]
    with pytest.raises(InvalidRequest, match="at most"):
        tool_request(many)
    huge = {
        "type": "function",
        "function": {"name": "f", "description": "x" * 70_000},
    }
    with pytest.raises(InvalidRequest, match="characters"):
        tool_request([huge])
    with pytest.raises(InvalidRequest, match="same name"):
        tool_request([TIME, TIME])


def test_tool_choice() -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    request = tool_request([WEATHER, TIME], named, parallel_tool_calls=False)
    assert request is not None
    assert (request.choice, request.function, request.parallel) == ("function", "get_time", False)
    with pytest.raises(InvalidRequest, match="does not define"):
        tool_request([WEATHER], named)
    with pytest.raises(InvalidRequest, match="needs tools"):
        tool_request([], "required")
    with pytest.raises(InvalidRequest, match="tool_choice must be"):
        tool_request([WEATHER], "sometimes")
    assert tool_request(None, "auto") is None  # no tools: text
    assert tool_request([], "none") is None
    none = tool_request([WEATHER], "none")
    assert none is not None and none.rendered == () and not none.calls


# -- the constraint ----------------------------------------------------------------------------


def test_named_constraint_is_the_function_call() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    request = tool_request([WEATHER, TIME], named, parallel_tool_calls=False)
    assert request is not None
    constraint = request.constraint()
    assert constraint is not None and constraint.kind == "json_schema"
    schema = constraint.schema_dict
    assert schema is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    for wrong in (
        {"name": "get_time", "arguments": {}},
        {"name": "get_weather", "arguments": {"days": 2}},
        {"name": "get_weather"},
        {"name": "get_weather", "arguments": {"city": "Oslo", "made_up": 1}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_required_constraint_is_any_tool_and_parallel_an_array() -> None:
    request = tool_request([WEATHER, TIME], "required")
    assert request is not None and request.forced
    schema = request.constraint().schema_dict  # type: ignore[union-attr]
    assert schema is not None and schema["type"] == "array" and schema["minItems"] == 1
    jsonschema.validate(
        [
            {"name": "get_time", "arguments": {}},
            {"name": "get_weather", "arguments": {"city": "x"}},
        ],
        schema,
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    auto = tool_request([WEATHER])
    assert auto is not None and auto.constraint() is None
    free = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    forced = tool_request([free], "required", parallel_tool_calls=False)
    schema = forced.constraint().schema_dict  # type: ignore[union-attr]
    assert schema is not None and "additionalProperties" not in schema["properties"]["arguments"]
    jsonschema.validate({"name": "f", "arguments": {"anything": 1}}, schema)


# -- rendering ---------------------------------------------------------------------------------


SMOL = "{% for message in messages %}{{ message['role'] + message['content'] }}{% endfor %}"
QWEN_LIKE = "{% if tools %}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"


def test_template_detection() -> None:
    assert not template_renders_tools(SMOL)
    assert template_renders_tools(QWEN_LIKE)
    assert template_renders_tools({"default": SMOL, "tool_use": QWEN_LIKE})
    assert not template_renders_tools(None)


def test_render_tools_into_the_system_message() -> None:
    tools = [WEATHER]
    fresh = render_messages([{"role": "user", "content": "hi"}], tools)
    assert fresh[0]["role"] == "system"
    assert "<tools>" in fresh[0]["content"] and '"get_weather"' in fresh[0]["content"]
    assert "<tool_call>" in fresh[0]["content"]
    assert fresh[1] == {"role": "user", "content": "hi"}
    kept = render_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tools
    )
    assert len(kept) == 2 and kept[0]["content"].startswith("Be brief.\n\n# Tools")
    plain = [{"role": "user", "content": "hi", "name": "bob"}]
    assert render_messages(plain, []) == plain


def test_render_calls_and_tool_results() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    ]
    assert chat_messages(messages)[1]["content"] is None
    rendered = render_messages(messages, [])
    call = rendered[1]
    assert call["role"] == "assistant" and "tool_calls" not in call
    assert call["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    assert rendered[2]["role"] == "tool" and rendered[2]["content"] == "12 C"


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ({"role": "user", "content": None}, "string 'role' and 'content'"),
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        ({"role": "user", "content": None, "tool_calls": [{"function": {}}]}, "only 'assistant'"),
        ({"role": "assistant", "content": None, "tool_calls": []}, "non-empty"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, r"tool_calls\[0\]"),
    ],
)
def test_malformed_messages_are_refused(message: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        chat_messages([message])


def test_tool_prompt_carries_tools_and_counts_them() -> None:
    messages = [{"role": "user", "content": "hi"}]
    prompt = ToolPrompt(messages, [WEATHER])
    assert list(prompt) == messages and prompt_tools(prompt) == (WEATHER,)
    assert prompt_tools(messages) == ()
    assert prompt_chars(prompt) == 2 + len(json.dumps(WEATHER))
    again = pickle.loads(pickle.dumps(prompt))
    assert isinstance(again, ToolPrompt) and again.tools == (WEATHER,) and list(again) == messages


class _Tokenizer:
    """Records what the chat template was given."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> list[int]:
        self.calls.append((messages, kwargs))
        return [1, 2, 3]


class _Backend(BaseBackend):
    """A backend with only a tokenizer: what BaseBackend.encode does with tools."""

    def __init__(self, tok: object) -> None:
        super().__init__()
        self.tok = tok

    async def _start(self) -> Capabilities:
        self._tokenizer = self.tok
        return Capabilities(1, 8, 1, "base", frozenset({"q_proj"}))

    async def _aclose(self) -> None:
        return None

    async def health(self) -> bool:
        return True

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        return adapter

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        return None

    async def unload(self, adapter_id: str) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        yield Chunk("", ())


def _encode(template: str, prompt: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    tok = _Tokenizer(template)
    backend = _Backend(tok)
    backend._tokenizer = tok
    assert backend.encode(prompt) == [1, 2, 3]
    return tok.calls[0]


async def test_a_backend_encoding_chat_prompts_here_renders_tools() -> None:
    backend = _Backend(_Tokenizer(SMOL))
    await backend.start()
    assert backend.capabilities.tools
    remote = _Backend(None)
    await remote.start()
    assert not remote.capabilities.tools


def test_encode_renders_tools_itself_for_a_template_without_them() -> None:
    messages, kwargs = _encode(SMOL, ToolPrompt([{"role": "user", "content": "hi"}], [WEATHER]))
    assert "tools" not in kwargs
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]


def test_encode_hands_tools_to_a_template_with_them() -> None:
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    prompt = ToolPrompt(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "sunny"},
        ],
        [WEATHER],
    )
    messages, kwargs = _encode(QWEN_LIKE, prompt)
    assert kwargs["tools"] == [WEATHER]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[1]["content"] == ""


# -- parsing -----------------------------------------------------------------------------------


def test_auto_parses_tagged_calls_streamed_in_pieces() -> None:
    request = tool_request([WEATHER, TIME])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    parser = request.parser()  # type: ignore[union-attr]
    assert all(parser.feed(p) == "" for p in pieces)  # nothing shown while it may be a call
    rest, calls = parser.finish()
    assert rest == "" and len(calls) == 1
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert calls[0].id.startswith("call_") and len(calls[0].id) > 10


def test_auto_parses_a_bare_json_call_and_several_tags() -> None:
    request = tool_request([WEATHER, TIME])
    _, calls = _parse(request, ['{"name": "get_time", "parameters": {}}'])
    assert [c.name for c in calls] == ["get_time"] and calls[0].arguments == "{}"
    two = (
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"x\\"}"}</tool_call>'
    )
    _, calls = _parse(request, [two])
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "x"}
    single = tool_request([WEATHER, TIME], parallel_tool_calls=False)
    _, calls = _parse(single, [two])
    assert [c.name for c in calls] == ["get_time"]


@pytest.mark.parametrize(
    "text",
    [
        "Hello there, no call.",
        '{"answer": 42}',
        '{"name": "undefined_tool", "arguments": {}}',
        '{"name": "get_time", "arguments": [1]}',
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> and then text',
        "a < b, and <tool_ca is not a tag",
    ],
)
def test_auto_anything_else_is_text(text: str) -> None:
    request = tool_request([WEATHER, TIME])
    shown, calls = _parse(request, [text[i : i + 2] for i in range(0, len(text), 2)])
    assert shown == text and calls == ()


def test_auto_streams_text_and_holds_only_what_may_be_a_tag() -> None:
    parser = tool_request([TIME]).parser()  # type: ignore[union-attr]
    assert parser.feed("Hi <") == "Hi "
    assert parser.feed("b>") == "<b>"
    assert parser.feed(" ok <tool") == " ok "
    assert parser.feed('_call>{"name": "get_time", "arguments": {}}') == ""
    rest, calls = parser.finish()
    assert rest == "" and [c.name for c in calls] == ["get_time"]


def test_forced_output_is_parsed_whole() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    request = tool_request([WEATHER, TIME], named, parallel_tool_calls=False)
    _, calls = _parse(request, ['{"name": "get_weather", ', '"arguments": {"city": "Rome"}}'])
    assert [c.name for c in calls] == ["get_weather"]
    parallel = tool_request([WEATHER, TIME], "required")
    _, calls = _parse(parallel, ['[{"name": "get_time", "arguments": {}}]'])
    assert [c.name for c in calls] == ["get_time"]
    shown, calls = _parse(parallel, ['[{"name": "get_time", "argu'])  # cut short: text
    assert calls == () and shown == '[{"name": "get_time", "argu'


# -- through the pool ------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _ToolMock(MockBackend):
    """Renders tools (Capabilities.tools) and structured output; answers a call."""

    @property
    def capabilities(self) -> Capabilities:
        sampling = BASIC_PARAMETERS | {"n", "structured.json_schema"}
        return dataclasses.replace(super().capabilities, tools=True, sampling=sampling)


def _calling(request: GenerationRequest) -> list[str]:
    return ["Sure. ", "<tool_", 'call>{"name": "get_time", ', '"arguments": {}}</tool_call>']


async def test_the_pool_streams_text_then_the_call_whole() -> None:
    backend = _ToolMock(handler=_calling)
    async with AdapterPool(backend) as pool:
        chunks = [
            c
            async for c in pool.generate(
                [{"role": "user", "content": "time?"}], tenant="t", tools=[WEATHER, TIME]
            )
        ]
        assert [c.text for c in chunks] == ["Sure. ", "", "", ""]
        assert chunks[-1].finish_reason == "tool_calls"
        assert [c.name for c in chunks[-1].tool_calls] == ["get_time"]
        request = backend.requests[-1]
        shown = tool_request([WEATHER, TIME]).definitions()  # type: ignore[union-attr]
        assert request.tools == shown and prompt_tools(request.prompt) == shown
        assert shown[1]["function"]["parameters"] == {"type": "object", "properties": {}}
        done = await pool.complete(
            [{"role": "user", "content": "time?"}],
            tenant="t",
            tools=[TIME],
            params=SamplingParams(max_tokens=10),
        )
        assert done.text == "Sure. " and [c.name for c in done.tool_calls] == ["get_time"]
        assert done.usage.completion_tokens == len(done.token_ids) == 4
        named = {"type": "function", "function": {"name": "get_time"}}
        await pool.complete(
            [{"role": "user", "content": "x"}], tenant="t", tools=[TIME], tool_choice=named
        )
        structured = backend.requests[-1].params.structured
        assert structured is not None and structured.kind == "json_schema"
        with pytest.raises(InvalidRequest, match="not a string"):
            await pool.complete("time?", tenant="t", tools=[TIME])
        with pytest.raises(InvalidRequest, match="cannot also"):
            await pool.complete(
                [{"role": "user", "content": "x"}],
                tenant="t",
                tools=[TIME],
                tool_choice="required",
                params=SamplingParams(structured=StructuredOutput.json_object()),
            )
        none = await pool.complete(
            [{"role": "user", "content": "x"}], tenant="t", tools=[TIME], tool_choice="none"
        )
        assert none.tool_calls == () and "<tool_call>" in none.text  # text, never parsed
        assert backend.requests[-1].tools == ()


async def test_a_backend_without_tools_refuses_them_before_any_work() -> None:
    backend = MockBackend()
    async with AdapterPool(backend) as pool:
        with pytest.raises(UnsupportedParameter, match="tools"):
            await pool.complete([{"role": "user", "content": "x"}], tenant="t", tools=[TIME])
        assert backend.requests == [] and pool.usage("t").requests == 0
        # tool_choice none shows no tools: nothing to refuse
        await pool.complete(
            [{"role": "user", "content": "x"}], tenant="t", tools=[TIME], tool_choice="none"
        )
