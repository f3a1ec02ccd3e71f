"""Scale-out on Ray Serve: one :class:`~lorapool.AdapterPool` per replica, adapter-affine routing.

Ray Serve's model multiplexing routes a request to a replica that already
holds its model. lorapool plugs into it directly (extra ``ray``):

* :class:`PoolReplica` is the replica: it owns an AdapterPool (any backend).
  A request carries its adapter as the multiplexed model id; the replica's
  ``@serve.multiplexed`` loader makes the adapter resident through the pool's
  store, with ``max_num_models_per_replica`` equal to the backend's device
  slots, and when Ray evicts an adapter the pool unloads it (waits for its
  requests to drain, then frees the slot and host copy).
* :class:`OpenAIIngress` runs lorapool's OpenAI-compatible app
  (:func:`lorapool.server.create_app`) as the Serve ingress: it reads
  ``model`` from the body and calls the replicas with it as the multiplexed
  id, so clients see one endpoint.
* :class:`RayRegistryStore` keeps the registry in one detached, named actor
  that every replica on every node reads (optionally backed by a SQLite file),
  so an adapter registered through one replica is served by all of them.

``build_app(make_pool, auth=...)`` wires these together; ``app_builder`` does
it from a server TOML file for ``serve run``. ``docs/scale-out.md`` explains
routing, replica count and slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from lorapool.access import SourceRules
from lorapool.errors import BackendError, ExtraNotInstalled, LorapoolError
from lorapool.lifecycle.forget import ForgetReport, InFlightMode, PurgeReport
from lorapool.pool import AdapterPool
from lorapool.registry import MemoryRegistryStore, Registry, RegistryStore, SqliteRegistryStore
from lorapool.registry.audit import GENESIS
from lorapool.registry.stores import AuditConflict, AuditRows
from lorapool.types import AdapterInfo, Chunk, Completion, Prompt, SamplingParams

try:
    import ray
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ExtraNotInstalled("lorapool.integrations.ray_serve", "ray", str(exc)) from exc

__all__ = [
    "OpenAIIngress",
    "PoolFactory",
    "PoolReplica",
    "RayPools",
    "RayRegistryStore",
    "RegistrySpec",
    "app_builder",
    "build_app",
    "pool_from_config",
]

log = logging.getLogger("lorapool.ray_serve")

PoolFactory = Callable[[Registry], AdapterPool]
"""Builds a replica's pool (not started) around the shared registry it is given."""

REGISTRY_ACTOR = "lorapool-registry"
NAMESPACE = "lorapool"


# -- the shared registry ------------------------------------------------------------------


class _RegistryActor:
    """The registry's records in one actor; every replica's :class:`RayRegistryStore` calls it."""

    def __init__(self, path: str | None) -> None:
        self._store: RegistryStore = (
            SqliteRegistryStore(path) if path is not None else MemoryRegistryStore()
        )
        # A restarted actor must never repeat a version a client has seen.
        self._boot = secrets.randbits(30)
        self._writes = 0

    def version(self) -> int:
        return (self._boot << 32) | self._writes

    def insert(self, info: AdapterInfo) -> None:
        self._store.insert(info)
        self._writes += 1

    def delete(self, adapter_id: str) -> None:
        self._store.delete(adapter_id)
        self._writes += 1

    def records(self) -> list[AdapterInfo]:
        return list(self._store.records())

    def get_setting(self, key: str) -> str | None:
        return self._store.get_setting(key)

    def set_setting(self, key: str, value: str | None) -> None:
        self._store.set_setting(key, value)
        self._writes += 1

    def _rows(self) -> AuditRows:
        assert isinstance(self._store, AuditRows)  # both lorapool stores keep audit rows
        return self._store

    def audit_tail(self) -> tuple[int, str] | None:
        return self._rows().audit_tail()

    def audit_insert(self, row: Mapping[str, Any]) -> bool:
        """Append ``row`` if it follows the tail (``False``: another replica wrote first).
        An actor runs one call at a time, so the check and the append are one step."""
        rows = self._rows()
        tail = rows.audit_tail()
        seq, prev = (0, GENESIS) if tail is None else tail
        if row["seq"] != seq + 1 or row["prev"] != prev:
            return False
        with rows.transaction():
            rows.audit_insert(row)
        return True

    def audit_rows(self, filters: Mapping[str, Any]) -> list[dict[str, Any]]:
        return self._rows().audit_rows(**filters)


