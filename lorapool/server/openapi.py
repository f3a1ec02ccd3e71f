"""The server's OpenAPI 3.1 document, served at ``GET /openapi.json``.

The routes, their statuses and the response shapes are written out here, once; the
request bodies' schemas come from the pydantic models that validate them
(:mod:`lorapool.server.protocol`), so what the document says a body may hold is what the
server accepts. ``scripts/fuzz_server.py`` fuzzes a real server against it (``make
test``).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from lorapool._version import __version__

from .protocol import ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"


def _object(properties: dict[str, Any], *required: str, **extra: Any) -> dict[str, Any]:
    """A JSON object schema with these ``properties``, ``required`` ones and ``extra`` keys."""
    return {"type": "object", "required": list(required), "properties": properties, **extra}


_INT = {"type": "integer"}
_STR = {"type": "string"}
_OPTIONAL_STR = {"type": ["string", "null"]}

_ERROR = _object(
    {
        "error": _object(
            {
                "message": {**_STR, "description": "What was wrong and what to do."},
                "type": _STR,
                "param": _OPTIONAL_STR,
                "code": _INT,
            },
            "message",
            "type",
            "code",
        )
    },
    "error",
    description="OpenAI's error JSON.",
)
_USAGE = _object(
    {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)


_NULLABLE_OBJECT = {"type": ["object", "null"]}


def _completion(obj: str, field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A completion object with a choice per sample, each carrying ``field`` (its text or
    message) and its logprobs (chat's ``{"content": [...]}`` or the legacy shape)."""
    choice = _object(
        {
            "index": _INT,
            field: schema,
            "logprobs": _NULLABLE_OBJECT,
            "finish_reason": _OPTIONAL_STR,
        },
        "index",
        field,
        "finish_reason",
    )
    usage = {"anyOf": [{"$ref": "#/components/schemas/Usage"}, {"type": "null"}]}
    return _object(
        {
            "id": _STR,
            "object": {"const": obj},
            "created": _INT,
            "model": _STR,
            "system_fingerprint": _STR,
            "choices": {"type": "array", "items": choice},
            "usage": usage,
        },
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
    )


_TOOL_CALL = _object(
    {
        "id": _STR,
        "type": {"const": "function"},
        "function": _object(
            {"name": _STR, "arguments": {**_STR, "description": "The arguments' JSON text."}},
            "name",
            "arguments",
        ),
    },
    "id",
    "type",
    "function",
)
_COMPLETION = _completion("text_completion", "text", _STR)
_MESSAGE = _object(
    {
        "role": {"const": "assistant"},
        "content": {**_OPTIONAL_STR, "description": "Null when the answer is tool calls."},
        "refusal": {"type": "null"},
        "tool_calls": {"type": "array", "items": _TOOL_CALL},
    },
    "role",
    "content",
)
_CHAT_COMPLETION = _completion("chat.completion", "message", _MESSAGE)
_MODEL = _object(
    {
        "id": _STR,
        "object": {"const": "model"},
        "created": _INT,
        "owned_by": _STR,
        "parent": _OPTIONAL_STR,
    },
    "id",
    "object",
    "owned_by",
)
_MODELS = _object(
    {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}, "object", "data"
)


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


_AUTHENTICATED = {
    "401": _error("No API key, or one the server does not know."),
    "503": _error("The server is draining, or the registry cannot be read or written now."),
}
_BODY_ERRORS = {
    "400": _error(
        "The body is not valid JSON or not a valid request, or it sets a field the server "
        "does not know or cannot honour (`param` names the field)."
    ),
    "413": _error("The body is larger than the server's limit (`max_body_bytes`)."),
}
_GENERATION_ERRORS = {
    **_AUTHENTICATED,
    **_BODY_ERRORS,
    "403": _error("The adapter belongs to another tenant."),
    "404": _error("No such adapter."),
    "429": _error("The tenant's rate limit; see `Retry-After`."),
    "502": _error("The engine failed serving the request."),
    "503": _error("Overloaded, cold start refused, adapter load failed or draining."),
    "504": _error("The request's deadline passed while it waited."),
}
_REGISTRATION_ERRORS = {
    **_AUTHENTICATED,
    **_BODY_ERRORS,
    "403": _error("Another tenant's adapter, or `shared` without an admin key."),
    "404": _error("No such adapter, or its source does not exist."),
    "409": _error("The name is taken, or the adapter carries traffic."),
    "501": _error("The source's scheme needs an extra that is not installed."),
    "502": _error("The source failed for now; try again."),
    "507": _error("The disk tier has no room."),
}


def _post(summary: str, body: str, ok: dict[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=body)}}},
            },
            "responses": {"200": ok, **errors},
        }
    }


