"""The example server's admin routes: ``GET /admin/audit`` (the registry's audit log).

Admin routes answer only an admin caller (:attr:`~lorapool.server.Caller.admin`: an
``ApiKeys`` entry with ``admin=True``, or a ``TrustedHeader`` admin tenant). Any other
caller gets one answer for every admin route, a 403 that names no route and says nothing
of what the route would hold (:func:`refusal`), and the refusal is recorded in the audit
log as ``access_denied``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from lorapool.errors import InvalidRequest
from lorapool.registry.audit import AuditLog

from .protocol import error_body

__all__ = ["ADMIN_ONLY", "MAX_AUDIT_PAGE", "audit_page", "refusal"]

ADMIN_ONLY = "this route needs an admin key"
"""The message of every admin route's refusal."""

MAX_AUDIT_PAGE = 1000
"""Entries one ``GET /admin/audit`` returns at most (``limit``; default 100)."""


def refusal() -> JSONResponse:
    """The answer to a caller that is not an admin, the same for every admin route."""
    return JSONResponse(error_body(ADMIN_ONLY, "permission_denied", 403), 403)


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and (not value or len(value) > 200):
        raise InvalidRequest(f"query parameter {name!r} must be 1 to 200 characters")
    return value


def _whole(request: Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be a whole number") from None
    if value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"query parameter {name!r} must be {bound}, got {value}")
    return value


def audit_page(log: AuditLog, request: Request) -> dict[str, Any]:
    """One page of the audit log for ``GET /admin/audit``.

    Query parameters: ``tenant``, ``adapter``, ``action`` (filters), ``after`` (entries
    past this ``seq``; page on with the last ``seq`` returned), ``limit`` (1 to
    :data:`MAX_AUDIT_PAGE`, default 100). The answer: ``{"object": "list", "data":
    [entries], "has_more": bool, "head": {"seq", "hash"}}``, the head being the whole
    log's newest entry (keep it elsewhere to check later that no entry was cut off).
    :class:`InvalidRequest` (400) for a bad parameter.
    """
    limit = _whole(request, "limit", 100, 1, MAX_AUDIT_PAGE)
    entries = log.entries(
        tenant=_text(request, "tenant"),
        adapter=_text(request, "adapter"),
        action=_text(request, "action"),
        after=_whole(request, "after", 0, 0, 2**62),
        limit=limit + 1,
    )
    seq, digest = log.head()
    return {
        "object": "list",
        "data": [e.as_dict() for e in entries[:limit]],
        "has_more": len(entries) > limit,
        "head": {"seq": seq, "hash": digest},
    }
