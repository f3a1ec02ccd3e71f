"""Forgetting an adapter everywhere: what to remove, the requests it holds, and the report.

:meth:`AdapterPool.forget <lorapool.AdapterPool.forget>` takes an adapter (with every
version of it) or a whole tenant out of the registry, then out of every copy of the pool
(each Ray Serve replica's): requests using it drain or are cancelled
(:class:`InFlight`), the store drops it from device, host and disk, the backend from its
own caches (:meth:`~lorapool.abc.Backend.purge`). It can delete the source too. What was
removed where is a :class:`ForgetReport`: one :class:`PurgeReport` per copy of the pool.

This module holds the pieces that need no pool: choosing the registry entries
(:func:`forget_targets`), tracking requests per adapter (:class:`InFlight`), and the
reports.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from lorapool.errors import AdapterForgotten, InvalidRequest
from lorapool.registry import Registry
from lorapool.types import AdapterInfo, Chunk

__all__ = [
    "ForgetReport",
    "ForgetTargets",
    "InFlight",
    "InFlightMode",
    "PurgeAll",
    "PurgeReport",
    "check_in_flight",
    "forget_targets",
    "sources_overlap",
]

InFlightMode = Literal["drain", "cancel"]
"""What :meth:`~lorapool.AdapterPool.forget` does with requests already using the adapter:
let them finish (``drain``), or end them now (``cancel``: each ends with
:class:`~lorapool.errors.AdapterForgotten` and is billed for what it produced)."""


def check_in_flight(mode: str) -> InFlightMode:
    """``mode`` if it is ``drain`` or ``cancel``; else :class:`InvalidRequest`."""
    if mode == "drain":
        return "drain"
    if mode == "cancel":
        return "cancel"
    raise InvalidRequest(f"in_flight must be 'drain' or 'cancel', not {mode!r}")


# -- what to forget ----------------------------------------------------------------------


@dataclass(frozen=True)
class ForgetTargets:
    """The registry entries one forget removes: aliases (with all their versions) and
    adapters, and the records of every adapter version among them."""

    aliases: tuple[str, ...]
    adapters: tuple[str, ...]
    """Adapters that are not versions of an alias being removed (a plain adapter, or one
    version named on its own)."""
    infos: tuple[AdapterInfo, ...]
    """Every adapter record removed (each version of each alias, each adapter)."""

    @property
    def ids(self) -> tuple[str, ...]:
        """Every registry id removed: aliases, then adapter records."""
        return (*self.aliases, *(i.adapter_id for i in self.infos))


def forget_targets(registry: Registry, adapter: str | None, tenant: str) -> ForgetTargets:
    """What forgetting ``adapter`` (``None``: every adapter ``tenant`` owns) removes.

    ``adapter`` names the tenant's own adapter as :meth:`Registry.owned_id` does: an
    alias goes with every version; a version id (``name@v2``) alone is that version. A
    shared adapter of another tenant is :class:`~lorapool.errors.AccessDenied`, a private
    one :class:`~lorapool.errors.AdapterNotFound`, as for any change.
    """
    if adapter is not None:
        key = registry.owned_id(adapter, tenant)
        versions = registry.version_ids(key)
        if versions:
            infos = tuple(registry.resolve(v, None) for v in versions)
            return ForgetTargets((key,), (), infos)
        return ForgetTargets((), (key,), (registry.resolve(key, None),))
    owned = [i for i in registry.visible(tenant) if i.tenant == tenant]
    aliases: dict[str, None] = {}
    adapters: list[str] = []
    for info in owned:
        name, _, version = info.adapter_id.rpartition("@")
        if name and f"{name}@{version}" in registry.version_ids(name):
            aliases[name] = None
        else:
            adapters.append(info.adapter_id)
    return ForgetTargets(tuple(aliases), tuple(adapters), tuple(owned))


# -- the reports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgeReport:
    """What one copy of the pool removed (:meth:`~lorapool.AdapterPool.purge`).

    ``tiers``: for each adapter id, the store's tiers it was in (``device``, ``host``,
    ``disk``). ``disk_paths``: the disk tier's directories deleted (named by sha256).
    ``disk_kept``: contents whose disk copy stays because another registered adapter
    has the same bytes. ``engine``: what the backend dropped from its own caches, in its
    words. ``drained``/``cancelled``: requests that were using the adapters.
    """

    replica: str | None = None
    tiers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    disk_paths: tuple[str, ...] = ()
    disk_kept: tuple[str, ...] = ()
    engine: tuple[str, ...] = ()
    drained: int = 0
    cancelled: int = 0

    def summary(self) -> dict[str, Any]:
        """The report as JSON values."""
        return {
            "replica": self.replica,
            "tiers": {k: list(v) for k, v in sorted(self.tiers.items())},
            "disk_paths": list(self.disk_paths),
            "disk_kept": list(self.disk_kept),
            "engine": list(self.engine),
            "drained": self.drained,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True)
class ForgetReport:
    """What :meth:`~lorapool.AdapterPool.forget` removed, where.

    ``registry``: the ids removed (aliases and every adapter version). ``contents``: the
    sha256 of each adapter removed. ``purges``: one :class:`PurgeReport` per copy of the
    pool (one in-process; one per replica under Ray Serve). ``source``: the source
    objects deleted (``delete_source=True``).
    """

    tenant: str
    adapter: str | None
    in_flight: InFlightMode
    registry: tuple[str, ...]
    contents: tuple[str, ...]
    purges: tuple[PurgeReport, ...] = ()
    source: tuple[str, ...] = ()

    @property
    def disk_paths(self) -> tuple[str, ...]:
        """Every disk-tier directory deleted, over all copies of the pool."""
        return tuple(p for r in self.purges for p in r.disk_paths)

    @property
    def cancelled(self) -> int:
        """Requests cancelled, over all copies of the pool."""
        return sum(r.cancelled for r in self.purges)

    @property
    def drained(self) -> int:
        """Requests waited for, over all copies of the pool."""
        return sum(r.drained for r in self.purges)

    def summary(self) -> dict[str, Any]:
        """The report as JSON values (the audit entry's detail)."""
        return {
            "in_flight": self.in_flight,
            "registry": list(self.registry),
            "contents": list(self.contents),
            "purges": [p.summary() for p in self.purges],
            "source": list(self.source),
        }


PurgeAll = Callable[
    [Sequence[AdapterInfo], InFlightMode, str | None], Awaitable[Sequence[PurgeReport]]
]
"""Runs :meth:`~lorapool.AdapterPool.purge` (adapters, in-flight mode, prefix-cache scope)
on every copy of a pool (Ray Serve's replicas) and returns each one's report:
``forget(..., replicas=...)``."""


# -- deleting a source ---------------------------------------------------------------------


def _source_key(source: str) -> tuple[str, tuple[str, ...]]:
    """A source as a root and path parts, for containment: ``s3://b/x/y`` is
    ``("s3://b", ("x", "y"))``; a local path or ``file://`` URI its real path's parts."""
    parts = urlsplit(source)
    if parts.scheme in ("", "file") or len(parts.scheme) == 1:  # a path (or C:\...)
        path = unquote(parts.path) if parts.scheme == "file" else source
        real = os.path.realpath(os.path.expanduser(path))
        return "file://", tuple(p for p in real.split(os.sep) if p)
    root = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
    return root, tuple(p for p in unquote(parts.path).split("/") if p not in ("", "."))


def sources_overlap(a: str, b: str) -> bool:
    """Whether deleting source ``a`` would delete some of ``b`` or the other way round: the
    same root and one's path a prefix (by whole parts) of the other's. ``s3://b/acme``
    overlaps ``s3://b/acme/y`` and ``s3://b/acme/``, not ``s3://b/acme-2``."""
    (root_a, path_a), (root_b, path_b) = _source_key(a), _source_key(b)
    n = min(len(path_a), len(path_b))
    return root_a == root_b and path_a[:n] == path_b[:n]


# -- requests in flight --------------------------------------------------------------------


class InFlight:
    """The pool's requests by adapter id, so that a forget can drain or cancel them.

    The pool wraps each request's stream with :meth:`track` as soon as the registry has
    resolved its adapter (no await in between, so a forget that removed the adapter from
    the registry sees every request that may still use it). :meth:`stop` waits for an
    adapter's requests to end, cancelling them first when asked.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, set[_Tracked]] = {}

    def track(self, adapter_id: str, stream: AsyncGenerator[Chunk, None]) -> _Tracked:
        """``stream`` (a request's chunks), counted under ``adapter_id`` until it ends."""
        tracked = _Tracked(self, adapter_id, stream)
        self._by_id.setdefault(adapter_id, set()).add(tracked)
        return tracked

    def count(self, adapter_id: str) -> int:
        """Requests using ``adapter_id`` now."""
        return len(self._by_id.get(adapter_id, ()))

    def _ended(self, tracked: _Tracked) -> None:
        live = self._by_id.get(tracked.adapter_id)
        if live is not None:
            live.discard(tracked)
            if not live:
                del self._by_id[tracked.adapter_id]

    async def stop(self, adapter_ids: Sequence[str], mode: InFlightMode) -> tuple[int, int]:
        """Wait until no request uses any of ``adapter_ids``; ``(drained, cancelled)``.

        ``cancel``: each request ends now with :class:`AdapterForgotten` (one waiting for
        its next chunk at once; one whose caller is between two chunks is closed here,
        and its caller gets the error on its next read).
        """
        seen: set[_Tracked] = set()
        while True:
            live = [t for a in adapter_ids for t in self._by_id.get(a, ())]
            if not live:
                return (0, len(seen)) if mode == "cancel" else (len(seen), 0)
            seen.update(live)
            if mode == "cancel":
                for tracked in live:
                    await tracked.cancel()
            waits = [asyncio.ensure_future(t.ended.wait()) for t in live]
            try:
                await asyncio.wait(waits)
            finally:
                for wait in waits:
                    wait.cancel()


class _Tracked(AsyncGenerator[Chunk, None]):
    """A request's stream that a forget can cancel with :class:`AdapterForgotten`.

    A cancel while the caller awaits the next chunk cancels the caller's task there (the
    request's own cleanup runs as for any cancelled request: its reference and place are
    released, what it produced is billed) and turns that cancellation, and only that
    one, into the error. A cancel between two chunks closes the stream at once.
    """

    def __init__(
        self, owner: InFlight, adapter_id: str, stream: AsyncGenerator[Chunk, None]
    ) -> None:
        self.adapter_id = adapter_id
        self.ended = asyncio.Event()
        """Set once the request's stream has ended (finished, failed, closed)."""
        self._owner = owner
        self._stream = stream
        self._task: asyncio.Task[Any] | None = None
        self._waiting = False
        self._forgotten = False
        self._cancel_sent = False
        self._tokens = 0

    def _end(self) -> None:
        if not self.ended.is_set():
            self.ended.set()
            self._owner._ended(self)

    def _error(self) -> AdapterForgotten:
        return AdapterForgotten(self.adapter_id, self._tokens)

    async def cancel(self) -> None:
        """End the request now (see the class)."""
        if self._forgotten or self.ended.is_set():
            self._forgotten = True
            return
        self._forgotten = True
        if self._waiting and self._task is not None:
            self._cancel_sent = True
            self._task.cancel()
            return
        try:
            await self._stream.aclose()
        finally:
            self._end()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._forgotten:
            self._end()
            raise self._error()
        if self.ended.is_set():
            raise StopAsyncIteration
        task = asyncio.current_task()
        self._task, self._waiting = task, True
        try:
            chunk = await self._stream.__anext__()
        except asyncio.CancelledError:
            self._end()
            if self._cancel_sent and task is not None:
                self._cancel_sent = False
                if task.uncancel() == 0:  # the forget's cancel alone: the typed error
                    raise self._error() from None
            raise
        except BaseException:
            self._end()
            raise
        finally:
            self._waiting = False
        if self._forgotten:  # the stream gave a chunk despite the cancel: end it anyway
            if self._cancel_sent and task is not None:
                self._cancel_sent = False
                task.uncancel()
            await self._close()
            raise self._error()
        self._tokens += len(chunk.token_ids)
        return chunk

    async def _close(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._end()

    async def asend(self, value: None) -> Chunk:
        """As :meth:`__anext__` (the stream takes no values)."""
        return await self.__anext__()

    async def athrow(
        self,
        typ: type[BaseException] | BaseException,
        val: BaseException | object = None,
        tb: TracebackType | None = None,
    ) -> Chunk:
        """Close the stream and raise the exception given."""
        await self._close()
        if isinstance(typ, BaseException):
            raise typ
        raise typ() if val is None else val if isinstance(val, BaseException) else typ(val)

    async def aclose(self) -> None:
        """Close the stream (the request is cancelled in the engine and billed)."""
        if not self.ended.is_set():
            await self._close()
