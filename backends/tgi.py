"""TGIBackend: lorapool over a Hugging Face Text Generation Inference server, through httpx.

Targeted: TGI 3.3 (``ghcr.io/huggingface/text-generation-inference:3.3``); the router
API used here is unchanged since 2.3, which added ``details.input_length`` to streams.

TGI's adapters are static: the server loads the ones named in ``LORA_ADAPTERS`` at
launch (``LORA_ADAPTERS=name=/path/to/adapter,...``) and cannot load others later.
``adapters`` tells the backend which lorapool adapter ids TGI serves, and under which
TGI adapter id. Loading any other adapter is refused with :class:`LoadError`, because
TGI answers a request for an adapter id it does not hold with the *base model*
(``ADAPTER_TO_INDEX.get(adapter_id, 0)`` in its ``flash_causal_lm.py``), silently.
Loading and unloading are bookkeeping; lorapool still schedules by slot.

String prompts stream from ``POST /generate_stream`` (token ids, finish reason and
usage from ``details``); chat messages from ``POST /v1/chat/completions`` with
``model=<TGI adapter id>`` (``"tgi"`` for the base model), which gives text but no
token ids. TGI keeps a matched stop string in its output; this backend removes it.
TGI has no ``ignore_eos``: a request asking for it is refused.
The sampling parameters served are :data:`TGI_SAMPLING` (``top_k``,
``repetition_penalty``, structured output as TGI's grammar); any other is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from lorapool.errors import (
    BackendError,
    BackendServerError,
    InvalidRequest,
    LoadError,
    UnsupportedParameter,
)
from lorapool.retry import RetryPolicy, resolve_retry
from lorapool.sampling import BASIC_PARAMETERS
from lorapool.types import (
    Capabilities,
    Chunk,
    FinishReason,
    GenerationRequest,
    LoadedAdapter,
    SamplingParams,
    Usage,
)

from ._http import RemoteBackend, RetryLater, error_message, sse_events

__all__ = [
    "TGI_SAMPLING",
    "StopTrimmer",
    "TGIBackend",
    "chat_body",
    "generate_body",
    "tgi_finish_reason",
]

log = logging.getLogger(__name__)

_FINISH: dict[str, FinishReason] = {
    "length": "length",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "stop": "stop",
}
_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

TGI_SAMPLING = (BASIC_PARAMETERS - {"ignore_eos"}) | {
    "top_k",
    "repetition_penalty",
    "structured.json_object",
    "structured.json_schema",
    "structured.regex",
    "structured.choice",
}
"""What TGI 3.3 honours with lorapool's meaning.

