"""The OpenAI wire format: request bodies in (the answers: :mod:`.responses`).

A generation body holds only fields the server honours: OpenAI's, and vLLM's extensions
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``,
``ignore_eos``, ``structured_outputs``). An unknown field is refused with a 400 naming it
(OpenAI's ``Unrecognized request argument supplied``), and a known one the server cannot
honour (``audio``, ``store``, ``echo``, ...) unless it is unset or holds its default.

Every request body refuses a string holding an unpaired UTF-16 surrogate (JSON's
``"\\ud800"`` escape with no partner), wherever it is: such a string is not text, no
tokenizer takes it and no registry stores it, so it is a 400 naming the field here rather
than a failure further in.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lorapool.sampling import MAX_N, MAX_TOP_LOGPROBS, SamplingParams, StructuredOutput

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "LoadAdapterRequest",
    "ResponseFormat",
    "StreamOptions",
    "StructuredOutputs",
    "UnloadAdapterRequest",
    "error_body",
    "lone_surrogate",
    "sse",
]


def lone_surrogate(value: Any) -> str | None:
    """The dotted path of the first string in ``value`` (parsed JSON) that holds an unpaired
    surrogate, or ``None``.

    Keys and values of objects and the items of arrays are checked, however deep (no
    recursion); a path names the key or index (``messages.0.content``; ``""`` for ``value``
    itself; ``a key of messages.0`` for a bad key, which the path never repeats).
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return where
            continue
        if isinstance(item, dict):
            children = list(item.items())
        elif isinstance(item, list):
            children = list(enumerate(item))
        else:
            continue
        for key, child in reversed(children):
            if isinstance(key, str) and not _is_text(key):
                return f"a key of {where or 'the body'}"  # never the key itself
            path = f"{where}.{key}" if where else str(key)
            stack.append((path, child))
    return None


def _is_text(value: str) -> bool:
    """Whether ``value`` is encodable as UTF-8 (no unpaired surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Body(BaseModel):
    """A request body: no string may hold an unpaired surrogate; unknown fields are ignored
    (the registration bodies, as vLLM's server does)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError(
                "unpaired_surrogate",
                "{where} contains an unpaired surrogate; send valid UTF-8 text",
                {"where": where or "the body"},
            )
        return data


class _Strict(_Body):
    """A generation body: a field the server does not know is refused, naming it (OpenAI's
    ``Unrecognized request argument supplied``), never ignored."""

    model_config = ConfigDict(extra="forbid")


def _unset(name: str, value: object, *allowed: object) -> None:
    """Refuse a field the server cannot honour unless it holds one of ``allowed`` (or null)."""
    if value is not None and value not in allowed:
        raise PydanticCustomError(
            "unsupported_value",
            "{name} is not supported by this server; leave it unset",
            {"name": name},
        )


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` ends the stream with a usage chunk."""

    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    continuous_usage_stats: bool | None = None

    @model_validator(mode="after")
    def _honoured(self) -> StreamOptions:
        _unset("stream_options.include_obfuscation", self.include_obfuscation, False)
        _unset("stream_options.continuous_usage_stats", self.continuous_usage_stats, False)
        return self


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: the schema the answer follows (always enforced)."""

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format of type {self.type} takes no json_schema")
        return self

    def structured(self) -> StructuredOutput | None:
        """The constraint it asks for (``None``: free text)."""
        if self.type == "json_object":
            return StructuredOutput.json_object()
        if self.type == "json_schema" and self.json_schema is not None:
            schema = self.json_schema.schema_
            return StructuredOutput.json_schema(schema if schema is not None else {})
        return None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` extension: one of ``json`` (a schema), ``regex``,
    ``choice``, ``grammar`` (llguidance's Lark) or ``json_object``."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        _unset("structured_outputs.disable_any_whitespace", self.disable_any_whitespace, False)
        _unset(
            "structured_outputs.disable_additional_properties",
            self.disable_additional_properties,
            False,
        )
        _unset("structured_outputs.whitespace_pattern", self.whitespace_pattern)
        _unset("structured_outputs.structural_tag", self.structural_tag)
        kinds = [self.json_, self.regex, self.choice, self.grammar, self.json_object or None]
        if sum(k is not None for k in kinds) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object"
            )
        return self

    def structured(self) -> StructuredOutput:
        """The constraint, as lorapool's."""
        if self.json_ is not None:
            return StructuredOutput.json_schema(self.json_)
        if self.regex is not None:
            return StructuredOutput.regex(self.regex)
        if self.choice is not None:
            return StructuredOutput.choice(self.choice)
        if self.grammar is not None:
            return StructuredOutput.grammar(self.grammar)
        return StructuredOutput.json_object()


