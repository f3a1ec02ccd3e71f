"""A served pool described by one TOML file and the environment: model, backend, tiers, keys.

Example (``examples/server.toml`` is a complete one)::

    [backend]
    kind = "torch"            # a name in the lorapool.backends entry points
    model = "~/.cache/lorapool/models/SmolLM2-135M-Instruct"
    max_slots = 4
    max_rank = 16

    [store]
    host_bytes = "2GiB"
    disk_dir = "/var/cache/lorapool"
    eviction = "wtinylfu"

    [tiers.gold]
    weight = 3
    cold_start = "fallback"

    [keys]
    "sk-acme" = { tenant = "acme", tier = "gold" }

Every setting can also come from an environment variable named ``LORAPOOL_`` and its
path, sections joined by ``__`` (``LORAPOOL_BACKEND__MAX_SLOTS=8``,
``LORAPOOL_SERVER__PORT=9000``; tables as JSON: ``LORAPOOL_KEYS='{"sk-x": {"tenant":
"acme"}}'``); the environment wins over the file (pydantic-settings).

The backend is found by ``kind`` through the ``lorapool.backends`` entry points and
built with its ``from_config(model, max_slots=..., max_rank=..., max_batch=...,
**options)``, so an installed package's backend is configured like a built-in one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from starlette.applications import Starlette

from lorapool.abc import Backend, Source
from lorapool.access import SourceRules
from lorapool.backends.base import build_backend
from lorapool.plugins import BACKENDS, SOURCES, available, load_source
from lorapool.pool import AdapterPool
from lorapool.registry import Registry
from lorapool.scheduler import FairScheduler, TenantConfig, TierPolicy
from lorapool.store import TieredStore

from .app import create_app
from .auth import ApiKeys, Auth, Caller, Registration, TrustedHeader
from .served import Served

__all__ = ["ServerConfig", "load_config"]

ENV_PREFIX = "LORAPOOL_"
"""Environment variables that set the server config start with this."""


def _registered(group: str, name: str, what: str) -> str:
    names = available(group)
    if name not in names:
        raise ValueError(
            f"no {what} named {name!r} is installed; available: {names} "
            f"(a package declares one in the {group} entry-point group)"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfig(_Strict):
    """Which engine, and its slots and rank."""

    kind: str = "torch"
    """The backend's name in the ``lorapool.backends`` entry points: ``torch``, ``vllm``,
    ``openai``, ``sglang``, ``tgi``, or one an installed package declares."""
    model: str | None = None
    """Model directory (torch, vllm, sglang) or the server's base URL (openai, tgi)."""
    max_slots: int = Field(default=4, ge=1)
    max_rank: int = Field(default=16, ge=1)
    max_batch: int = Field(default=32, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the backend's constructor."""

    @field_validator("kind")
    @classmethod
    def _installed(cls, kind: str) -> str:
        return _registered(BACKENDS, kind, "backend")

    def build(self) -> Backend:
        """The backend, not started: ``from_config(model, max_slots=..., ..., **options)``."""
        return build_backend(
            self.kind,
            self.model,
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            max_batch=self.max_batch,
            **self.options,
        )


class StoreConfig(_Strict):
    """Tier sizes and eviction policy."""

    host_bytes: str | int = "2GiB"
    disk_dir: str | None = None
    disk_bytes: str | int | None = None
    eviction: str | dict[str, str] | None = None
    sources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per URI scheme, the settings of its source (found through the ``lorapool.sources``
    entry points): ``[store.sources.s3]`` takes :class:`~lorapool.sources.S3Source`'s
    (``endpoint_url``, ``region_name``, ``profile``, ...; credentials better come from
    the AWS environment), ``http``/``https`` :class:`~lorapool.sources.HttpSource`'s
    (``headers``)."""

    @field_validator("sources")
    @classmethod
    def _installed(cls, sources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for scheme in sources:
            _registered(SOURCES, scheme, "source")
        return sources

    def build_sources(self) -> dict[str, Source]:
        """The configured sources by scheme."""
        return {scheme: load_source(scheme)(**kw) for scheme, kw in self.sources.items()}


class KeyConfig(_Strict):
    """What an API key stands for."""

    tenant: str = Field(min_length=1)
    tier: str | None = None
    admin: bool = False


class AuthConfig(_Strict):
    """``keys`` mode (Bearer API keys) or a trusted gateway's tenant header."""

    mode: Literal["keys", "header"] = "keys"
    header: str = "x-tenant-id"


class HttpConfig(_Strict):
    """Where to listen, and how long shutdown waits for streams."""

    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_timeout: float = 30.0
    default_max_tokens: int = 256
    log_prompts: bool = False
    metrics_port: int | None = None
    """Also serve ``/metrics`` on this port (e.g. one only the monitoring network reaches)."""
    metrics_key: str | None = None
    """``/metrics`` on the main port needs ``Authorization: Bearer <metrics_key>``: it carries
    tenant names. Without a key (and without ``metrics_public``) the main port does not
    serve it; use ``metrics_port`` or set a key."""
    metrics_public: bool = False
    """Serve ``/metrics`` on the main port to anyone (only where every caller is trusted)."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    """A request body larger than this is answered 413 unread."""
    max_prompt_chars: int | None = Field(default=None, ge=1)
    """Refuse longer prompts before tokenizing (default: what the backend's context holds)."""


class RegistrationConfig(_Strict):
    """Who may register adapters through ``POST /v1/load_lora_adapter``, and from where.

    Each list holds sources a caller may register from: absolute local directories
    (symlinks resolved), ``https://host/prefix/`` and ``s3://bucket/prefix/``
    prefixes; ``{tenant}`` is the caller's tenant. Nothing is allowed by default.
    Example::

        [registration]
        tenant_sources = ["/srv/adapters/{tenant}", "s3://adapters/{tenant}/"]
        admin_sources = ["/srv/adapters", "s3://adapters/"]
    """

    tenants_may_register: bool = True
    """``false``: only admin keys register."""
    tenant_sources: list[str] = Field(default_factory=list)
    admin_sources: list[str] = Field(default_factory=list)
    per_tenant: dict[str, list[str]] = Field(default_factory=dict)
    """A tenant's own list, replacing ``tenant_sources`` for it."""

    @field_validator("tenant_sources", "admin_sources")
    @classmethod
    def _rules(cls, sources: list[str]) -> list[str]:
        SourceRules(sources=tuple(sources))
        return sources

    def build(self) -> Registration:
        """The server's :class:`~lorapool.server.auth.Registration`."""
        return Registration(
            tenant_sources=tuple(self.tenant_sources),
            admin_sources=tuple(self.admin_sources),
            per_tenant={t: tuple(s) for t, s in self.per_tenant.items()},
            tenants_may_register=self.tenants_may_register,
        )


class ServerConfig(BaseSettings):
    """The whole file; any setting may come from a ``LORAPOOL_`` environment variable.

    ``LORAPOOL_<SECTION>__<KEY>`` sets a key of a section (``LORAPOOL_STORE__DISK_DIR``),
    ``LORAPOOL_<KEY>`` a top-level one (``LORAPOOL_REGISTRY``); tables and lists are
    JSON. The environment wins over values given to the constructor (the file's).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    backend: BackendConfig = Field(default_factory=BackendConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    registry: str | None = None
    """SQLite file (default: ``registry.sqlite`` in ``store.disk_dir``)."""
    tiers: dict[str, TierPolicy] = Field(default_factory=lambda: {"default": TierPolicy()})
    """Tenant tiers: ``weight``, rate limits, ``max_queue``, ``cold_start`` (a TierPolicy each)."""
    default_tier: str | None = None
    tenant_tiers: dict[str, str] = Field(default_factory=dict)
    keys: dict[str, KeyConfig] = Field(default_factory=dict)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    server: HttpConfig = Field(default_factory=HttpConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment first, then the file's values (no dotenv, no secrets dir)."""
        return env_settings, init_settings

    def build_backend(self) -> Backend:
        """The configured backend, not started."""
        return self.backend.build()

    def build_scheduler(self) -> FairScheduler:
        """A FairScheduler with the configured tiers; key tiers assign tenants."""
        tenant_tiers = dict(self.tenant_tiers)
        for key in self.keys.values():
            if key.tier is not None:
                tenant_tiers.setdefault(key.tenant, key.tier)
        unknown = sorted(set(tenant_tiers.values()) - set(self.tiers))
        if unknown:
            raise ValueError(f"tenants are assigned to undefined tiers {unknown}")
        return FairScheduler(
            tenants=TenantConfig(
                tiers=dict(self.tiers), tenant_tiers=tenant_tiers, default_tier=self.default_tier
            )
        )

    def build_pool(self, *, registry: Registry | None = None) -> AdapterPool:
        """Backend, store, scheduler and registry as configured (not started).

        ``registry`` overrides the configured one (replicas sharing a registry
        store, :mod:`lorapool.integrations.ray_serve`).
        """
        s = self.store
        store = TieredStore(
            host_bytes=s.host_bytes,
            disk_dir=s.disk_dir,
            disk_bytes=s.disk_bytes,
            eviction=s.eviction,
            sources=s.build_sources(),
        )
        return AdapterPool(
            self.build_backend(),
            store=store,
            scheduler=self.build_scheduler(),
            registry=registry if registry is not None else self.registry,
        )

    def build_app(self, pool: AdapterPool | Served | None = None) -> Starlette:
        """The server app over ``pool`` (default: :meth:`build_pool`) with every setting here."""
        h = self.server
        return create_app(
            pool if pool is not None else self.build_pool(),
            auth=self.build_auth(),
            default_max_tokens=h.default_max_tokens,
            shutdown_timeout=h.shutdown_timeout,
            log_prompts=h.log_prompts,
            max_body_bytes=h.max_body_bytes,
            max_prompt_chars=h.max_prompt_chars,
            registration=self.registration.build(),
            metrics_key=h.metrics_key,
            metrics_public=h.metrics_public,
        )

    def build_auth(self) -> Auth:
        """API keys, or the trusted-gateway header (admins: keys with ``admin = true``)."""
        if self.auth.mode == "header":
            admins = frozenset(k.tenant for k in self.keys.values() if k.admin)
            return TrustedHeader(self.auth.header, admin_tenants=admins)
        if not self.keys:
            raise ValueError("auth.mode = 'keys' needs at least one entry in [keys]")
        return ApiKeys({key: Caller(k.tenant, k.admin) for key, k in self.keys.items()})


def load_config(path: str | Path | None = None) -> ServerConfig:
    """Read and validate a TOML config file, overridden by ``LORAPOOL_`` variables.

    Without a path, the config is the environment's (and the defaults).
    """
    if path is None:
        return ServerConfig()
    with Path(path).expanduser().open("rb") as f:
        return ServerConfig(**tomllib.load(f))