class RayRegistryStore(RegistryStore):
    """A :class:`~lorapool.registry.RegistryStore` shared by every replica of a cluster.

    The records live in a detached actor named ``name`` (created by the first
    replica that asks, found by the others; Ray restarts it if it dies). With
    ``path`` it keeps them in that SQLite file on the actor's node, so they
    survive the actor; without, in the actor's memory. Writes are one actor
    call each (registrations are rare); reads come from each replica's
    in-memory :class:`~lorapool.registry.Registry`, which checks the actor's
    version at most every ``refresh`` seconds, and at once when asked for an
    id it does not know: an adapter registered through one replica resolves
    on every other immediately; lists and removals catch up within ``refresh``.
    """

    def __init__(
        self,
        *,
        name: str = REGISTRY_ACTOR,
        namespace: str = NAMESPACE,
        path: str | None = None,
        refresh: float = 0.2,
    ) -> None:
        actor = ray.remote(_RegistryActor).options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=0,
        )
        self._actor = actor.remote(path)
        self.refresh = refresh
        self._version = 0
        self._checked = float("-inf")

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray.get(getattr(self._actor, method).remote(*args))
        except RayError as exc:
            raise _lorapool_error(exc) from None

    def insert(self, info: AdapterInfo) -> None:
        """Add a record; :class:`~lorapool.errors.AdapterExists` if any replica took the id."""
        self._call("insert", info)

    def delete(self, adapter_id: str) -> None:
        """Remove a record."""
        self._call("delete", adapter_id)

    def records(self) -> Iterator[AdapterInfo]:
        """Every record."""
        return iter(list(self._call("records")))

    def get_setting(self, key: str) -> str | None:
        """A named value."""
        value = self._call("get_setting", key)
        return None if value is None else str(value)

    def set_setting(self, key: str, value: str | None) -> None:
        """Set or delete a named value."""
        self._call("set_setting", key, value)

    def audit_tail(self) -> tuple[int, str] | None:
        """The audit log's last ``seq`` and ``hash``, from the actor."""
        tail = self._call("audit_tail")
        return None if tail is None else (int(tail[0]), str(tail[1]))

    def audit_insert(self, row: Mapping[str, Any]) -> None:
        """Append an audit row in the actor; :class:`AuditConflict` when another replica
        appended since the tail was read (the log reads it again and retries)."""
        if not self._call("audit_insert", dict(row)):
            raise AuditConflict(f"audit entry {row['seq']} was taken by another replica")

    def audit_rows(
        self,
        *,
        tenant: str | None = None,
        adapter: str | None = None,
        action: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Audit rows in ``seq`` order, filtered in the actor."""
        filters = {"tenant": tenant, "adapter": adapter, "action": action, "after": after}
        return list(self._call("audit_rows", {**filters, "limit": limit}))

    def version(self) -> int:
        """The actor's write counter, asked at most every ``refresh`` seconds."""
        now = time.monotonic()
        if now - self._checked >= self.refresh:
            self._version = int(self._call("version"))
            self._checked = now
        return self._version

    def invalidate(self) -> None:
        """Ask the actor on the next :meth:`version` (the registry does on an unknown id)."""
        self._checked = float("-inf")

    def close(self) -> None:
        """Nothing to release: the actor outlives replicas."""


@dataclass(frozen=True)
class RegistrySpec:
    """Which registry store the replicas share (picklable, opened on each replica).

    ``ray`` (default): a :class:`RayRegistryStore` actor, right for one
    machine or many. ``sqlite``: the SQLite file ``path``, for replicas on one
    machine (SQLite's locking is not safe on network file systems). ``postgres``:
    a PostgreSQL database at ``dsn`` (schema ``schema``), shared with replicas and
    servers outside Ray too; changes reach every replica by ``NOTIFY``.
    """

    kind: Literal["ray", "sqlite", "postgres"] = "ray"
    path: str | None = None
    name: str = REGISTRY_ACTOR
    refresh: float = 0.2
    dsn: str | None = None
    schema: str = "lorapool"

    def open(self) -> Registry:
        """The registry over the shared store."""
        if self.kind == "postgres":
            if self.dsn is None:
                raise ValueError("RegistrySpec(kind='postgres') needs a dsn")
            from lorapool.registry import PostgresRegistryStore

            return Registry(PostgresRegistryStore(self.dsn, schema=self.schema))
        if self.kind == "sqlite":
            if self.path is None:
                raise ValueError("RegistrySpec(kind='sqlite') needs a path")
            return Registry.open(self.path)
        return Registry(RayRegistryStore(name=self.name, path=self.path, refresh=self.refresh))


# -- errors across the process boundary ---------------------------------------------------


def _lorapool_error(exc: BaseException) -> BaseException:
    """The lorapool error a Ray error carries, else a :class:`BackendError` saying what failed."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LorapoolError):
        return cause
    if isinstance(exc, LorapoolError) and not isinstance(exc, RayError):
        return exc
    return BackendError(f"a lorapool replica failed: {type(exc).__name__}: {exc}")


# -- the replica --------------------------------------------------------------------------


class _Resident:
    """What Ray's multiplexer holds for one adapter; Ray calls ``__del__`` when it evicts it."""

    def __init__(self, pool: AdapterPool, adapter_id: str, loop: asyncio.AbstractEventLoop):
        self.pool = pool
        self.adapter_id = adapter_id
        self._loop = loop
        self._released = False

    def __del__(self) -> None:
        # Ray runs this in a worker thread, so it may wait for the pool on its loop:
        # the adapter's requests drain, then its slot and host copy are freed.
        if self._released:
            return
        self._released = True
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:  # garbage-collected on the loop itself: cannot wait here
            return
        future = asyncio.run_coroutine_threadsafe(
            self.pool.unload(self.adapter_id, tenant=None), self._loop
        )
        try:
            future.result()
        except LorapoolError as exc:  # e.g. unregistered meanwhile: nothing left to free
            log.info("unloading %s after Ray evicted it: %s", self.adapter_id, exc)


class PoolReplica:
    """A Ray Serve replica owning one :class:`~lorapool.AdapterPool`.

    Call it through a handle with the adapter as the multiplexed model id
    (``handle.options(multiplexed_model_id=adapter, stream=True).generate.remote(...)``)
    so Ray routes it to a replica that holds the adapter; :class:`OpenAIIngress`
    does this for HTTP clients.
    """

    async def __init__(  # type: ignore[misc]  # Ray awaits an async constructor
        self, make_pool: PoolFactory, registry: RegistrySpec | None = None
    ) -> None:
        spec = registry if registry is not None else RegistrySpec()
        self.pool = make_pool(spec.open())
        await self.pool.start()
        self.slots = self.pool.backend.capabilities.max_slots
        self.registered = 0
        loop = asyncio.get_running_loop()

        async def make_resident(route: str) -> _Resident:
            tenant, _, name = route.partition("/")
            adapter_id = self.pool.registry.locate(name, tenant)
            await self.pool.prefetch(adapter_id, tenant=None, tier="device", wait=True)
            return _Resident(self.pool, adapter_id, loop)

        # Bound here, not at class level, so the limit follows this backend's slots.
        self._resident = serve.multiplexed(max_num_models_per_replica=self.slots)(make_resident)

    async def _ensure(self, adapter: str | None, tenant: str) -> None:
        if adapter is None:
            return
        self.pool.registry.locate(adapter, tenant)  # refuse before loading anything
        await self._resident(route_key(tenant, adapter))

    async def generate(
        self,
        prompt: Prompt,
        *,
        adapter: str | None,
        tenant: str,
        params: SamplingParams | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Stream a completion (call with ``stream=True``), calling ``tools`` if given."""
        await self._ensure(adapter, tenant)
        stream = self.pool.generate(
            prompt,
            adapter=adapter,
            tenant=tenant,
            params=params,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    async def complete(
        self,
        prompt: Prompt,
        *,
        adapter: str | None,
        tenant: str,
        params: SamplingParams | None = None,
    ) -> Completion:
        """The whole completion."""
        await self._ensure(adapter, tenant)
        return await self.pool.complete(prompt, adapter=adapter, tenant=tenant, params=params)

    async def register(
        self, adapter_id: str, source: str, *, tenant: str, shared: bool = False, **options: Any
    ) -> AdapterInfo:
        """Register through this replica; every replica serves it (shared registry)."""
        info = await self.pool.register(adapter_id, source, tenant=tenant, shared=shared, **options)
        self.registered += 1
        return info

    async def unregister(self, adapter_id: str, *, tenant: str) -> None:
        """Unregister (other replicas refuse it from their next lookup on)."""
        await self.pool.unregister(adapter_id, tenant=tenant)

    async def forget(
        self,
        adapter: str | None = None,
        *,
        tenant: str,
        in_flight: InFlightMode = "drain",
        delete_source: bool = False,
    ) -> ForgetReport:
        """Forget an adapter (or every adapter of ``tenant``) on every replica.

        This replica removes the registry rows (shared by all), then every replica of the
        deployment, this one included, purges it (:meth:`purge`, through Ray Serve's
        ``broadcast``) before the call returns; the report holds each replica's part.
        """
        return await self.pool.forget(
            adapter,
            tenant=tenant,
            in_flight=in_flight,
            delete_source=delete_source,
            replicas=self._purge_everywhere,
        )

    async def purge(
        self,
        infos: Sequence[AdapterInfo],
        in_flight: InFlightMode = "drain",
        scope: str | None = None,
    ) -> PurgeReport:
        """This replica's part of a forget (:meth:`AdapterPool.purge`), named by replica."""
        report = await self.pool.purge(infos, in_flight=in_flight, scope=scope)
        replica = serve.get_replica_context().replica_id.unique_id
        return dataclasses.replace(report, replica=replica)

    async def _purge_everywhere(
        self, infos: Sequence[AdapterInfo], in_flight: InFlightMode, scope: str | None
    ) -> list[PurgeReport]:
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, app_name=context.app_name)
        try:
            results = await handle.broadcast("purge", list(infos), in_flight, scope).results_async()
        except (RayError, LorapoolError) as exc:
            raise _lorapool_error(exc) from None
        return [cast(PurgeReport, r) for r in results]

    async def adapters(self, tenant: str) -> list[AdapterInfo]:
        """Adapters ``tenant`` may use."""
        return self.pool.list_adapters(tenant=tenant)

    async def ready(self) -> bool:
        """The backend's health."""
        return await self.pool.backend.health()

    async def info(self) -> dict[str, Any]:
        """This replica's identity and counters (for tests, dashboards and routing checks)."""
        context = serve.get_replica_context()
        stats = self.pool.store.stats
        return {
            "replica": context.replica_id.unique_id,
            "actor": ray.get_runtime_context().get_actor_name(),
            "base_model": self.pool.backend.capabilities.base_model,
            "slots": self.slots,
            "device_loads": stats.device_loads,
            "resident": sorted(self.pool.store.resident),
            "disk_dir": str(self.pool.store.disk_dir),
            "registered": self.registered,
        }

    async def holds(self, adapter_id: str) -> list[str]:
        """The tiers of this replica's store that hold ``adapter_id`` (by full id) now."""
        store = self.pool.store
        held = [("device", store.on_device(adapter_id)), ("host", store.on_host(adapter_id))]
        return [tier for tier, there in held if there]

    async def __del__(self) -> None:
        """Ray calls this when it stops the replica: close the pool."""
        await self.pool.aclose()


# -- the ingress ----------------------------------------------------------------------------


class RayPools:
    """:class:`~lorapool.server.Served` by :class:`PoolReplica` replicas through a handle."""

    def __init__(
        self,
        handle: DeploymentHandle[Any],
        *,
        tenant_tiers: Mapping[str, str] | None = None,
        default_tier: str = "default",
    ) -> None:
        self.handle = handle
        self.tenant_tiers = dict(tenant_tiers or {})
        self.default_tier = default_tier
        self._base_model: str | None = None

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args, **kwargs)
        except (RayError, LorapoolError) as exc:
            raise _lorapool_error(exc) from None

    async def start(self) -> None:
        """Learn the base model from a replica."""
        info = await self._call("info")
        self._base_model = str(info["base_model"])

    async def aclose(self) -> None:
        """Nothing to close: the replicas belong to Ray."""

    def base_model(self) -> str:
        """The replicas' base model."""
        if self._base_model is None:
            raise BackendError("the ingress has not started")
        return self._base_model

    def tier_of(self, tenant: str) -> str:
        """From the configured tenant tiers."""
        return self.tenant_tiers.get(tenant, self.default_tier)

    async def ready(self) -> bool:
        """Whether a replica answers healthy."""
        try:
            return bool(await self._call("ready"))
        except LorapoolError:
            return False

    def generate(
        self, prompt: Prompt, *, adapter: str | None, tenant: str, params: SamplingParams
    ) -> AsyncGenerator[Chunk, None]:
        """Stream from the replica that holds ``adapter`` (Ray's multiplexed routing)."""
        return self._stream(prompt, adapter=adapter, tenant=tenant, params=params)

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
        """As :meth:`generate`, the replica's pool calling ``tools``."""
        return self._stream(
            prompt,
            adapter=adapter,
            tenant=tenant,
            params=params,
            tools=list(tools),
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )

    async def _stream(
        self, prompt: Prompt, *, adapter: str | None, tenant: str, **kwargs: Any
    ) -> AsyncGenerator[Chunk, None]:
        handle = self.handle.options(stream=True)
        if adapter is not None:
            handle = handle.options(multiplexed_model_id=route_key(tenant, adapter))
        response = cast(
            "DeploymentResponseGenerator[Chunk]",
            handle.generate.remote(prompt, adapter=adapter, tenant=tenant, **kwargs),
        )
        try:
            async for chunk in response:
                yield chunk
        except (RayError, LorapoolError) as exc:
            raise _lorapool_error(exc) from None
        finally:
            response.cancel()  # type: ignore[no-untyped-call]

    async def adapters(self, tenant: str) -> list[AdapterInfo]:
        """From any replica (the registry is shared)."""
        return list(await self._call("adapters", tenant))

    async def register(
        self,
        adapter_id: str,
        source: str,
        *,
        tenant: str,
        shared: bool,
        allowed: SourceRules | None = None,
    ) -> AdapterInfo:
        """Through any replica (``allowed`` travels with the call and is checked there)."""
        info: AdapterInfo = await self._call(
            "register", adapter_id, source, tenant=tenant, shared=shared, allowed=allowed
        )
        return info

    async def unregister(self, adapter_id: str, *, tenant: str) -> None:
        """Through any replica."""
        await self._call("unregister", adapter_id, tenant=tenant)

    async def forget(
        self,
        adapter: str | None = None,
        *,
        tenant: str,
        in_flight: InFlightMode = "drain",
        delete_source: bool = False,
    ) -> ForgetReport:
        """Through any replica, which has every replica purge it before it returns."""
        report: ForgetReport = await self._call(
            "forget", adapter, tenant=tenant, in_flight=in_flight, delete_source=delete_source
        )
        return report


