"""The seam between the HTTP app and what serves it.

The app needs a handful of things from "the pool": generate, list, register,
unregister, readiness, the base model's name, a tenant's tier. :class:`Served`
names them. :class:`LocalPool` provides them from an in-process
:class:`~lorapool.AdapterPool`; :mod:`lorapool.integrations.ray_serve` provides
them from pools on Ray Serve replicas, so the same app is the ingress there.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from lorapool.access import SourceRules
from lorapool.pool import AdapterPool
from lorapool.types import AdapterInfo, Chunk, Prompt, SamplingParams

__all__ = ["LocalPool", "Served", "ServedTools"]


@runtime_checkable
class Served(Protocol):
    """What :func:`~lorapool.server.create_app` serves."""

    def base_model(self) -> str:
        """The base model's name (also the ``model`` that selects no adapter)."""
        ...

    def tier_of(self, tenant: str) -> str:
        """The tenant's tier, for metric labels."""
        ...

    async def ready(self) -> bool:
        """Whether requests can be served now."""
        ...

    def generate(
        self, prompt: Prompt, *, adapter: str | None, tenant: str, params: SamplingParams
    ) -> AsyncGenerator[Chunk, None]:
        """Stream a completion; errors are :class:`~lorapool.errors.LorapoolError`."""
        ...

    async def adapters(self, tenant: str) -> list[AdapterInfo]:
        """Adapters the tenant may use."""
        ...

    async def register(
        self,
        adapter_id: str,
        source: str,
        *,
        tenant: str,
        shared: bool,
        allowed: SourceRules | None = None,
    ) -> AdapterInfo:
        """Register an adapter; ``allowed`` confines its source (the caller's rules)."""
        ...

    async def unregister(self, adapter_id: str, *, tenant: str) -> None:
        """Unregister an adapter."""
        ...

    async def start(self) -> None:
        """Called once when the app starts."""
        ...

    async def aclose(self) -> None:
        """Called once when the app stops, after streams in flight finished."""
        ...


@runtime_checkable
class ServedTools(Protocol):
    """What serves tool calls too (:class:`LocalPool`); the app refuses ``tools`` for a
    :class:`Served` without it (400, ``UnsupportedParameter``)."""

    def generate_tools(
        self,
        prompt: Prompt,
        *,
        adapter: str | None,
        tenant: str,
        params: SamplingParams,
        tools: Sequence[Mapping[str, Any]],
        tool_choice: str | Mapping[str, Any] | None,
        parallel_tool_calls: bool | None,
    ) -> AsyncGenerator[Chunk, None]:
        """Stream a completion that may call ``tools`` (:meth:`AdapterPool.generate`)."""
        ...


class LocalPool:
    """:class:`Served` by an :class:`~lorapool.AdapterPool` in this process."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool

    def base_model(self) -> str:
        """The backend's base model."""
        return self.pool.backend.capabilities.base_model

    def tier_of(self, tenant: str) -> str:
        """The scheduler's tier for ``tenant`` (``default`` without tiers)."""
        tier = self.pool.scheduler.tier_of(tenant)
        return "default" if tier is None else tier

    async def ready(self) -> bool:
        """The backend's health."""
        return await self.pool.backend.health()

    def generate(
        self, prompt: Prompt, *, adapter: str | None, tenant: str, params: SamplingParams
    ) -> AsyncGenerator[Chunk, None]:
        """:meth:`AdapterPool.generate`."""
        return self.pool.generate(prompt, adapter=adapter, tenant=tenant, params=params)

    def generate_tools(
        self,
        prompt: Prompt,
        *,
        adapter: str | None,
        tenant: str,
        params: SamplingParams,
        tools: Sequence[Mapping[str, Any]],
        tool_choice: str | Mapping[str, Any] | None,
        parallel_tool_calls: bool | None,
    ) -> AsyncGenerator[Chunk, None]:
        """:meth:`AdapterPool.generate` with tools."""
        return self.pool.generate(
            prompt,
            adapter=adapter,
            tenant=tenant,
            params=params,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )

    async def adapters(self, tenant: str) -> list[AdapterInfo]:
        """:meth:`AdapterPool.list_adapters`."""
        return self.pool.list_adapters(tenant=tenant)

    async def register(
        self,
        adapter_id: str,
        source: str,
        *,
        tenant: str,
        shared: bool,
        allowed: SourceRules | None = None,
    ) -> AdapterInfo:
        """:meth:`AdapterPool.register`."""
        return await self.pool.register(
            adapter_id, source, tenant=tenant, shared=shared, allowed=allowed
        )

    async def unregister(self, adapter_id: str, *, tenant: str) -> None:
        """:meth:`AdapterPool.unregister`."""
        await self.pool.unregister(adapter_id, tenant=tenant)

    async def start(self) -> None:
        """Start the pool."""
        await self.pool.start()

    async def aclose(self) -> None:
        """Close the pool."""
        await self.pool.aclose()
