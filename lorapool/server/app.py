"""``create_app``: an OpenAI-compatible HTTP server over an :class:`AdapterPool` (Starlette).

Routes: ``POST /v1/completions`` and ``/v1/chat/completions`` (streaming with
SSE, usage in the last chunk when ``stream_options.include_usage``), ``GET
/v1/models`` (the base model and the caller's adapters only), ``POST
/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's bodies, scoped
to the caller's tenant), ``GET /health``, ``/ready`` and ``/metrics``, and for admin
keys only ``GET /admin/audit`` (the audit log; :mod:`lorapool.server.admin`).

Errors use OpenAI's JSON: 401 no or bad key, 403 another tenant's adapter,
404 unknown adapter, 400 bad body, 413 a body over ``max_body_bytes``, 429 with
``Retry-After`` when rate limited, 503 with ``Retry-After`` when overloaded or a
cold start is refused; every :class:`~lorapool.errors.LorapoolError` has a status
of its own (``_STATUS``), and anything else is a JSON 500 whose traceback is logged.
A client that disconnects cancels its request in the engine. One structured
log line per request (tenant, adapter, tokens, TTFT, queue time, served_by),
never the prompt unless ``log_prompts``.

The work a request costs before it is refused is bounded: the body is read up to
``max_body_bytes`` (a larger ``Content-Length`` is refused unread), a prompt longer
than the context could hold is refused before it is tokenized (``max_prompt_chars``),
and tokenizing happens off the event loop (the backend's ``aencode``), so ``/health``
and everyone else's requests go on meanwhile. ``GET /openapi.json`` describes the API.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from lorapool.backends.base import BaseBackend, refuse_long_prompt
from lorapool.errors import (
    AccessDenied,
    AdapterExists,
    AdapterInUse,
    AdapterNotFound,
    AdapterValidationError,
    BackendClosed,
    BackendError,
    BackendNotStarted,
    ColdStartRejected,
    DeadlineExceeded,
    DiskFull,
    ExtraNotInstalled,
    InvalidRequest,
    LoadError,
    LorapoolError,
    Overloaded,
    PinLimitExceeded,
    PluginNotFound,
    PoolClosed,
    RateLimited,
    RegistryUnavailable,
    SignatureError,
    SourceError,
    SourceNotAllowed,
    SourceNotFound,
    UnsupportedParameter,
)
from lorapool.pool import AdapterPool, Gathered
from lorapool.types import Chunk, Prompt, SamplingParams, Usage

from .admin import audit_page, refusal
from .auth import Auth, Caller, Registration, Unauthorized
from .drain import Drain, ShuttingDown, paced
from .metrics import CONTENT_TYPE, MetricsConfig, ServerMetrics
from .openapi import openapi_document
from .protocol import (
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    error_body,
    sse,
)
from .responses import chat_response, completion_response, fingerprint, new_id
from .served import LocalPool, Served, ServedTools
from .streams import Answers

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_SSE_PING_INTERVAL",
    "REQUEST_ID_HEADER",
    "SERVED_BY_HEADER",
    "create_app",
]

log = logging.getLogger("lorapool.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
"""``create_app``'s default request-body limit: 4 MiB, far above any prompt a context of
128k tokens holds, far below what would stall the server to read and parse."""

DEFAULT_SSE_PING_INTERVAL = 15.0
"""Seconds a stream waits for its next token before it sends an SSE comment (``: ping``),
so proxies and clients with idle timeouts keep the connection."""

REQUEST_ID_HEADER = "x-request-id"
"""Every response carries it: the client's own (when sane) or one the server made."""

SERVED_BY_HEADER = "x-lorapool-served-by"
"""On generation responses: ``adapter``, or ``base`` when the base model answered a
request for an adapter (a cold start under ``cold_start = "fallback"``)."""

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
"""What a client's ``x-request-id`` may be to be echoed (else the server makes one)."""
_REQUEST_ID_KEY = "lorapool.request_id"
_PING = b": ping\n\n"