@serve.ingress()
class OpenAIIngress:
    """The OpenAI-compatible app as the Serve ingress, in front of :class:`PoolReplica`."""

    def __init__(
        self,
        pools: DeploymentHandle[Any],
        auth: Any,
        tenant_tiers: Mapping[str, str] | None = None,
        default_max_tokens: int = 256,
        log_prompts: bool = False,
        registration: Any = None,
    ) -> None:
        from lorapool.server import create_app

        self.pools = RayPools(pools, tenant_tiers=tenant_tiers)
        self._app = create_app(
            self.pools,
            auth=auth,
            default_max_tokens=default_max_tokens,
            log_prompts=log_prompts,
            registration=registration,
        )

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


# -- building an application ---------------------------------------------------------------


def route_key(tenant: str, adapter: str) -> str:
    """The multiplexed model id of a tenant's request for ``adapter``: ``tenant/adapter``.

    Names are per tenant, so the routing key carries the tenant (whose name holds no
    ``/``); the replica resolves it to the adapter's id when it loads it. Ingress and
    replicas use this one function, so a request goes where its adapter is resident.
    """
    return f"{tenant}/{adapter}"


def build_app(
    make_pool: PoolFactory,
    *,
    auth: Any,
    replicas: int = 2,
    registry: RegistrySpec | None = None,
    replica_options: Mapping[str, Any] | None = None,
    ingress_options: Mapping[str, Any] | None = None,
    tenant_tiers: Mapping[str, str] | None = None,
    default_max_tokens: int = 256,
    registration: Any = None,
) -> Any:
    """The Serve application: ``OpenAIIngress`` over ``replicas`` :class:`PoolReplica`.

    ``registration`` (a :class:`lorapool.server.Registration`) says who may register
    adapters through the ingress and from where; by default nobody may.

    ``make_pool`` must be picklable (a module-level function or a
    ``functools.partial`` of one; :func:`pool_from_config` is one).
    ``replica_options`` go to the pool deployment (``ray_actor_options`` for
    GPUs, ``max_ongoing_requests``, ...). Run it with ``serve.run(app)``.
    """
    pool_options: dict[str, Any] = {"num_replicas": replicas, "max_ongoing_requests": 64}
    pool_options.update(replica_options or {})
    pools = serve.deployment(name="LoraPool", **pool_options)(PoolReplica).bind(
        make_pool, registry if registry is not None else RegistrySpec()
    )
    # The ingress only parses and forwards: it reserves no CPU, so it never competes
    # with the replicas for scheduling.
    front: dict[str, Any] = {
        "num_replicas": 1,
        "max_ongoing_requests": 256,
        "ray_actor_options": {"num_cpus": 0},
    }
    front.update(ingress_options or {})
    ingress = serve.deployment(name="LoraPoolIngress", **front)(OpenAIIngress)
    return ingress.bind(
        pools, auth, dict(tenant_tiers or {}), default_max_tokens, False, registration
    )


