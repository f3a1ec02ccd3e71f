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
    cold_start = "wait"

    [keys]
    "sk-acme" = { tenant = "acme", tier = "gold" }
    globex = { key_file = "/run/secrets/globex", tenant = "globex" }

    [[adapters]]              # registered when the server starts, before /ready
    name = "support"
    source = "s3://adapters/acme/support"
    tenant = "acme"
    preload = true

Every setting can also come from an environment variable named ``LORAPOOL_`` and its
path, sections joined by ``__`` (``LORAPOOL_BACKEND__MAX_SLOTS=8``,
``LORAPOOL_SERVER__PORT=9000``; tables as JSON: ``LORAPOOL_KEYS='{"sk-x": {"tenant":
"acme"}}'``); the environment wins over the file (pydantic-settings).

The backend is found by ``kind`` through the ``lorapool.backends`` entry points and
built with its ``from_config(model, max_slots=..., max_rank=..., max_batch=...,
**options)``, so an installed package's backend is configured like a built-in one.

Secrets need not be written into the file: a ``[keys]`` entry with ``key_file`` reads
its API key from that file (the table's key is then only a label), and
``server.metrics_key_file`` the metrics key; each file is read once, when the config
loads, surrounding whitespace (the trailing newline) stripped.

``[[adapters]]`` are registered by the operator when the server starts
(:func:`register_adapters`), before ``/ready`` answers: the ``[registration]`` rules,
which confine what callers register over HTTP, do not apply to them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from starlette.applications import Starlette

from lorapool.abc import Backend, Source
from lorapool.access import SourceRules
from lorapool.backends.base import build_backend
from lorapool.errors import AdapterExists
from lorapool.formats import inspect_adapter_dir
from lorapool.plugins import BACKENDS, SOURCES, available, load_source
from lorapool.pool import AdapterPool
from lorapool.registry import PostgresRegistryStore, Registry, qualify
from lorapool.registry.pg_migrations import check_schema_name
from lorapool.registry.postgres import is_postgres_url
from lorapool.retry import RetryPolicy
from lorapool.scheduler import FairScheduler, TenantConfig, TierPolicy
from lorapool.scheduler.redis_limits import RedisBuckets, is_redis_url
from lorapool.scheduler.shared_limits import PostgresBuckets, share_rate_limits
from lorapool.signing import Keyring, SigningPolicy
from lorapool.store import TieredStore

from .app import create_app
from .auth import ApiKeys, Auth, Caller, Registration, TrustedHeader
from .metrics import MetricsConfig
from .served import LocalPool, Served

__all__ = ["AdapterEntry", "ServerConfig", "load_config", "read_secret", "register_adapters"]

log = logging.getLogger(__name__)

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
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy(initial=0.2))
    """How transient source errors are retried (``[store.retry]``: ``attempts``,
    ``initial``, ``multiplier``, ``max_delay``, ``jitter``)."""

    @field_validator("sources")
    @classmethod
    def _installed(cls, sources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for scheme in sources:
            _registered(SOURCES, scheme, "source")
        return sources

    def build_sources(self) -> dict[str, Source]:
        """The configured sources by scheme."""
        return {scheme: load_source(scheme)(**kw) for scheme, kw in self.sources.items()}


def read_secret(path: str, what: str) -> str:
    """The secret in the file ``path``, surrounding whitespace stripped.

    A missing, unreadable or empty file, or one whose secret holds whitespace, is a
    ``ValueError`` naming ``what`` (the setting) and the path.
    """
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None
    secret = text.strip()
    if not secret:
        raise ValueError(f"{what}: {path} is empty")
    if any(c.isspace() for c in secret):
        raise ValueError(f"{what}: {path} holds more than one line or word")
    return secret


class KeyConfig(_Strict):
    """What an API key stands for.

    With ``key_file`` the key is read from that file and the entry's name in
    ``[keys]`` is only a label (``acme = { key_file = "/run/secrets/acme", tenant =
    "acme" }``); without, the name is the key itself.
    """

    tenant: str = Field(min_length=1)
    tier: str | None = None
    admin: bool = False
    key_file: str | None = None
    """A file holding the key (a mounted secret); read once when the config loads."""


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
    metrics_key_file: str | None = None
    """A file holding ``metrics_key`` (read once when the config loads; not both)."""
    metrics_public: bool = False
    """Serve ``/metrics`` on the main port to anyone (only where every caller is trusted)."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    """A request body larger than this is answered 413 unread."""
    max_prompt_chars: int | None = Field(default=None, ge=1)
    """Refuse longer prompts before tokenizing (default: what the backend's context holds)."""
    sse_ping_interval: float | None = Field(default=15.0, gt=0)
    """Seconds without a token after which a stream sends ``: ping`` (``None``: never)."""
    drain_retry_after: int = Field(default=5, ge=1)
    """The ``Retry-After`` seconds of the 503 that requests get while the server drains."""

    @model_validator(mode="after")
    def _read_metrics_key(self) -> HttpConfig:
        if self.metrics_key_file is not None:
            if self.metrics_key is not None:
                raise ValueError("set server.metrics_key or server.metrics_key_file, not both")
            self.metrics_key = read_secret(self.metrics_key_file, "server.metrics_key_file")
        return self


class TracingConfig(_Strict):
    """OpenTelemetry spans for each request's phases (extra ``otel``; off by default)."""

    enabled: bool = False
    """Record spans with the global tracer provider (set up by ``opentelemetry-instrument``
    or the ``OTEL_*`` environment): :func:`lorapool.tracing.enable`."""


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


class SigningConfig(_Strict):
    """Signed adapters (:mod:`lorapool.signing`): off unless ``keyrings`` lists a file.

    Example::

        [signing]
        keyrings = ["/etc/lorapool/keyring.json"]   # keyring files or PEM public keys
        revoked = ["platform-2025"]
        default = "optional"
        tenants = {acme = "required"}
    """

    keyrings: list[str] = Field(default_factory=list)
    """Keyring files (JSON, :class:`~lorapool.signing.Keyring`) or single public key
    files (PEM, trusted as platform keys under their fingerprint), merged."""
    revoked: list[str] = Field(default_factory=list)
    """Key ids refused even while a keyring lists them."""
    default: Literal["required", "optional"] = "optional"
    """The policy of a tenant not in ``tenants``."""
    tenants: dict[str, Literal["required", "optional"]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SigningConfig:
        required = self.default == "required" or "required" in self.tenants.values()
        if required and not self.keyrings:
            raise ValueError("[signing]: a 'required' policy needs keyrings")
        self.build_keyring()  # the files exist and hold keys
        return self

    def build_keyring(self) -> Keyring | None:
        """The configured keyring (``None``: no keyrings, signatures not checked)."""
        if not self.keyrings:
            return None
        ring = Keyring(revoked=self.revoked)
        for path in self.keyrings:
            try:
                ring.extend(Keyring.load(path))
            except (OSError, ValueError) as exc:
                raise ValueError(f"[signing] keyring {path}: {exc}") from None
        return ring

    def build_policy(self) -> SigningPolicy:
        """The per-tenant policy."""
        return SigningPolicy(self.default, dict(self.tenants))


class AdapterEntry(_Strict):
    """An adapter registered when the server starts (one ``[[adapters]]`` table).

    The operator's own registration: the ``[registration]`` rules do not confine its
    ``source``. At a restart an adapter already in the (persistent) registry under
    this name with the same source is kept as it is; a different source under the
    same name fails start-up (unregister it first, or give the new one another name).
    """

    name: str = Field(min_length=1)
    """The adapter's name; its id is ``tenant/name``."""
    source: str = Field(min_length=1)
    """A local directory or archive, or an ``s3://``, ``http(s)://`` or ``file://`` URI."""
    tenant: str = Field(min_length=1)
    shared: bool = False
    """Other tenants may use it too."""
    preload: bool = False
    """Warm it into memory at start (onto the device where a slot is free), so its
    first request does not wait for a download or a load from disk."""
    pin: bool = False
    """Keep it on the device for as long as the server runs (fewer slots for the rest)."""

    @property
    def adapter_id(self) -> str:
        """``tenant/name``."""
        return qualify(self.name, self.tenant)


def _local_source(source: str) -> Path | None:
    """The resolved directory of a local source, or ``None`` for a URI or an archive."""
    if source.startswith("file://"):
        source = source[len("file://") :]
    elif "://" in source:
        return None
    path = Path(source).expanduser()
    return path.resolve() if path.is_dir() else None


async def _already_registered(served: Served, entry: AdapterEntry, index: str) -> bool:
    """Whether ``entry`` is registered as configured (a restart); raises if differently."""
    known = {i.adapter_id: i for i in await served.adapters(entry.tenant)}
    info = known.get(entry.adapter_id)
    if info is None:
        return False
    local = _local_source(entry.source)
    same = info.source == entry.source or (local is not None and info.source == str(local))
    if not same:
        raise ValueError(
            f"{index}: {entry.adapter_id} is already registered from {info.source}, "
            f"not {entry.source}: unregister it first, or give the new source another name"
        )
    if local is not None:
        files = await asyncio.to_thread(inspect_adapter_dir, local)
        if files.sha256 != info.sha256:
            raise ValueError(
                f"{index}: the files in {local} changed since {entry.adapter_id} was "
                f"registered from them (sha256 {files.sha256[:12]}, registered "
                f"{info.sha256[:12]}): register them under another name or version"
            )
    return True


async def register_adapters(served: Served, entries: Sequence[AdapterEntry]) -> None:
    """Register the ``[[adapters]]`` entries in order, then warm or pin them as asked.

    One log line per adapter (``i/n``, id, tenant, seconds taken). An entry already
    registered from the same source (a restart: the registry persists) is kept; any
    failure raises ``RuntimeError`` naming the entry, which fails start-up.
    ``preload`` and ``pin`` need an in-process pool (:class:`LocalPool`).
    """
    total = len(entries)
    for i, entry in enumerate(entries, 1):
        index = f"[[adapters]] entry {i} ({entry.name!r} of tenant {entry.tenant!r})"
        started = time.monotonic()
        try:
            kept = await _already_registered(served, entry, index)
            if not kept:
                try:
                    await served.register(
                        entry.name, entry.source, tenant=entry.tenant, shared=entry.shared
                    )
                except AdapterExists:
                    # Registered meanwhile by another replica sharing the registry.
                    kept = await _already_registered(served, entry, index)
                    if not kept:
                        raise
            reached = await _warm(served, entry)
        except Exception as exc:
            raise RuntimeError(f"cannot register {index} from {entry.source}: {exc}") from exc
        took = time.monotonic() - started
        log.info(
            "adapter %d/%d %s (tenant %s) %s in %.2fs",
            i,
            total,
            entry.adapter_id,
            entry.tenant,
            "already registered" if kept else "registered",
            took,
            extra={
                "adapter": entry.adapter_id,
                "tenant": entry.tenant,
                "progress": f"{i}/{total}",
                "took_s": round(took, 3),
                "already_registered": kept,
                "resident": reached,
            },
        )


async def _warm(served: Served, entry: AdapterEntry) -> str | None:
    """Pin or preload ``entry``; the tier it reached (``None``: neither was asked)."""
    if not (entry.pin or entry.preload):
        return None
    if not isinstance(served, LocalPool):
        raise ValueError("preload and pin need an in-process pool")
    pool = served.pool
    if entry.pin:
        await pool.pin(entry.adapter_id, tenant=None)
        return "device"
    reached = await pool.preload([entry.adapter_id], tier="device", progress=False)
    return reached.get(entry.adapter_id)


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
    """Where the registry lives: a SQLite file (default: ``registry.sqlite`` in
    ``store.disk_dir``), or a PostgreSQL database (``postgresql://user@host/db``) shared by
    every replica of a deployment, on any host (:mod:`lorapool.registry.postgres`; the
    ``postgres`` extra). Put the password in ``LORAPOOL_REGISTRY`` or in libpq's
    ``PGPASSWORD``/``~/.pgpass`` rather than in the file."""
    registry_schema: str = "lorapool"
    """The PostgreSQL schema holding the registry's tables (a ``postgresql://`` registry
    only): deployments sharing one database each use their own."""
    rate_limits: str = "replica"
    """Where the tiers' rate limits are counted: ``replica`` (default), each server process
    on its own (N replicas let a tenant through at N times its rate); ``shared``, every
    replica together, in the ``postgresql://`` registry's database
    (:mod:`lorapool.scheduler.shared_limits`: a few database round trips per request); a
    ``redis://host:6379/0`` (or ``rediss://``) URL, every replica together, in that Redis
    (:mod:`lorapool.scheduler.redis_limits`, the ``redis`` extra: one round trip per
    bucket check or take). A password: in ``LORAPOOL_RATE_LIMITS``, not the file."""
    tiers: dict[str, TierPolicy] = Field(default_factory=lambda: {"default": TierPolicy()})
    """Tenant tiers: ``weight``, rate limits, ``max_queue``, ``cold_start`` (a TierPolicy each)."""
    default_tier: str | None = None
    tenant_tiers: dict[str, str] = Field(default_factory=dict)
    keys: dict[str, KeyConfig] = Field(default_factory=dict)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    server: HttpConfig = Field(default_factory=HttpConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    signing: SigningConfig = Field(default_factory=SigningConfig)
    adapters: list[AdapterEntry] = Field(default_factory=list)
    """Registered when the server starts, before ``/ready`` (:func:`register_adapters`)."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    @field_validator("rate_limits")
    @classmethod
    def _rate_limits(cls, value: str) -> str:
        if value in ("replica", "shared") or is_redis_url(value):
            return value
        raise ValueError(
            f'rate_limits must be "replica", "shared" or a redis:// or rediss:// URL, not {value!r}'
        )

    @model_validator(mode="after")
    def _read_key_files(self) -> ServerConfig:
        """Replace each ``key_file`` entry by one keyed by the key the file holds."""
        keys: dict[str, KeyConfig] = {}
        for name, key in self.keys.items():
            secret = name
            if key.key_file is not None:
                secret = read_secret(key.key_file, f"keys.{name}.key_file")
                key = key.model_copy(update={"key_file": None})
            if secret in keys:
                raise ValueError(f"keys.{name}: the same API key is given twice")
            keys[secret] = key
        self.keys = keys
        if self.registry_schema != "lorapool":
            check_schema_name(self.registry_schema)
            if self.registry is None or not is_postgres_url(self.registry):
                raise ValueError("registry_schema applies to a postgresql:// registry only")
        if self.rate_limits == "shared" and (
            self.registry is None or not is_postgres_url(self.registry)
        ):
            raise ValueError('rate_limits = "shared" needs a postgresql:// registry')
        ids = [a.adapter_id for a in self.adapters]
        twice = sorted({a for a in ids if ids.count(a) > 1})
        if twice:
            raise ValueError(f"[[adapters]]: {twice} listed more than once")
        return self

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

    def build_shared_scheduler(self) -> FairScheduler:
        """:meth:`build_scheduler`, its rate limits kept in the registry's database when
        ``rate_limits = "shared"``, in Redis when it is a ``redis://`` URL."""
        scheduler = self.build_scheduler()
        if is_redis_url(self.rate_limits):
            share_rate_limits(scheduler, RedisBuckets(self.rate_limits))
        elif self.rate_limits == "shared" and self.registry is not None:
            buckets = PostgresBuckets(self.registry, schema=self.registry_schema)
            share_rate_limits(scheduler, buckets)
        return scheduler

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
            retry=s.retry,
        )
        built = self.build_registry() if registry is None else registry
        pool = AdapterPool(
            self.build_backend(),
            store=store,
            scheduler=self.build_shared_scheduler(),
            registry=built,
            keyring=self.signing.build_keyring(),
            signing=self.signing.build_policy(),
        )
        if registry is None and isinstance(built, Registry):
            pool._owns_registry = True  # built here for this pool alone: it closes it
        return pool

    def build_registry(self) -> Registry | str | None:
        """The configured registry: a :class:`Registry` over a
        :class:`~lorapool.registry.PostgresRegistryStore` for a ``postgresql://`` URL
        (connected and migrated now), else the SQLite path (``None``: the default file),
        which the pool opens."""
        if self.registry is not None and is_postgres_url(self.registry):
            return Registry(PostgresRegistryStore(self.registry, schema=self.registry_schema))
        return self.registry

    def on_start(self) -> Callable[[Served], Awaitable[None]] | None:
        """What the app runs once the pool started, before it serves: the ``[[adapters]]``."""
        if not self.adapters:
            return None
        entries = list(self.adapters)

        async def register(served: Served) -> None:
            await register_adapters(served, entries)

        return register

    def build_app(self, pool: AdapterPool | Served | None = None) -> Starlette:
        """The server app over ``pool`` (default: :meth:`build_pool`) with every setting here.

        The ``[[adapters]]`` are registered when the app starts, before ``/ready``.
        """
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
            metrics_config=self.metrics,
            on_start=self.on_start(),
            sse_ping_interval=h.sse_ping_interval,
            drain_retry_after=h.drain_retry_after,
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