_RETRYABLE = (RateLimited, Overloaded, ColdStartRejected, ShuttingDown)
_REGISTRY_MESSAGE = (
    "the adapter registry could not record or read this change, so nothing was changed: "
    "retry in a few seconds, and if it persists tell the server's operator (its log says why)"
)
_INTERNAL_MESSAGE = (
    "internal error; nothing about your request caused it. Retry; if it persists, tell the "
    "server's operator the time of the request (its log has the details)"
)


class _TooLarge(Exception):
    """The request's body is over the server's limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the request body is too large: this server accepts at most {limit} bytes; "
            "send a shorter prompt"
        )


_STATUS: list[tuple[type[BaseException], int, str]] = [
    (_TooLarge, 413, "request_too_large"),
    (RateLimited, 429, "rate_limit_exceeded"),
    (Overloaded, 503, "overloaded"),
    (ColdStartRejected, 503, "adapter_loading"),
    (AccessDenied, 403, "permission_denied"),
    (SourceNotAllowed, 403, "permission_denied"),
    (SignatureError, 403, "signature_refused"),  # the adapter's signature, not the caller
    (AdapterNotFound, 404, "model_not_found"),
    (AdapterExists, 409, "conflict"),
    (AdapterInUse, 409, "adapter_in_use"),
    (AdapterValidationError, 400, "invalid_adapter"),
    (SourceNotFound, 404, "not_found"),
    (SourceError, 502, "source_unavailable"),  # a permanent one: 400 (_describe)
    (RegistryUnavailable, 503, "registry_unavailable"),
    (PluginNotFound, 400, "invalid_request_error"),
    (ExtraNotInstalled, 501, "not_implemented"),
    (InvalidRequest, 400, "invalid_request_error"),
    (DeadlineExceeded, 504, "timeout"),
    (PinLimitExceeded, 409, "conflict"),
    (DiskFull, 507, "insufficient_storage"),
    (LoadError, 503, "adapter_load_failed"),
    (PoolClosed, 503, "unavailable"),
    (ShuttingDown, 503, "unavailable"),
    (BackendNotStarted, 503, "unavailable"),
    (BackendClosed, 503, "unavailable"),
    (BackendError, 502, "backend_error"),
]


def _bearer_is(request: Request, key: str | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <key>`` (constant-time)."""
    if not key:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _describe(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """Status, OpenAI error type, message and headers for an error (500: unexpected)."""
    for kind, status, name in _STATUS:
        if not isinstance(exc, kind):
            continue
        headers = {}
        message = str(exc)
        retry = exc.retry_after if isinstance(exc, _RETRYABLE) else None
        if isinstance(exc, AdapterValidationError):
            name = f"invalid_adapter:{exc.reason}"
        elif isinstance(exc, SourceError) and not exc.transient:
            status, name = 400, "source_error"
            message += "; the source refused it for good: check lora_path and its permissions"
        elif isinstance(exc, SourceError):
            message += "; the source failed for now: try again in a few seconds"
        elif isinstance(exc, RegistryUnavailable):
            log.error("registry unavailable: %s", exc)  # the cause is the operator's
            message, retry = _REGISTRY_MESSAGE, 5.0
        elif isinstance(exc, (PoolClosed, BackendNotStarted, BackendClosed)):
            message, retry = "the server is not serving now; retry in a few seconds", 5.0
        if retry is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry)))
        return status, name, message, headers
    log.error("unexpected error", exc_info=exc)
    return 500, "internal_error", _INTERNAL_MESSAGE, {}


def _param(exc: BaseException) -> str | None:
    """The request field an error is about (OpenAI's ``param``), where it names one."""
    if isinstance(exc, UnsupportedParameter):
        names = [_FIELD.get(p.partition(".")[0], p) for p in exc.parameters]
        return ", ".join(dict.fromkeys(names))
    return None


_FIELD = {"structured": "response_format"}
"""SamplingParams' names that OpenAI's request spells otherwise."""


def _error(exc: BaseException) -> Response:
    """The HTTP response for an error: its status, OpenAI's JSON (500 for the unexpected)."""
    status, name, message, headers = _describe(exc)
    return JSONResponse(error_body(message, name, status, _param(exc)), status, headers=headers)