class _Common(_Strict):
    """Fields shared by both endpoints: OpenAI's and vLLM's sampling extensions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    """The caller's end user (OpenAI's field), written to the request's log record."""
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    """Keep generating past the end-of-sequence token."""
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _logprobs(self) -> tuple[bool, int]:
        return False, 0

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def structured(self) -> StructuredOutput | None:
        """The output's constraint: ``response_format`` or ``structured_outputs``."""
        formats = self.response_format.structured() if self.response_format else None
        extension = self.structured_outputs.structured() if self.structured_outputs else None
        if formats is not None and extension is not None:
            raise ValueError("send response_format or structured_outputs, not both")
        return formats or extension

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The request's sampling parameters as lorapool's (unset: lorapool's defaults)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        logprobs, top = self._logprobs()
        values: dict[str, Any] = {
            "max_tokens": self._max_tokens() or default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": tuple(stop),
            "ignore_eos": self.ignore_eos,
            "top_k": None if self.top_k in (None, 0, -1) else self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()},
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "min_tokens": self.min_tokens,
            "n": self.n,
            "logprobs": logprobs,
            "top_logprobs": top,
            "structured": self.structured(),
        }
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """The legacy shape: how many alternatives per token (0: the chosen token's only)."""
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _honoured(self) -> CompletionRequest:
        _unset("echo", self.echo, False)
        _unset("suffix", self.suffix)
        _unset("best_of", self.best_of, 1, self.n or 1)
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: send one prompt (a string, or a list of one string)")
        return self

    @property
    def text(self) -> str:
        """The prompt's text."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def prompt_chars(self) -> int:
        """The prompt's length in characters."""
        return len(self.text)

    def _logprobs(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class FunctionCall(_Strict):
    """A call in an assistant message: the function's name and its arguments' JSON text."""

    name: str
    arguments: str


class MessageToolCall(_Strict):
    """An entry of an assistant message's ``tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One chat message: content a string or a list of text parts; an assistant's may be
    null beside ``tool_calls``; a ``tool`` message answers ``tool_call_id``."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        if isinstance(self.content, list):
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type")
                    raise ValueError(
                        f"content part of type {kind!r} is not supported; send text parts"
                    )
        return self

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p["text"]) for p in self.content)

    def chars(self) -> int:
        """The message's text and its calls' arguments, in characters."""
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or [])
        return len(self.text()) + calls

    def message(self) -> dict[str, Any]:
        """The message as lorapool's (``developer`` is ``system``)."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            if self.content is None:
                out["content"] = None
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's fields this server cannot honour: refused unless unset
    store: bool | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    """A caching hint: lorapool keeps no prompt cache yet, so it changes nothing."""
    safety_identifier: str | None = Field(default=None, max_length=256)
    """OpenAI's end-user id for safety, written to the request's log record."""

    @model_validator(mode="after")
    def _honoured(self) -> ChatRequest:
        _unset("store", self.store, False)
        _unset("metadata", self.metadata)
        _unset("modalities", self.modalities, ["text"])
        _unset("audio", self.audio)
        _unset("prediction", self.prediction)
        _unset("reasoning_effort", self.reasoning_effort)
        _unset("service_tier", self.service_tier, "auto", "default")
        _unset("web_search_options", self.web_search_options)
        _unset("functions", self.functions)
        _unset("function_call", self.function_call)
        _unset("verbosity", self.verbosity)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def _logprobs(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0

    def _max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def prompt_chars(self) -> int:
        """The messages' text (and calls) in characters, all together."""
        return sum(m.chars() for m in self.messages)

    def chat(self) -> list[dict[str, Any]]:
        """The messages as lorapool's prompt."""
        return [m.message() for m in self.messages]

    def tool_options(self) -> dict[str, Any]:
        """The pool's tool arguments; empty when no tools are defined and none are asked
        for (``tool_choice`` unset, ``auto`` or ``none``: the answer is text)."""
        if not self.tools and self.tool_choice in (None, "auto", "none"):
            return {}
        return {
            "tools": self.tools or [],
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }


class LoadAdapterRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter`` body (``shared``: admins only)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    shared: bool = False


class UnloadAdapterRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str = Field(min_length=1)


def sse(event: dict[str, Any] | str) -> bytes:
    """One server-sent event (``"[DONE]"`` ends the stream)."""
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
