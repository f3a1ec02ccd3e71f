"""Tool calling: definitions, ``tool_choice``, rendering tools into a prompt, parsing calls.

A request's tools are OpenAI's definitions (``{"type": "function", "function": {"name",
"description", "parameters"}}``), validated here (:class:`Tool`, :func:`tool_request`).
:class:`ToolRequest` holds them with the request's ``tool_choice`` and
``parallel_tool_calls`` and says what the pool does with them:

* the prompt: a chat template that references ``tools`` gets them as ``tools=``; for one
  that does not (SmolLM2's), lorapool renders them itself, Hermes-style, into the system
  message (:func:`render_messages`): the functions' signatures inside ``<tools></tools>``
  and the instruction to answer ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
  an assistant message's ``tool_calls`` are rendered as those blocks, a ``tool`` message
  as role ``tool`` with its content. ``tool_choice="none"`` renders no tools.
* the output: for ``required`` or a named function it is constrained
  (:meth:`ToolRequest.constraint`: JSON whose schema is the call, ``{"name": <const>,
  "arguments": <the function's parameters>}``, any of the functions for ``required``, an
  array of one or more calls with ``parallel_tool_calls``), so the arguments always parse
  and validate; for ``auto`` it is free and parsed (:class:`ToolCallParser`): ``<tool_call>``
  blocks, or a bare JSON object naming a defined function with an object of arguments,
  are calls, anything else is text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .errors import InvalidRequest
from .sampling import MAX_GRAMMAR_CHARS, StructuredOutput
from .types import Chunk, FinishReason, Message, ToolCall

__all__ = [
    "MAX_PARALLEL_CALLS",
    "MAX_TOOLS",
    "MAX_TOOLS_CHARS",
    "TOOL_NAME",
    "Tool",
    "ToolCallParser",
    "ToolChoice",
    "ToolPrompt",
    "ToolRequest",
    "prompt_tools",
    "render_messages",
    "render_tools",
    "template_renders_tools",
    "tool_chunks",
    "tool_request",
]

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
"""What a function's name may be (OpenAI's rule), matched whole."""
MAX_TOOLS = 128
"""The most tools one request may define (OpenAI's limit)."""
MAX_TOOLS_CHARS = MAX_GRAMMAR_CHARS
"""The longest the tools' definitions may be together, as JSON text."""
MAX_PARALLEL_CALLS = 8
"""The most calls one constrained answer holds with ``parallel_tool_calls``."""

ToolChoice = Literal["auto", "none", "required"] | str
"""``auto``, ``none``, ``required``, or the name of the one function to call."""

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_INSTRUCTION = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


class Tool(BaseModel):
    """One function the model may call: its name, description and parameters' JSON schema."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    parameters: dict[str, Any]

    @classmethod
    def from_openai(cls, definition: object, where: str = "tools[0]") -> Tool:
        """A tool from OpenAI's definition; :class:`~lorapool.errors.InvalidRequest` naming
        ``where`` when it is malformed."""
        if not isinstance(definition, Mapping) or definition.get("type") != "function":
            raise InvalidRequest(f"{where} must be {{'type': 'function', 'function': {{...}}}}")
        function = definition.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequest(f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise InvalidRequest(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}"
            )
        description = function.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise InvalidRequest(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise InvalidRequest(f"{where}.function.parameters must be a JSON schema object")
        kind = parameters.get("type", "object")
        if kind != "object":
            raise InvalidRequest(
                f"{where}.function.parameters must describe an object (type 'object'), "
                f"got type {kind!r}"
            )
        return cls(name=name, description=description, parameters=dict(parameters))

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's definition of the tool."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def call_schema(self) -> dict[str, Any]:
        """The JSON schema of one call of this function: ``{"name", "arguments"}``.

        Arguments that name their ``properties`` and say nothing of others take no others
        (``additionalProperties: false``): a call still validates against the function's
        schema, and a small model cannot wander into made-up arguments until it runs out
        of tokens."""
        arguments = dict(self.parameters)
        if "properties" in arguments and "additionalProperties" not in arguments:
            arguments["additionalProperties"] = False
        return {
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": self.name},
                "arguments": arguments,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }


class ToolRequest(BaseModel):
    """A request's tools with its ``tool_choice`` (``choice``: ``auto``, ``none``,
    ``required`` or ``function``, then ``function`` names it) and ``parallel_tool_calls``."""

    model_config = ConfigDict(frozen=True)

    tools: tuple[Tool, ...]
    choice: Literal["auto", "none", "required", "function"] = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def rendered(self) -> tuple[Tool, ...]:
        """The tools the prompt shows the model (none for ``tool_choice="none"``)."""
        return () if self.choice == "none" else self.tools

    @property
    def calls(self) -> bool:
        """Whether the answer may hold calls (not for ``none``)."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the answer must be calls (``required`` or a named function)."""
        return self.choice in ("required", "function")

    def definitions(self) -> tuple[dict[str, Any], ...]:
        """The rendered tools as OpenAI's definitions (``GenerationRequest.tools``)."""
        return tuple(t.as_openai() for t in self.rendered)

    def constraint(self) -> StructuredOutput | None:
        """The output's constraint: the call's JSON schema for a forced choice, else ``None``."""
        if not self.forced:
            return None
        chosen = [t for t in self.tools if self.choice == "required" or t.name == self.function]
        one = (
            chosen[0].call_schema()
            if len(chosen) == 1
            else {"anyOf": [t.call_schema() for t in chosen]}
        )
        schema = (
            {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
            if self.parallel
            else one
        )
        return StructuredOutput.json_schema(schema)

    def parser(self) -> ToolCallParser:
        """A parser of one sample's output into text and calls."""
        return ToolCallParser(self)

    def names(self) -> frozenset[str]:
        """The defined functions' names."""
        return frozenset(t.name for t in self.tools)


def tool_request(
    tools: Sequence[Mapping[str, Any] | Tool] | None,
    tool_choice: ToolChoice | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
) -> ToolRequest | None:
    """The validated :class:`ToolRequest` of OpenAI's ``tools``, ``tool_choice`` and
    ``parallel_tool_calls``; ``None`` when the request defines no tools and lets the model
    answer in text (``auto``/``none``). Malformed values, more than :data:`MAX_TOOLS` tools
    or :data:`MAX_TOOLS_CHARS` of definitions, two tools of one name, and a ``tool_choice``
    that names no defined tool (or asks for a call with no tools) are
    :class:`~lorapool.errors.InvalidRequest`."""
    tools = list(tools or [])
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools defines {len(tools)} tools; at most {MAX_TOOLS}")
    parsed = tuple(
        t if isinstance(t, Tool) else Tool.from_openai(t, f"tools[{i}]")
        for i, t in enumerate(tools)
    )
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools defines two functions of the same name")
    size = len(json.dumps([t.as_openai() for t in parsed]))
    if size > MAX_TOOLS_CHARS:
        raise InvalidRequest(
            f"the tools' definitions are {size} characters; at most {MAX_TOOLS_CHARS}"
        )
    choice, function = _choice(tool_choice)
    if function is not None and function not in names:
        raise InvalidRequest(
            f"tool_choice names the function {function!r}, which tools does not define"
        )
    if choice == "required" and not parsed:
        raise InvalidRequest("tool_choice 'required' needs tools")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequest("parallel_tool_calls must be true or false")
    if not parsed:
        return None
    return ToolRequest(
        tools=parsed,
        choice=choice,
        function=function,
        parallel=True if parallel_tool_calls is None else parallel_tool_calls,
    )


def _choice(
    value: ToolChoice | Mapping[str, Any] | None,
) -> tuple[Literal["auto", "none", "required", "function"], str | None]:
    if value is None or value == "auto":
        return "auto", None
    if value == "none":
        return "none", None
    if value == "required":
        return "required", None
    if isinstance(value, Mapping):
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if value.get("type") == "function" and isinstance(name, str):
            return "function", name
    raise InvalidRequest(
        "tool_choice must be 'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}"
    )


# -- the prompt ----------------------------------------------------------------------------


class ToolPrompt(tuple[Message, ...]):
    """Chat messages with the tools they are rendered with: the prompt the pool hands a
    backend for a request with tools (``BaseBackend.encode`` renders them; the same prompt
    is what the request's prompt tokens are counted on)."""

    tools: tuple[Mapping[str, Any], ...]

    def __new__(
        cls, messages: Sequence[Message] = (), tools: Sequence[Mapping[str, Any]] = ()
    ) -> ToolPrompt:
        """The ``messages`` with ``tools`` (OpenAI's definitions)."""
        prompt = super().__new__(cls, messages)
        prompt.tools = tuple(tools)
        return prompt

    def __reduce__(self) -> tuple[Any, ...]:
        return (ToolPrompt, (tuple(self), self.tools))


def prompt_tools(prompt: object) -> tuple[Mapping[str, Any], ...]:
    """The tools a prompt carries (a :class:`ToolPrompt`'s), else none."""
    return prompt.tools if isinstance(prompt, ToolPrompt) else ()


def template_renders_tools(template: object) -> bool:
    """Whether a tokenizer's chat template (its text, or a mapping of named templates)
    references ``tools``: then it renders them itself."""
    if isinstance(template, Mapping):
        return any(template_renders_tools(t) for t in template.values())
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system message's tools section: signatures in ``<tools>`` and the instruction
    to answer with ``<tool_call>`` blocks (the Hermes format)."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return _PREAMBLE + lines + _INSTRUCTION


def _arguments(value: object) -> object:
    """A call's arguments as a JSON value (OpenAI sends them as JSON text)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _call_text(call: Mapping[str, Any]) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name"), "arguments": _arguments(function.get("arguments"))}
    return f"{_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{_CLOSE}"


def render_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Messages for a chat template that knows nothing of tools: the tools in the system
    message (appended to the first one, or a new first one), an assistant's ``tool_calls``
    as ``<tool_call>`` blocks after its content, a ``tool`` message as role ``tool`` with
    its content (a string: ``None`` becomes empty); the messages' other keys stay."""
    rendered: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content") or ""
        calls = m.get("tool_calls") or ()
        if calls:
            blocks = "\n".join(_call_text(c) for c in calls)
            content = f"{content}\n{blocks}" if content else blocks
        message = {k: v for k, v in m.items() if k != "tool_calls"}
        rendered.append({**message, "role": str(m["role"]), "content": str(content)})
    if tools:
        section = render_tools(tools)
        if rendered and rendered[0]["role"] == "system":
            first = rendered[0]
            rendered[0] = {**first, "content": f"{first['content']}\n\n{section}"}
        else:
            rendered.insert(0, {"role": "system", "content": section})
    return rendered


def native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template that renders tools: an assistant's call arguments as
    objects (what Hugging Face's templates expect), content ``None`` as empty."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message = dict(m)
        if message.get("content") is None:
            message["content"] = ""
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": _arguments(c["function"].get("arguments")),
                    },
                }
                for c in message["tool_calls"]
            ]
        out.append(message)
    return out