def _bad_body(exc: ValidationError | ValueError) -> Response:
    """A 400 for a body that is not a valid request, naming the field (``param``)."""
    param: str | None = None
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        context = first.get("ctx") or {}
        if first.get("type") == "extra_forbidden":
            message, param = f"Unrecognized request argument supplied: {where}", where
        elif first.get("type") == "unsupported_value":
            param = str(context.get("name"))
            message = str(first.get("msg"))
        else:
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
            param = where or None
    else:
        message = str(exc)
    return JSONResponse(error_body(message, "invalid_request_error", 400, param), 400)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, read up to ``limit`` bytes; :class:`_TooLarge` beyond.

    A declared ``Content-Length`` over the limit is refused before anything is read; a
    body without one (chunked) is counted as it arrives, and no more than ``limit + 1``
    bytes of it are ever kept.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _TooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk[: limit + 1 - len(body)]
        if len(body) > limit:
            raise _TooLarge(limit)
    return bytes(body)


class _RequestIds:
    """The request's id: the client's ``x-request-id`` when sane, else set by a handler
    (a generation's completion id) or made when the response starts."""

    def __init__(self, given: str | None) -> None:
        self.id = given if given is not None and _REQUEST_ID.fullmatch(given) else None
        self.given = self.id is not None

    def settle(self, fallback: str | None = None) -> str:
        """The id, fixed now: the client's, else ``fallback``, else a new one."""
        if self.id is None:
            self.id = fallback if fallback is not None else new_id("req")
        return self.id