``top_k``; ``repetition_penalty`` (CTRL's, over prompt and output, as lorapool's);
structured output as TGI's ``grammar`` (``{"type": "json" | "regex", "value": ...}``; any
object is the schema ``{"type": "object"}``, a choice the regex of its escaped options).
Not served: TGI's ``frequency_penalty`` is a repetition-style penalty over the prompt too,
not OpenAI's; its chat ``presence_penalty`` becomes a repetition penalty; its token
log-probabilities are taken after penalties and temperature, not from the model's own
distribution; ``n``, ``min_p``, ``min_tokens``, ``stop_token_ids``, ``logit_bias`` and
Lark grammars it has not, nor ``ignore_eos``.
Chat prompts go to ``/v1/chat/completions``, which takes neither ``top_k`` nor
``repetition_penalty``: a chat request setting them is refused
(:class:`~lorapool.errors.UnsupportedParameter`), a string prompt is served."""

_GENERATE_ONLY = ("top_k", "repetition_penalty")


def tgi_finish_reason(reason: object) -> FinishReason:
    """lorapool's finish reason for TGI's (``length``, ``eos_token``, ``stop_sequence``)."""
    return _FINISH.get(str(reason), "stop")


def _sampling(params: SamplingParams) -> dict[str, Any]:
    """The sampling fields TGI accepts: it refuses ``temperature=0`` and ``top_p>=1``."""
    out: dict[str, Any] = {}
    if params.temperature > 0:
        out["temperature"] = params.temperature
        if params.top_p < 1.0:
            out["top_p"] = params.top_p
    if params.seed is not None:
        out["seed"] = params.seed
    if params.stop:
        out["stop"] = list(params.stop)
    grammar = tgi_grammar(params)
    if grammar is not None:
        out["grammar"] = grammar
    return out


def tgi_grammar(params: SamplingParams) -> dict[str, Any] | None:
    """TGI's ``grammar`` for the request's structured output (``None`` without one)."""
    so = params.structured
    if so is None:
        return None
    if so.kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    if so.kind == "json_schema":
        return {"type": "json", "value": so.schema_dict}
    if so.kind == "regex":
        return {"type": "regex", "value": so.spec}
    if so.kind == "choice":
        return {"type": "regex", "value": "(" + "|".join(re.escape(c) for c in so.choices) + ")"}
    raise UnsupportedParameter("TGIBackend", [f"structured.{so.kind}"])


def generate_body(prompt: str, params: SamplingParams, adapter: str | None) -> dict[str, Any]:
    """The ``/generate_stream`` request: greedy is ``do_sample: false``; base omits the adapter."""
    parameters: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "do_sample": params.temperature > 0,
        "details": True,
        **_sampling(params),
    }
    if params.top_k is not None:
        parameters["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        parameters["repetition_penalty"] = params.repetition_penalty
    if adapter is not None:
        parameters["adapter_id"] = adapter
    return {"inputs": prompt, "parameters": parameters}


def chat_body(
    messages: Iterable[Mapping[str, str]], params: SamplingParams, adapter: str | None
) -> dict[str, Any]:
    """The ``/v1/chat/completions`` request; TGI reads ``model`` as the adapter id and takes
    the grammar as ``response_format``."""
    sampling = _sampling(params)
    grammar = sampling.pop("grammar", None)
    if grammar is not None:
        sampling["response_format"] = grammar
    return {
        "model": adapter or "tgi",
        "messages": [dict(m) for m in messages],
        "max_tokens": params.max_tokens,
        "temperature": sampling.pop("temperature", 0.0),
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling,
    }


class StopTrimmer:
    """Holds back text that may begin a stop string and cuts the output where one matches."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.matched = False

    def push(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to emit now."""
        if self.matched:
            return ""
        if not self.stops:
            return text
        buffer = self.pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self.pending = True, ""
            return buffer[: min(hits)]
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0
        )
        self.pending = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """What is still held back (the stream ended without a match)."""
        out, self.pending = self.pending, ""
        return out


def _raise_error_event(error: object, error_type: object, *, started: bool) -> None:
    """TGI streams its errors as events (``{"error": ..., "error_type": ...}``)."""
    if isinstance(error, Mapping):  # the OpenAI-style error of /v1/chat/completions
        message = str(error.get("message", error))
        status = error.get("http_status_code")
        error_type = "validation" if status in (400, 422) else error_type
    else:
        message = str(error)
    if error_type == "validation":
        raise InvalidRequest(f"TGI refused the request: {message}")
    if error_type == "overloaded" and not started:
        raise RetryLater(message)
    raise BackendError(f"TGI failed the request ({error_type}): {message}")


class _Stream:
    """Turns one request's SSE events into chunks; ``done`` after the last one."""

    def __init__(self, request: GenerationRequest, chat: bool) -> None:
        self.request = request
        self.chat = chat
        self.stop = StopTrimmer(request.params.stop)
        self.tokens = 0
        self.done = False
        self.pending: Chunk | None = None
        self.finish: FinishReason | None = None
        self.served_by = "base" if request.adapter_id is None else "adapter"

    def _chunk(self, text: str, ids: tuple[int, ...]) -> Chunk:
        return Chunk(text, ids, adapter_id=self.request.adapter_id, served_by=self.served_by)

    def feed(self, event: Mapping[str, Any]) -> list[Chunk]:
        """The chunks ``event`` completes (the last one carries finish and usage)."""
        if "error" in event:
            _raise_error_event(event["error"], event.get("error_type"), started=self.tokens > 0)
        return self._chat(event) if self.chat else self._generate(event)

    def _generate(self, event: Mapping[str, Any]) -> list[Chunk]:
        token = event.get("token") or {}
        ids = () if token.get("id") is None else (int(token["id"]),)
        self.tokens += len(ids)
        text = self.stop.push("" if token.get("special") else str(token.get("text") or ""))
        details = event.get("details")
        if details is None and event.get("generated_text") is None:
            return [self._chunk(text, ids)]
        self.done = True
        if details is None:  # details were not returned: infer what TGI would have said
            finish: FinishReason = (
                "length" if self.tokens >= self.request.params.max_tokens else "stop"
            )
            usage = Usage(0, self.tokens)
        else:
            finish = tgi_finish_reason(details.get("finish_reason"))
            completion = int(details.get("generated_tokens", self.tokens))
            usage = Usage(int(details.get("input_length") or 0), completion)
        text += self.stop.flush()
        return [replace(self._chunk(text, ids), finish_reason=finish, usage=usage)]

    def _chat(self, event: Mapping[str, Any]) -> list[Chunk]:
        out: list[Chunk] = []
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text = self.stop.push(str(delta.get("content") or ""))
            self.tokens += 1  # TGI sends one chat chunk per generated token
            if choice.get("finish_reason"):
                self.finish = tgi_finish_reason(choice["finish_reason"])
                text += self.stop.flush()
            if self.pending is not None:
                out.append(self.pending)
            self.pending = self._chunk(text, ())
        usage = event.get("usage")
        if usage:
            self.done = True
            final = Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
            out.append(self._last(final))
        return out

    def _last(self, usage: Usage) -> Chunk:
        last = self.pending or self._chunk("", ())
        self.pending = None
        return replace(last, finish_reason=self.finish or "stop", usage=usage)

    def end(self) -> list[Chunk]:
        """The stream closed: a chat stream without usage still ends with its last chunk."""
        if self.done:
            return []
        if self.chat and self.finish is not None:
            self.done = True
            return [self._last(Usage(0, self.tokens))]
        raise BackendError("TGI closed the stream before the last token")


class TGIBackend(RemoteBackend):
    """Serve lorapool's adapters from a TGI server started with ``LORA_ADAPTERS``.

    ``adapters`` maps lorapool adapter ids to TGI adapter ids (a list of ids, or a
    mapping whose empty values mean "the same name"); only those can be loaded, and
    there are as many slots as adapters. ``max_rank`` bounds what registration
    accepts (TGI has loaded its adapters already). ``model_path``: a local copy of
    the base checkpoint, if any, for registration's shape checks. TGI has no
    ``ignore_eos``; a request asking for it is refused. ``retry``: how connection
    errors, 429 and 502/503/504 are retried before the first token, a
    :class:`~lorapool.retry.RetryPolicy` or its fields; ``retries`` and
    ``retry_backoff`` are the older spelling of its ``attempts - 1`` and ``initial``.
    """

    transient_status = frozenset({429, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        *,
        adapters: Mapping[str, str] | Iterable[str] | None = None,
        api_key: str | None = None,
        max_batch: int = 64,
        max_rank: int = 64,
        timeout: float = 60.0,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        model_path: str | Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if isinstance(adapters, str):
            raise TypeError("adapters must be a mapping or a list of adapter ids, not a string")
        policy = resolve_retry(retry, retries, retry_backoff, self.default_retry)
        connection = (base_url, api_key, timeout, policy, transport)
        super().__init__(*connection, label="TGI")
        if isinstance(adapters, Mapping):
            self.adapters = {k: (v or k) for k, v in adapters.items()}
        else:
            self.adapters = {name: name for name in adapters or ()}
        self.max_batch = max_batch
        self.max_rank = max_rank
        self.model_path = None if model_path is None else Path(model_path).expanduser()
        self._slots: dict[str, int] = {}
        self.info: dict[str, Any] = {}
        """TGI's ``/info`` answer (model id, token limits, version), read at :meth:`start`."""

    # -- lifecycle -------------------------------------------------------------------

    async def _start(self) -> Capabilities:
        """Read ``GET /info`` for the base model and its token limits.

        One slot per static adapter (at least one), the batch bounded by TGI's
        ``max_concurrent_requests``.
        """
        response = await self._request("GET", "/info", what="answer GET /info")
        self.info = response.json()
        concurrent = int(self.info.get("max_concurrent_requests") or self.max_batch)
        total = self.info.get("max_total_tokens")
        return Capabilities(
            max_slots=max(1, len(self.adapters)),
            max_rank=self.max_rank,
            max_batch=min(self.max_batch, concurrent),
            base_model=str(self.info.get("model_id") or self.base_url),
            target_modules=_TARGETS,
            dynamic_load=False,
            pinning=False,
            max_seq_len=None if total is None else int(total),
            model_path=self.model_path,
            sampling=TGI_SAMPLING,
        )

    async def _aclose(self) -> None:
        """Close the connection pool (TGI's adapters stay loaded: they are TGI's)."""
        self._slots.clear()
        await super()._aclose()

    # -- adapters --------------------------------------------------------------------

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Nothing to prepare: TGI reads its adapters itself, at launch."""
        return adapter

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Record that ``slot`` serves the adapter; refuse an adapter TGI was not started with."""
        max_slots = self._require_started().max_slots
        if not 0 <= slot < max_slots:
            raise ValueError(f"slot {slot} is out of range 0..{max_slots - 1}")
        if adapter.adapter_id not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise LoadError(
                adapter.adapter_id,
                "device",
                "TGI serves only the adapters it was started with (LORA_ADAPTERS) and would "
                f"answer any other adapter id with the base model; known: {known}. Add "
                f"{adapter.adapter_id}=<dir> to LORA_ADAPTERS, restart TGI and pass it in "
                "TGIBackend(adapters=...)",
            )
        if adapter.config.r > self.max_rank:
            raise LoadError(
                adapter.adapter_id, "device", f"rank {adapter.config.r} > max_rank {self.max_rank}"
            )
        for other, other_slot in list(self._slots.items()):
            if other_slot == slot and other != adapter.adapter_id:
                del self._slots[other]
        self._slots[adapter.adapter_id] = slot

    async def unload(self, adapter_id: str) -> None:
        """Forget the adapter's slot (TGI keeps the adapter: it cannot unload)."""
        self._slots.pop(adapter_id, None)

    # -- generation ------------------------------------------------------------------

    def _target(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        adapter = None
        if request.adapter_id is not None:
            slot = self._slots.get(request.adapter_id)
            if slot is None:
                raise BackendError(f"adapter {request.adapter_id!r} is not loaded")
            if request.slot is not None and slot != request.slot:
                raise BackendError(
                    f"adapter {request.adapter_id!r} is in slot {slot}, not {request.slot}"
                )
            adapter = self.adapters[request.adapter_id]
        if isinstance(request.prompt, str):
            return "/generate_stream", generate_body(request.prompt, request.params, adapter)
        unsent = [name for name in _GENERATE_ONLY if name in request.params.used()]
        if unsent:  # TGI's chat endpoint has no such fields
            raise UnsupportedParameter(type(self).__name__, [f"{n} (chat prompts)" for n in unsent])
        return "/v1/chat/completions", chat_body(request.prompt, request.params, adapter)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator closes the HTTP stream (TGI cancels)."""
        self.check_request(request)
        path, body = self._target(request)

        async def consume(response: httpx.Response) -> AsyncIterator[Chunk]:
            if response.status_code >= 400:
                await response.aread()
                _raise_status(response, self.transient_status)
            stream = _Stream(request, chat=path != "/generate_stream")
            async for event in sse_events(response):
                for chunk in stream.feed(event):
                    yield chunk
                if stream.done:
                    return
            for chunk in stream.end():
                yield chunk

        async for chunk in self._stream(path, body, consume):
            yield chunk


def _raise_status(response: httpx.Response, transient: frozenset[int]) -> None:
    """An error status before the stream: validation → InvalidRequest, transient → retry."""
    status, message = response.status_code, error_message(response)
    if status in (400, 422):
        raise InvalidRequest(f"TGI refused the request: {message}")
    error = BackendServerError(status, message, what="generate")
    if status in transient:
        raise RetryLater(f"HTTP {status}: {message}", final=error)
    raise error