def _pool_from_config(path: str, registry: Registry) -> AdapterPool:
    from lorapool.server.config import load_config

    config = load_config(path)
    disk_dir = config.store.disk_dir
    if disk_dir is not None:  # one disk tier per replica on a node, kept across restarts
        rank = serve.get_replica_context().rank
        local = getattr(rank, "local_rank", 0)
        config.store.disk_dir = str(Path(disk_dir).expanduser() / f"replica-{local}")
    return config.build_pool(registry=registry)


def pool_from_config(path: str | Path) -> PoolFactory:
    """A picklable :data:`PoolFactory` that builds each replica's pool from a server TOML file.

    Each replica's disk tier is ``<store.disk_dir>/replica-<local rank>``.
    """
    return functools.partial(_pool_from_config, str(Path(path).expanduser()))


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run lorapool.integrations.ray_serve:app_builder config=server.toml replicas=2``.

    Arguments: ``config`` (a server TOML file, read on every node: keep the
    same file at the same path), ``replicas``, ``registry`` (``ray``, a
    ``postgresql://`` URL, or a SQLite path for one machine), ``num_gpus`` per replica.
    """
    from lorapool.server.config import load_config

    path = args["config"]
    config = load_config(path)
    registry_arg = args.get("registry", "ray")
    if registry_arg == "ray":
        spec = RegistrySpec()
    elif registry_arg.startswith(("postgresql://", "postgres://")):
        spec = RegistrySpec(kind="postgres", dsn=registry_arg)
    else:
        spec = RegistrySpec(kind="sqlite", path=str(Path(registry_arg).expanduser()))
    options: dict[str, Any] = {}
    if "num_gpus" in args:
        options["ray_actor_options"] = {"num_gpus": float(args["num_gpus"])}
    tiers = dict(config.tenant_tiers)
    for key in config.keys.values():
        if key.tier is not None:
            tiers.setdefault(key.tenant, key.tier)
    return build_app(
        pool_from_config(path),
        auth=config.build_auth(),
        replicas=int(args.get("replicas", "2")),
        registry=spec,
        replica_options=options,
        tenant_tiers=tiers,
        default_max_tokens=config.server.default_max_tokens,
        registration=config.registration.build(),
    )