# -- the output ----------------------------------------------------------------------------


def _new_call(name: str, arguments: Mapping[str, Any]) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        name=name,
        arguments=json.dumps(arguments, ensure_ascii=False),
    )


class ToolCallParser:
    """Splits one sample's output into text and :class:`~lorapool.types.ToolCall` s.

    :meth:`feed` takes each piece of text as it streams and returns what may be shown
    now: nothing while the output may still be a call (a forced choice; under ``auto``,
    from a ``<tool_call>`` tag on, or an answer that opens with ``{``), otherwise the text
    (holding back a tail that may begin a tag). :meth:`finish` returns the rest and the
    calls: text that did not parse as calls of defined functions comes back as text.
    """

    def __init__(self, request: ToolRequest) -> None:
        self.request = request
        self._names = request.names()
        self._held = ""  # text not shown yet
        self._shown = False  # some text was shown
        self._calling = request.forced  # held from a tag (or the start) on, to the end

    def feed(self, text: str) -> str:
        """The part of ``text`` (and of what was held) that may be shown now."""
        self._held += text
        if self._calling:
            return ""
        at = self._held.find(_OPEN)
        if at >= 0:
            shown, self._held, self._calling = self._held[:at], self._held[at:], True
            return self._show(shown)
        if not self._shown and self._held.lstrip().startswith("{"):
            return ""  # a bare JSON call, perhaps: held to the end
        if not self._shown and not self._held.strip():
            return ""  # leading whitespace: wait for what follows
        keep = _tag_prefix(self._held)
        shown = self._held[: len(self._held) - keep]
        self._held = self._held[len(shown) :]
        return self._show(shown)

    def _show(self, text: str) -> str:
        if text:
            self._shown = True
        return text

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """The text still held and the calls the output made (none: it is all text)."""
        held, self._held = self._held, ""
        calls = self._parse(held)
        if calls is None:
            return held, ()
        if not self.request.parallel:
            calls = calls[:1]
        return "", tuple(calls)

    def _parse(self, text: str) -> list[ToolCall] | None:
        stripped = text.strip()
        if self.request.forced or stripped.startswith("{"):
            try:
                value = json.loads(stripped)
            except ValueError:
                return None
            return self._calls(value if isinstance(value, list) else [value])
        if not stripped.startswith(_OPEN):
            return None
        values: list[object] = []
        for match in _BLOCK.finditer(stripped):
            try:
                values.append(json.loads(match.group(1)))
            except ValueError:
                return None
        if _BLOCK.sub("", stripped).strip():
            return None  # text between or after the blocks: not a clean call
        return self._calls(values)

    def _calls(self, values: list[object]) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        for value in values:
            if not isinstance(value, Mapping):
                return None
            name = value.get("name")
            arguments = value.get("arguments", value.get("parameters"))
            if isinstance(arguments, str):
                arguments = _arguments(arguments)
            if name not in self._names or not isinstance(arguments, Mapping):
                return None
            calls.append(_new_call(str(name), arguments))
        return calls or None


def _tag_prefix(text: str) -> int:
    """The length of the longest tail of ``text`` that begins ``<tool_call>``."""
    for n in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-n:]):
            return n
    return 0


async def tool_chunks(
    stream: AsyncIterator[Chunk], request: ToolRequest
) -> AsyncGenerator[Chunk, None]:
    """The chunks of ``stream`` with each sample's output split by a :class:`ToolCallParser`:
    text held while it may be a call, and on the sample's last chunk the rest of its text
    and its calls (``finish_reason`` ``tool_calls`` when it made any). Token ids, logprobs
    and usage pass as they came."""
    parsers: dict[int, ToolCallParser] = {}
    async for chunk in stream:
        parser = parsers.get(chunk.index)
        if parser is None:
            parser = parsers[chunk.index] = request.parser()
        text = parser.feed(chunk.text)
        if chunk.finish_reason is None:
            yield dataclasses.replace(chunk, text=text)
            continue
        rest, calls = parser.finish()
        finish: FinishReason = "tool_calls" if calls else chunk.finish_reason
        yield dataclasses.replace(chunk, text=text + rest, tool_calls=calls, finish_reason=finish)
