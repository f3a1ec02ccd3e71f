"""A served pool described by one TOML file: model, backend, tiers, tenants, keys, server.

Example (``examples/server.toml`` is a complete one)::

    [backend]
    kind = "torch"            # torch | vllm | openai
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
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorapool.pool import AdapterPool
from lorapool.registry import Registry
from lorapool.scheduler.fair import FairScheduler, TierPolicy
from lorapool.store import TieredStore

from .auth import ApiKeys, Auth, Caller, TrustedHeader

__all__ = ["ServerConfig", "load_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfig(_Strict):
    """Which engine, and its slots and rank."""

    kind: Literal["torch", "vllm", "openai"] = "torch"
    model: str | None = None
    """Model directory (torch, vllm) or the server's base URL (openai)."""
    max_slots: int = Field(default=4, ge=1)
    max_rank: int = Field(default=16, ge=1)
    max_batch: int = Field(default=32, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the backend's constructor."""


class StoreConfig(_Strict):
    """Tier sizes and eviction policy."""

    host_bytes: str | int = "2GiB"
    disk_dir: str | None = None
    disk_bytes: str | int | None = None
    eviction: str | dict[str, str] | None = None
    sources: dict[Literal["s3", "http", "https"], dict[str, Any]] = Field(default_factory=dict)
    """Per scheme, the source's settings: ``[store.sources.s3]`` takes
    :class:`~lorapool.sources.S3Source`'s (``endpoint_url``, ``region_name``, ``profile``,
    ...; credentials better come from the AWS environment), ``http``/``https``
    :class:`~lorapool.sources.HttpSource`'s (``headers``)."""

    def build_sources(self) -> dict[str, Any]:
        """The configured sources by scheme."""
        from lorapool.sources import HttpSource, S3Source

        out: dict[str, Any] = {}
        for scheme, settings in self.sources.items():
            out[scheme] = S3Source(**settings) if scheme == "s3" else HttpSource(**settings)
        return out


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


class ServerConfig(_Strict):
    """The whole file."""

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

    def build_backend(self) -> Any:
        """The configured backend, not started."""
        b = self.backend
        if b.kind == "torch":
            from lorapool.backends.torch import TorchBackend, ensure_demo_model

            model = Path(b.model).expanduser() if b.model else ensure_demo_model()
            return TorchBackend(
                model,
                max_slots=b.max_slots,
                max_rank=b.max_rank,
                max_batch=b.max_batch,
                **b.options,
            )
        if b.model is None:
            raise ValueError(f"backend.model is required for kind={b.kind!r}")
        if b.kind == "vllm":
            from lorapool.backends.vllm import VLLMBackend

            return VLLMBackend(
                b.model,
                max_slots=b.max_slots,
                max_rank=b.max_rank,
                max_batch=b.max_batch,
                **b.options,
            )
        from lorapool.backends.openai import OpenAIServerBackend

        return OpenAIServerBackend(
            b.model, max_slots=b.max_slots, max_rank=b.max_rank, max_batch=b.max_batch, **b.options
        )

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
            tiers=dict(self.tiers),
            tenant_tiers=tenant_tiers,
            default_tier=self.default_tier,
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

    def build_auth(self) -> Auth:
        """API keys, or the trusted-gateway header (admins: keys with ``admin = true``)."""
        if self.auth.mode == "header":
            admins = frozenset(k.tenant for k in self.keys.values() if k.admin)
            return TrustedHeader(self.auth.header, admin_tenants=admins)
        if not self.keys:
            raise ValueError("auth.mode = 'keys' needs at least one entry in [keys]")
        return ApiKeys({key: Caller(k.tenant, k.admin) for key, k in self.keys.items()})


def load_config(path: str | Path) -> ServerConfig:
    """Read and validate a TOML config file."""
    with Path(path).expanduser().open("rb") as f:
        return ServerConfig.model_validate(tomllib.load(f))
