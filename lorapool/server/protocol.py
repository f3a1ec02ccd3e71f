"""The OpenAI wire format: request bodies in, completion objects and SSE chunks out.

Every request body refuses a string holding an unpaired UTF-16 surrogate (JSON's
``"\\ud800"`` escape with no partner), wherever it is: such a string is not text, no
tokenizer takes it and no registry stores it, so it is a 400 naming the field here rather
than a failure further in.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lorapool.types import Completion, SamplingParams, Usage

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "LoadAdapterRequest",
    "UnloadAdapterRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "lone_surrogate",
    "sse",
    "usage_dict",
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
    """A request body: unknown fields are ignored, as OpenAI's server does; no string may
    hold an unpaired surrogate."""

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


class _Common(_Body):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-sequence token."""

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The request's sampling parameters as lorapool's."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stop),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str

    def prompt_chars(self) -> int:
        """The prompt's length in characters."""
        return len(self.prompt)


class ChatMessage(_Body):
    """One chat message; content may be a string or a list of text parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """As for completions; ``max_completion_tokens`` wins over ``max_tokens``."""
        params = super().sampling(default_max_tokens)
        if self.max_completion_tokens is not None:
            params = params.model_copy(update={"max_tokens": self.max_completion_tokens})
        return params

    def prompt_chars(self) -> int:
        """The messages' text in characters, all together."""
        return sum(len(m.text()) for m in self.messages)

    def chat(self) -> list[dict[str, str]]:
        """The messages as lorapool's prompt."""
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


class LoadAdapterRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter`` body (``shared``: admins only)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    shared: bool = False


class UnloadAdapterRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str = Field(min_length=1)


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(usage: Usage | None) -> dict[str, int] | None:
    """OpenAI's usage object."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "cancelled" else reason)


def completion_response(rid: str, model: str, done: Completion) -> dict[str, Any]:
    """A whole ``text_completion`` object."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": done.text,
                "logprobs": None,
                "finish_reason": _finish(done.finish_reason),
            }
        ],
        "usage": usage_dict(done.usage),
    }


def chat_response(rid: str, model: str, done: Completion) -> dict[str, Any]:
    """A whole ``chat.completion`` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": None,
                "finish_reason": _finish(done.finish_reason),
            }
        ],
        "usage": usage_dict(done.usage),
    }


def _event(
    rid: str, model: str, obj: str, choice: dict[str, Any] | None, usage: Usage | None
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [] if choice is None else [{"index": 0, **choice, "logprobs": None}],
    }
    if usage is not None:
        event["usage"] = usage_dict(usage)
    return event


def completion_chunk(
    rid: str, model: str, text: str | None, finish: str | None, usage: Usage | None = None
) -> dict[str, Any]:
    """One streamed ``text_completion`` event (``text=None``: the usage-only last event)."""
    choice = None if text is None else {"text": text, "finish_reason": _finish(finish)}
    return _event(rid, model, "text_completion", choice, usage)


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, str] | None,
    finish: str | None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk`` event (``delta=None``: the usage-only event)."""
    choice = None if delta is None else {"delta": delta, "finish_reason": _finish(finish)}
    return _event(rid, model, "chat.completion.chunk", choice, usage)


def sse(event: dict[str, Any] | str) -> bytes:
    """One server-sent event (``"[DONE]"`` ends the stream)."""
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
