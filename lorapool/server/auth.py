"""Who is calling (API keys mapped to tenants, or a trusted gateway's tenant header), and
what a caller may register (:class:`Registration`)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from starlette.requests import Request

from lorapool.access import SourceRules
from lorapool.errors import SourceNotAllowed

__all__ = ["ApiKeys", "Auth", "Caller", "Registration", "TrustedHeader", "Unauthorized"]


class Unauthorized(Exception):
    """No credentials, or credentials that name no tenant (HTTP 401)."""


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: its tenant, and whether it may manage shared adapters."""

    tenant: str
    admin: bool = False


class Auth(Protocol):
    """Turns a request into a :class:`Caller` or raises :class:`Unauthorized`."""

    def authenticate(self, request: Request) -> Caller:
        """The caller of ``request``."""
        ...


class ApiKeys:
    """``Authorization: Bearer <key>``; each key names a tenant (and maybe admin rights).

    ``keys`` maps a key to a tenant name or to a :class:`Caller`. Keys are
    compared in constant time.
    """

    def __init__(self, keys: Mapping[str, str | Caller]) -> None:
        self._keys = {k: v if isinstance(v, Caller) else Caller(v) for k, v in keys.items() if k}

    def authenticate(self, request: Request) -> Caller:
        """The caller whose key is in the ``Authorization`` header."""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        key = key.strip()
        for known, caller in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return caller
        raise Unauthorized("invalid API key")


class TrustedHeader:
    """Behind a gateway that authenticated the caller: the tenant is in ``header``.

    Only use it when the server is reachable from the gateway alone.
    ``admin_tenants`` may manage shared adapters.
    """

    def __init__(self, header: str = "x-tenant-id", *, admin_tenants: frozenset[str] = frozenset()):
        self.header = header.lower()
        self.admin_tenants = admin_tenants

    def authenticate(self, request: Request) -> Caller:
        """The caller named by the header."""
        tenant = request.headers.get(self.header, "").strip()
        if not tenant:
            raise Unauthorized(f"missing {self.header} header (trusted-gateway mode)")
        return Caller(tenant, tenant in self.admin_tenants)


@dataclass(frozen=True)
class Registration:
    """Who may register adapters over HTTP, and from which sources (two roles).

    Tenant keys register from ``tenant_sources`` (or their own entry in
    ``per_tenant``), admin keys from ``admin_sources``; each is a list of
    :class:`~lorapool.access.SourceRules` prefixes (``{tenant}`` is the
    caller's tenant). ``tenants_may_register=False`` leaves registration to
    admins. The default allows nothing: an operator opts sources in.
    """

    tenant_sources: tuple[str, ...] = ()
    admin_sources: tuple[str, ...] = ()
    per_tenant: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tenants_may_register: bool = True

    def __post_init__(self) -> None:
        for sources in (self.tenant_sources, self.admin_sources, *self.per_tenant.values()):
            SourceRules(sources=tuple(sources))  # a malformed rule fails at start, not per call

    def rules_for(self, caller: Caller) -> SourceRules:
        """The sources ``caller`` may register from; :class:`SourceNotAllowed` if none."""
        if caller.admin:
            return SourceRules(sources=tuple(self.admin_sources))
        if not self.tenants_may_register:
            raise SourceNotAllowed("*", "only admin keys may register adapters here")
        sources = self.per_tenant.get(caller.tenant, self.tenant_sources)
        return SourceRules(sources=tuple(sources))
