"""A streamed answer's server-sent events: one per chunk that says something.

:class:`Answers` turns the pool's chunks (each with its sample's ``index``) into OpenAI's
chunk objects: chat deltas (the role first, for every sample; then content, whole tool
calls, the finish reason), or completions' text; logprobs ride with the text they belong
to (a chunk whose text is held back, a tool call perhaps, passes its logprobs on to the
sample's next event); with ``include_usage`` every chunk carries ``usage`` (null) and the
stream ends with a chunk holding the request's usage and no choices.
"""

from __future__ import annotations

from typing import Any

from lorapool.sampling import SamplingParams
from lorapool.types import Chunk, TokenLogprob, Usage

from .responses import (
    LegacyOffsets,
    chat_event,
    chat_logprobs,
    completion_event,
    completion_logprobs,
    finish_reason,
    tool_call_deltas,
)

__all__ = ["Answers"]


class Answers:
    """The events of one streamed answer (``chat``: chat chunks, else completions')."""

    def __init__(
        self,
        rid: str,
        model: str,
        fp: str,
        chat: bool,
        params: SamplingParams,
        include_usage: bool,
    ) -> None:
        self.rid, self.model, self.fp, self.chat = rid, model, fp, chat
        self.params = params
        self.include_usage = include_usage
        self._pending: dict[int, list[TokenLogprob]] = {}
        self._offsets = LegacyOffsets()

    def _wrap(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        build = chat_event if self.chat else completion_event
        return build(
            self.rid, self.model, self.fp, choices, usage, include_usage=self.include_usage
        )

    def opening(self) -> list[dict[str, Any]]:
        """The events before any chunk: chat's assistant role, one per sample."""
        if not self.chat:
            return []
        choices = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.params.n)
        ]
        return [self._wrap(choices)]

    def event(self, chunk: Chunk) -> dict[str, Any] | None:
        """The chunk's event; ``None`` for a chunk that says nothing yet (held text)."""
        pending = self._pending.setdefault(chunk.index, [])
        pending.extend(chunk.logprobs)
        if not chunk.text and not chunk.tool_calls and chunk.finish_reason is None:
            return None
        tokens, self._pending[chunk.index] = pending, []
        logprobs: dict[str, Any] | None = None
        if self.chat:
            if self.params.logprobs:
                logprobs = chat_logprobs(tokens)
            delta: dict[str, Any] = {}
            if chunk.text or not chunk.tool_calls:
                delta["content"] = chunk.text
            if chunk.tool_calls:
                delta["tool_calls"] = tool_call_deltas(chunk.tool_calls)
            choice = {"index": chunk.index, "delta": delta}
        else:
            if self.params.logprobs:
                logprobs = completion_logprobs(tokens, self._offsets.take(chunk.index, tokens))
            choice = {"index": chunk.index, "text": chunk.text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason(chunk.finish_reason)
        return self._wrap([choice])

    def usage(self, usage: Usage) -> dict[str, Any]:
        """The last event of ``include_usage``: the request's usage, no choices."""
        return self._wrap([], usage)