class _App(Starlette):
    """Starlette that puts ``x-request-id`` on every HTTP response, errors and 404s too."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request, adding its id to the response's headers."""
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        ids = _RequestIds(given)
        scope[_REQUEST_ID_KEY] = ids

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"x-request-id"]
                headers.append((b"x-request-id", ids.settle().encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_id)


def request_ids(request: Request) -> _RequestIds:
    """The request's id holder (set by the app for every HTTP request)."""
    ids = request.scope.get(_REQUEST_ID_KEY)
    return ids if isinstance(ids, _RequestIds) else _RequestIds(None)


async def _not_found(request: Request, exc: Exception) -> Response:
    """OpenAI's JSON for a path or method the API does not have."""
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    if status == 405:
        message, kind = (
            f"method {request.method} is not allowed on {request.url.path}",
            "invalid_request_error",
        )
    else:
        message, kind = f"no such route: {request.method} {request.url.path}", "not_found"
    return JSONResponse(error_body(message, kind, status), status)


def create_app(
    pool: AdapterPool | Served,
    *,
    auth: Auth,
    default_max_tokens: int = 256,
    shutdown_timeout: float = 30.0,
    log_prompts: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_chars: int | None = None,
    registration: Registration | None = None,
    metrics_key: str | None = None,
    metrics_public: bool = False,
    on_start: Callable[[Served], Awaitable[None]] | None = None,
    metrics_config: MetricsConfig | None = None,
    sse_ping_interval: float | None = DEFAULT_SSE_PING_INTERVAL,
    drain_retry_after: int = 5,
) -> Starlette:
    """An ASGI app serving ``pool`` with the OpenAI API; run it with uvicorn.

    ``pool`` is an :class:`~lorapool.AdapterPool` or anything :class:`Served`
    (pools on Ray Serve replicas: :mod:`lorapool.integrations.ray_serve`).
    ``auth`` maps each request to a tenant (:class:`~lorapool.server.ApiKeys`
    or :class:`~lorapool.server.TrustedHeader`). The app starts the pool on
    startup and, on shutdown, stops accepting requests, lets streams in
    flight finish for up to ``shutdown_timeout`` seconds, then closes it.

    ``max_body_bytes`` (default :data:`DEFAULT_MAX_BODY_BYTES`, 4 MiB) bounds a request's
    body: a larger one is answered 413 without being read further.
    ``max_prompt_chars`` bounds a prompt's characters (a completion's prompt, or a chat's
    messages together): a longer one is a 400 before it is queued or tokenized. ``None``
    takes the backend's own bound once it started (``BaseBackend.max_prompt_chars``: what
    its context could hold), or none where the backend offers none.

    ``registration`` says who may register adapters (``POST /v1/load_lora_adapter``)
    and from which sources (:class:`~lorapool.server.Registration`); the default
    allows nothing. ``/metrics`` names tenants, so it answers only a request with
    ``Authorization: Bearer <metrics_key>``, or anyone with ``metrics_public``;
    otherwise it is 404 here (serve it on a listener of its own, as the example's
    ``metrics_port`` does).

    ``on_start`` is awaited with the started :class:`Served` during startup, before the
    app takes requests and before ``/ready`` says ready (register the config's adapters
    there). ``metrics_config`` configures the metrics (label caps: :class:`MetricsConfig`).

    Shutdown drains (``app.state.drain``, a :class:`~lorapool.server.drain.Drain`): new
    requests get a 503 with ``Retry-After: drain_retry_after``, ``/ready`` a 503, while
    requests in flight go on for up to ``shutdown_timeout`` seconds; a stream still
    running then ends with an SSE error event and ``data: [DONE]``. Under
    :func:`lorapool.server.run.serve` the drain starts at the signal, with the listener
    still up; under a plain uvicorn it starts at the lifespan's shutdown.

    Streams send ``: ping`` (an SSE comment) after every ``sse_ping_interval`` seconds
    without a token (``None``: never). Every response has ``x-request-id``; generation
    responses have ``x-lorapool-served-by`` (``adapter`` or ``base``), and an answer the
    base model gave for an adapter names the base model in ``model``.
    """
    if sse_ping_interval is not None and sse_ping_interval <= 0:
        sse_ping_interval = None
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    metrics = ServerMetrics(pool if isinstance(pool, AdapterPool) else None, config=metrics_config)
    rules = registration if registration is not None else Registration()
    served: Served = LocalPool(pool) if isinstance(pool, AdapterPool) else pool
    state: dict[str, Any] = {"max_prompt_chars": max_prompt_chars}
    drain = Drain(shutdown_timeout, retry_after=drain_retry_after)

    def unavailable() -> Response:
        message = "the server is shutting down; retry (another replica will answer)"
        return JSONResponse(
            error_body(message, "unavailable", 503),
            503,
            headers={"Retry-After": str(drain.retry_after), "Connection": "close"},
        )

    def base_model() -> str:
        return served.base_model()

    def resolve_model(model: str) -> str | None:
        """``None`` for the base model, else the adapter id (``base:adapter`` accepted)."""
        base = base_model()
        if model in (base, ""):
            return None
        prefix = f"{base}:"
        return model[len(prefix) :] if model.startswith(prefix) else model

    def tier_of(tenant: str) -> str:
        return served.tier_of(tenant)

    async def caller_of(request: Request) -> Caller:
        return auth.authenticate(request)

    local = pool if isinstance(pool, AdapterPool) else None  # its audit log, when in-process

    def denied(caller: Caller, asked: str, adapter: str | None = None) -> None:
        """Record a refusal the server makes on purpose in the audit log."""
        if local is not None:
            local.record_denied(caller.tenant, asked, adapter, by="server")

    def admin_only(
        handler: Callable[[Request, Caller], Awaitable[Response]],
    ) -> Callable[[Request, Caller], Awaitable[Response]]:
        """An admin route: any other caller gets :func:`refusal` (the same for every one),
        recorded as ``access_denied``."""

        async def endpoint(request: Request, caller: Caller) -> Response:
            if not caller.admin:
                denied(caller, f"{request.method} {request.url.path}")
                return refusal()
            return await handler(request, caller)

        return endpoint

    def guarded(
        handler: Callable[[Request, Caller], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if drain.draining:
                return unavailable()
            try:
                caller = await caller_of(request)
            except Unauthorized as exc:
                return JSONResponse(error_body(str(exc), "authentication_error", 401), 401)
            try:
                return await handler(request, caller)
            except (ValidationError, ValueError) as exc:
                if isinstance(exc, LorapoolError):
                    return _error(exc)
                return _bad_body(exc)
            except Exception as exc:  # typed ones get their status; the rest a logged 500
                return _error(exc)

        return endpoint

    async def body_of(request: Request) -> Any:
        raw = await _read_body(request, max_body_bytes)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("the body is not valid JSON: it is nested too deeply") from None

    # -- generation ------------------------------------------------------------------

    async def generate(
        request: Request,
        caller: Caller,
        body: CompletionRequest | ChatRequest,
        prompt: Prompt,
        chat: bool,
    ) -> Response:
        refuse_long_prompt(body.prompt_chars(), state["max_prompt_chars"])
        adapter = resolve_model(body.model)
        params: SamplingParams = body.sampling(default_max_tokens)
        rid = new_id("chatcmpl" if chat else "cmpl")
        request_id = request_ids(request).settle(rid)
        tier = tier_of(caller.tenant)
        observed = metrics.begin(tier, caller.tenant, adapter)
        tools = body.tool_options() if isinstance(body, ChatRequest) else {}
        if tools and not isinstance(served, ServedTools):
            raise UnsupportedParameter(type(served).__name__, ["tools"])
        stream = (
            served.generate_tools(
                prompt, adapter=adapter, tenant=caller.tenant, params=params, **tools
            )
            if tools and isinstance(served, ServedTools)
            else served.generate(prompt, adapter=adapter, tenant=caller.tenant, params=params)
        )
        # In flight from here (queued included): the drain waits for it, or cuts it.
        drain.enter()
        reader = paced(stream, drain.cut, sse_ping_interval if body.stream else None)
        # Pull the first chunk before answering, so admission and lookup errors get their
        # status code instead of a broken stream, and who serves it (the adapter, or the
        # base model falling back for it) is known for the headers and ``model``.
        first: Chunk | None = None
        try:
            async for item in reader:
                if item is not None:
                    first = item
                    break
        except BaseException as exc:
            await reader.aclose()
            await stream.aclose()
            drain.leave()
            observed.refused(type(exc).__name__)
            raise
        ttft = observed.first_chunk()
        # Who serves a request is decided once, before its first token (the pool's cold
        # start), and holds for the whole stream, handoffs included: the first chunk says.
        served_by = first.served_by if first is not None else "adapter" if adapter else "base"
        fallback = adapter is not None and served_by == "base"
        model = base_model() if fallback else body.model
        headers = {SERVED_BY_HEADER: "base" if served_by == "base" else "adapter"}

        def finished(usage: Usage | None, outcome: str, served_by: str) -> None:
            drain.leave()
            elapsed = observed.finish(
                outcome,
                served_by=served_by,
                fallback=adapter is not None and served_by == "base",
                usage=usage,
            )
            extra: dict[str, Any] = {"prompt": prompt} if log_prompts else {}
            if body.user is not None:
                extra["user"] = body.user  # OpenAI's end-user id: the operator's to track
            safety = getattr(body, "safety_identifier", None)
            if safety is not None:
                extra["safety_identifier"] = safety
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "completion_id": rid,
                    "tenant": caller.tenant,
                    "adapter": adapter,
                    "model": model,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None,
                    "ttft_s": round(ttft, 4),
                    "seconds": round(elapsed, 4),
                    "served_by": served_by,
                    "fallback": adapter is not None and served_by == "base",
                    "outcome": outcome,
                    **extra,
                },
            )

        fp = fingerprint(base_model())
        if not body.stream:
            gathered = Gathered()
            try:
                if first is not None:
                    gathered.add(first)
                async for chunk in reader:
                    if chunk is not None:
                        gathered.add(chunk)
                done = gathered.completion(adapter)
            except BaseException:
                await reader.aclose()
                await stream.aclose()
                finished(None, "error", served_by)
                raise
            finished(done.usage, "ok", done.served_by)
            answer = chat_response if chat else completion_response
            return JSONResponse(
                answer(rid, model, fp, done, logprobs=params.logprobs), headers=headers
            )

        answers = Answers(rid, model, fp, chat, params, body.include_usage)

        async def events() -> AsyncIterator[bytes]:
            usage: Usage | None = None
            outcome, by = "cancelled", served_by

            def said(chunk: Chunk) -> bytes:
                nonlocal usage, by
                by = chunk.served_by
                if chunk.usage is not None:
                    usage = chunk.usage
                event = answers.event(chunk)
                return sse(event) if event is not None else b""

            try:
                for opening in answers.opening():
                    yield sse(opening)
                if first is not None and (data := said(first)):
                    yield data
                async for chunk in reader:
                    if chunk is None:
                        yield _PING  # an SSE comment: clients ignore it, proxies see bytes
                        continue
                    observed.chunk(len(chunk.token_ids))
                    if data := said(chunk):
                        yield data
                if body.include_usage and usage is not None:
                    yield sse(answers.usage(usage))
                yield sse("[DONE]")
                outcome = "ok"
            except Exception as exc:  # the status is sent: the error goes in the stream
                outcome = type(exc).__name__
                status, name, message, _ = _describe(exc)
                yield sse(error_body(message, name, status, _param(exc)))
                if isinstance(exc, ShuttingDown):
                    yield sse("[DONE]")  # cut by the drain: a well-formed end all the same
            finally:
                await reader.aclose()
                await stream.aclose()  # a disconnected client cancels the request here
                finished(usage, outcome, by)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    async def completions(request: Request, caller: Caller) -> Response:
        body = CompletionRequest.model_validate(await body_of(request))
        return await generate(request, caller, body, body.text, chat=False)

    async def chat_completions(request: Request, caller: Caller) -> Response:
        body = ChatRequest.model_validate(await body_of(request))
        return await generate(request, caller, body, body.chat(), chat=True)

    # -- models and adapters -----------------------------------------------------------

    async def models(request: Request, caller: Caller) -> Response:
        base = base_model()
        created = int(time.time())
        data = [
            {
                "id": base,
                "object": "model",
                "created": created,
                "owned_by": "lorapool",
                "parent": None,
            }
        ]
        for info in await served.adapters(caller.tenant):
            data.append(
                {
                    "id": info.adapter_id,
                    "object": "model",
                    "created": created,
                    "owned_by": info.tenant if not info.shared else "shared",
                    "parent": base,
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def load_adapter(request: Request, caller: Caller) -> Response:
        body = LoadAdapterRequest.model_validate(await body_of(request))
        if body.shared and not caller.admin:
            denied(caller, "register a shared adapter", body.lora_name[:200])
            message = "only admin keys may register shared adapters"
            return JSONResponse(error_body(message, "permission_denied", 403), 403)
        try:
            allowed = rules.rules_for(caller)  # SourceNotAllowed (403) when it may not register
        except SourceNotAllowed:
            denied(caller, "register", body.lora_name[:200])
            raise
        info = await served.register(
            body.lora_name,
            body.lora_path,
            tenant=caller.tenant,
            shared=body.shared,
            allowed=allowed,
        )
        return PlainTextResponse(f"Success: LoRA adapter '{info.adapter_id}' added successfully.")

    async def unload_adapter(request: Request, caller: Caller) -> Response:
        body = UnloadAdapterRequest.model_validate(await body_of(request))
        await served.unregister(body.lora_name, tenant=caller.tenant)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # -- operations ------------------------------------------------------------------

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def ready(request: Request) -> Response:
        if drain.draining or not await served.ready():
            return JSONResponse({"ready": False}, 503)
        return JSONResponse({"ready": True, "model": base_model()})

    async def metrics_endpoint(request: Request) -> Response:
        if not metrics_public and not _bearer_is(request, metrics_key):
            return JSONResponse(error_body("not found", "not_found", 404), 404)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def admin_audit(request: Request, caller: Caller) -> Response:
        if local is None:
            message = "this server's pools keep their audit log elsewhere (read it with the CLI)"
            return JSONResponse(error_body(message, "not_implemented", 501), 501)
        return JSONResponse(audit_page(local.audit, request))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await served.start()
        if on_start is not None:
            await on_start(served)
        if state["max_prompt_chars"] is None and isinstance(pool, AdapterPool):
            backend = pool.backend
            if isinstance(backend, BaseBackend):
                state["max_prompt_chars"] = await asyncio.to_thread(
                    lambda: backend.max_prompt_chars
                )
        try:
            yield
        finally:
            await drain.run()  # already done when the runner drained at the signal
            await served.aclose()

    routes = [
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/load_lora_adapter", guarded(load_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", guarded(unload_adapter), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/admin/audit", guarded(admin_only(admin_audit)), methods=["GET"]),
    ]
    app = _App(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_found},
    )
    app.state.metrics = metrics
    app.state.drain = drain
    return app
