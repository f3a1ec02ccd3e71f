"""An OpenAI-compatible HTTP server over an :class:`~lorapool.AdapterPool` (extra ``server``).

``create_app(pool, auth=ApiKeys({...}))`` returns a Starlette app; serve it with
uvicorn (see ``examples/openai_server.py``, which builds the pool from a TOML
config file).
"""

from __future__ import annotations

try:
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without the extra
    from lorapool.errors import ExtraNotInstalled

    raise ExtraNotInstalled("lorapool.server", "server", str(exc)) from exc

from .app import create_app
from .auth import ApiKeys, Auth, Caller, Registration, TrustedHeader, Unauthorized
from .served import LocalPool, Served, ServedTools

__all__ = [
    "ApiKeys",
    "Auth",
    "Caller",
    "LocalPool",
    "Registration",
    "Served",
    "ServedTools",
    "TrustedHeader",
    "Unauthorized",
    "create_app",
]