def _get(summary: str, ok: dict[str, Any], *, public: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": ok}}
    if public:
        operation["security"] = []
    else:
        operation["responses"].update(_AUTHENTICATED)
    return {"get": operation}


_GENERATION_HEADERS = {
    "x-lorapool-served-by": {
        "description": "`adapter`, or `base` when the base model answered a request for an "
        'adapter (a cold start under `cold_start = "fallback"`; `model` then names the '
        "base model).",
        "schema": {"type": "string", "enum": ["adapter", "base"]},
    },
    "x-request-id": {
        "description": "The client's `x-request-id` when it sent a sane one (at most 128 of "
        "`A-Za-z0-9._:/+=-`), else the completion's id. Every response carries one.",
        "schema": {"type": "string"},
    },
}


def _generation(schema: str) -> dict[str, Any]:
    return {
        "description": "The completion; with `stream`, server-sent events ending `data: [DONE]` "
        "(`: ping` comment lines while no token comes; a stream cut by the server's shutdown "
        "timeout ends with an error event, then `data: [DONE]`).",
        "headers": _GENERATION_HEADERS,
        "content": {
            "application/json": {"schema": {"$ref": _REF.format(model=schema)}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }


_AUDIT_ENTRY = _object(
    {
        "seq": _INT,
        "at": {"type": "number", "description": "Unix seconds."},
        "action": {
            **_STR,
            "description": "register, unregister, rollback, promote, promotion_refused, "
            "signature_refused, forget, access_denied.",
        },
        "tenant": _OPTIONAL_STR,
        "adapter": _OPTIONAL_STR,
        "actor": _OPTIONAL_STR,
        "detail": {"type": "object"},
        "prev": {**_STR, "description": "The sha256 of the entry before (64 zeros: none)."},
        "hash": {**_STR, "description": "The sha256 of this entry's fields and `prev`."},
    },
    "seq",
    "at",
    "action",
    "tenant",
    "adapter",
    "actor",
    "detail",
    "prev",
    "hash",
)
_AUDIT_PAGE = _object(
    {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
        "has_more": {"type": "boolean"},
        "head": _object({"seq": _INT, "hash": _STR}, "seq", "hash"),
    },
    "object",
    "data",
    "has_more",
    "head",
)


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _admin_audit() -> dict[str, Any]:
    text = {"type": "string", "minLength": 1, "maxLength": 200}
    return {
        "get": {
            "summary": "The audit log, oldest first (admin keys only).",
            "parameters": [
                _query("tenant", text, "Only entries about this tenant."),
                _query("adapter", text, "Only entries about this adapter id."),
                _query("action", text, "Only this action."),
                _query(
                    "after",
                    {"type": "integer", "minimum": 0, "maximum": 2**62},
                    "Only entries past this `seq` (page on with the last one returned).",
                ),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "At most this many entries.",
                ),
            ],
            "responses": {
                "200": _json("A page of entries.", {"$ref": "#/components/schemas/AuditPage"}),
                **_AUTHENTICATED,
                "400": _error("A query parameter is not valid (the message names it)."),
                "403": _error("Not an admin key (the same answer for every admin route)."),
                "501": _error("The pools run elsewhere (Ray Serve): read the log with the CLI."),
            },
        }
    }


@cache
def _document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (CompletionRequest, "validation"),
            (ChatRequest, "validation"),
            (LoadAdapterRequest, "validation"),
            (UnloadAdapterRequest, "validation"),
        ],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(defs["$defs"])
    schemas.update(
        Error=_ERROR,
        Usage=_USAGE,
        Completion=_COMPLETION,
        ChatCompletion=_CHAT_COMPLETION,
        ModelList=_MODELS,
        AuditEntry=_AUDIT_ENTRY,
        AuditPage=_AUDIT_PAGE,
    )
    paths = {
        "/v1/completions": _post(
            "A completion of a prompt, by the base model or an adapter (`model`).",
            "CompletionRequest",
            _generation("Completion"),
            _GENERATION_ERRORS,
        ),
        "/v1/chat/completions": _post(
            "A chat completion, by the base model or an adapter (`model`).",
            "ChatRequest",
            _generation("ChatCompletion"),
            _GENERATION_ERRORS,
        ),
        "/v1/models": _get(
            "The base model and the adapters the caller may use.",
            _json("The models.", {"$ref": "#/components/schemas/ModelList"}),
            public=False,
        ),
        "/v1/load_lora_adapter": _post(
            "Register an adapter for the caller's tenant (vLLM's body).",
            "LoadAdapterRequest",
            _text("Registered."),
            {**_REGISTRATION_ERRORS, "400": _error("Invalid body, source or adapter.")},
        ),
        "/v1/unload_lora_adapter": _post(
            "Remove one of the caller's adapters once its requests finished.",
            "UnloadAdapterRequest",
            _text("Removed."),
            _REGISTRATION_ERRORS,
        ),
        "/health": _get("Liveness: the process answers.", _text("`ok`."), public=True),
        "/ready": {
            "get": {
                "summary": "Readiness: the backend started and answers; 503 while draining.",
                "security": [],
                "responses": {
                    "200": _json("Ready.", {"type": "object"}),
                    "503": _json("Not ready.", {"type": "object"}),
                },
            }
        },
        "/metrics": _get("Prometheus metrics.", _text("The metrics' text format."), public=True),
        "/openapi.json": _get(
            "This document.", _json("OpenAPI 3.1.", {"type": "object"}), public=True
        ),
        "/admin/audit": _admin_audit(),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lorapool: an OpenAI-compatible server over many tenants' LoRA adapters",
            "version": __version__,
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of :func:`~lorapool.server.create_app`'s routes (a copy)."""
    return copy.deepcopy(_document())
