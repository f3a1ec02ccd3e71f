"""The OpenAI wire format, out: completion objects, streamed chunks, logprobs, tool calls.

Every object and chunk carries ``system_fingerprint`` (:func:`fingerprint`: the lorapool
version and the base model). Chat logprobs are OpenAI's ``{"content": [{"token",
"logprob", "bytes", "top_logprobs"}]}``; completions' the legacy ``{"tokens",
"token_logprobs", "top_logprobs", "text_offset"}``. A log-probability of minus infinity
is written as -9999.0 (as vLLM does): JSON has no infinity.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from lorapool._version import __version__
from lorapool.types import Completion, TokenLogprob, ToolCall, Usage

__all__ = [
    "LegacyOffsets",
    "chat_event",
    "chat_logprobs",
    "chat_response",
    "completion_event",
    "completion_logprobs",
    "completion_response",
    "finish_reason",
    "fingerprint",
    "new_id",
    "tool_call_deltas",
    "usage_dict",
]

_FLOOR = -9999.0


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def fingerprint(base_model: str) -> str:
    """``system_fingerprint``: changes when lorapool's version or the base model does."""
    digest = hashlib.sha256(f"{__version__}\0{base_model}".encode()).hexdigest()
    return f"fp_{digest[:10]}"


def usage_dict(usage: Usage | None) -> dict[str, Any] | None:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` when the engine's
    prefix cache served part of the prompt (absent otherwise, as vLLM leaves it)."""
    if usage is None:
        return None
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish reason (a cancelled sample reads ``stop``)."""
    return None if reason is None else ("stop" if reason == "cancelled" else reason)


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs``: one entry per token, with its alternatives."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": _logprob(t.logprob),
                "bytes": list(t.token.encode("utf-8", "replace")),
                "top_logprobs": [
                    {
                        "token": a.token,
                        "logprob": _logprob(a.logprob),
                        "bytes": list(a.token.encode("utf-8", "replace")),
                    }
                    for a in t.top
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


class LegacyOffsets:
    """Where each sample's next token starts in its text (``text_offset``), by index."""

    def __init__(self) -> None:
        self._at: dict[int, int] = {}

    def take(self, index: int, tokens: Sequence[TokenLogprob]) -> list[int]:
        """The offsets of ``tokens``, the next of sample ``index``'s."""
        at = self._at.get(index, 0)
        offsets = []
        for t in tokens:
            offsets.append(at)
            at += len(t.token)
        self._at[index] = at
        return offsets


def completion_logprobs(tokens: Sequence[TokenLogprob], offsets: list[int]) -> dict[str, Any]:
    """Completions' legacy ``logprobs`` (``top_logprobs``: the token and its alternatives)."""
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [_logprob(t.logprob) for t in tokens],
        "top_logprobs": [
            {t.token: _logprob(t.logprob)} | {a.token: _logprob(a.logprob) for a in t.top}
            for t in tokens
        ],
        "text_offset": offsets,
    }


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def tool_call_deltas(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """A chunk's ``delta.tool_calls``: each call whole, with its position."""
    return [{"index": i, **_tool_call(c)} for i, c in enumerate(calls)]


def _samples(done: Completion) -> tuple[Completion, ...]:
    return done.choices or (done,)


def _message(sample: Completion) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": sample.text if sample.text or not sample.tool_calls else None,
        "refusal": None,
    }
    if sample.tool_calls:
        message["tool_calls"] = [_tool_call(c) for c in sample.tool_calls]
    return message


def _object(rid: str, obj: str, model: str, fp: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fp,
    }


def chat_response(
    rid: str, model: str, fp: str, done: Completion, *, logprobs: bool
) -> dict[str, Any]:
    """A whole ``chat.completion`` object, a choice per sample."""
    choices = [
        {
            "index": s.index,
            "message": _message(s),
            "logprobs": chat_logprobs(s.logprobs) if logprobs else None,
            "finish_reason": finish_reason(s.finish_reason),
        }
        for s in _samples(done)
    ]
    return {
        **_object(rid, "chat.completion", model, fp),
        "choices": choices,
        "usage": usage_dict(done.usage),
    }


def completion_response(
    rid: str, model: str, fp: str, done: Completion, *, logprobs: bool
) -> dict[str, Any]:
    """A whole ``text_completion`` object, a choice per sample."""
    choices = []
    for s in _samples(done):
        offsets = LegacyOffsets().take(s.index, s.logprobs)
        choices.append(
            {
                "index": s.index,
                "text": s.text,
                "logprobs": completion_logprobs(s.logprobs, offsets) if logprobs else None,
                "finish_reason": finish_reason(s.finish_reason),
            }
        )
    return {
        **_object(rid, "text_completion", model, fp),
        "choices": choices,
        "usage": usage_dict(done.usage),
    }


def _event(
    obj: str,
    rid: str,
    model: str,
    fp: str,
    choices: list[dict[str, Any]],
    usage: Usage | None,
    include_usage: bool,
) -> dict[str, Any]:
    event = {**_object(rid, obj, model, fp), "choices": choices}
    if include_usage or usage is not None:
        event["usage"] = usage_dict(usage)
    return event


def chat_event(
    rid: str,
    model: str,
    fp: str,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
    *,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` (``choices`` empty: the usage chunk); with
    ``include_usage`` every chunk carries ``usage`` (null but the last), as OpenAI's do."""
    return _event("chat.completion.chunk", rid, model, fp, choices, usage, include_usage)


def completion_event(
    rid: str,
    model: str,
    fp: str,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
    *,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed ``text_completion`` (``choices`` empty: the usage chunk)."""
    return _event("text_completion", rid, model, fp, choices, usage, include_usage)
