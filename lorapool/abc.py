"""The seams: every interface a plugin (or a part of lorapool) implements, in one place.

=================  ==========================================  =============================
seam               built in                                    how lorapool finds one
=================  ==========================================  =============================
:class:`Backend`   ``TorchBackend``, ``VLLMBackend``, ...      entry points ``lorapool.backends``
:class:`EvictionPolicy`  ``lru``, ``sieve``, ``wtinylfu``, ...  entry points ``lorapool.policies``
:class:`Source`    ``file``, ``s3``, ``http``, ``https``       entry points ``lorapool.sources``
:class:`PrefetchPolicy`  ``Preload``, ``SessionHint``, ...     passed to ``TieredStore``
:class:`Scheduler` ``FairScheduler``, ``FCFSScheduler``         passed to ``AdapterPool``
:class:`RegistryStore`   SQLite, in memory, Ray actor          passed to ``Registry``
=================  ==========================================  =============================

Each Protocol lists every method lorapool may call, optional abilities included,
and says how an implementation declares whether it offers one:

* a backend declares its abilities in :class:`~lorapool.types.Capabilities`
  (``preemption``, ``resume``, ``engine_cache``, ``pass_stats``, ``prefix_cache``);
  lorapool calls :meth:`Backend.preempt`, :meth:`Backend.discard`,
  :meth:`Backend.adapters_per_pass`, :meth:`Backend.forget`,
  :meth:`Backend.forget_scope` and
  :meth:`Backend.prefix_cache_stats` only when the flag is set, and
  :meth:`Backend.purge` whenever an adapter is forgotten (``BaseBackend`` gives it);
* the other seams' optional methods have a default body (the ability not offered):
  subclass the Protocol to inherit it, or define the method.

lorapool never probes an object for a method. Where it takes a user's object it
checks it once against the seam with :func:`conform`, which refuses an object that
lacks a required method (:class:`~lorapool.errors.InvalidRequest` naming it) and
gives one that lacks an optional method the seam's default.

Nothing here imports an engine, torch, or any of lorapool's wings.
"""

from __future__ import annotations

import warnings
from collections.abc import (
    AsyncIterator,
    Collection,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, runtime_checkable

from lorapool.errors import InvalidRequest

if TYPE_CHECKING:
    from lorapool.scheduler.base import (
        ColdStart,
        DispatchCheck,
        HandoffHook,
        PreemptHook,
        ResidencyCheck,
        Ticket,
    )
    from lorapool.types import (
        AdapterInfo,
        Capabilities,
        Chunk,
        GenerationRequest,
        LoadedAdapter,
        PrefixCacheStats,
    )

__all__ = [
    "Backend",
    "EvictionPolicy",
    "PrefetchPolicy",
    "RegistryStore",
    "Scheduler",
    "Source",
    "TierName",
    "OPTIONAL",
    "Warm",
    "conform",
    "lacks",
]

T = TypeVar("T")

TierName = Literal["device", "host", "disk"]
"""The store's tiers, fastest first."""


@runtime_checkable
class Backend(Protocol):
    """An engine that runs many LoRA adapters over one base model.

    A backend owns device memory and the forward pass. It does not decide what to
    evict or whom to serve: the store tells it which adapter goes into which slot,
    the scheduler decides which request it gets next. Optional abilities are
    declared in :attr:`capabilities`; ``lorapool.backends.base.BaseBackend`` gives
    the defaults (and the lifecycle and chat-template glue every backend shares).
    """

    @property
    def capabilities(self) -> Capabilities:
        """Slots, max rank, batch size, base model and abilities; valid after :meth:`start`."""
        ...

    async def start(self) -> None:
        """Load the base model and get ready to serve. Idempotent."""
        ...

    async def aclose(self) -> None:
        """Stop serving and free the engine. Idempotent."""
        ...

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Turn verified bytes into the host-tier form this backend loads fastest.

        Called once when the adapter enters the host tier, off the engine's step.
        Return the adapter unchanged if there is nothing to gain; raise to refuse
        an adapter the engine cannot serve.
        """
        ...

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Copy an adapter's weights into device slot ``slot``, replacing what was there."""
        ...

    def device_nbytes(self, adapter: LoadedAdapter) -> int:
        """Device bytes the (prepared) adapter takes in a slot.

        Read only when ``capabilities.device_bytes`` is set: the store then keeps the
        sum over resident adapters within that budget, evicting by its policy (which
        sees these sizes) until the adapter fits. ``BaseBackend`` returns 0.
        """
        ...

    async def unload(self, adapter_id: str) -> None:
        """Free the slot that holds ``adapter_id``; no request may be using it."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator cancels the request."""
        ...

    async def health(self) -> bool:
        """True while the engine can serve."""
        ...

    def preempt(self, request_id: str) -> bool:
        """Ask the engine to give the request's place to a waiting request.

        Called only when ``capabilities.preemption``. Non-blocking and safe to call
        from the event loop. The request's stream pauses and resumes later with the
        same output (recomputed, not lost). Returns False when the request is not
        running now or was already asked to pause (and not resumed since): each
        True frees one place.
        """
        ...

    async def discard(self, adapter_id: str) -> None:
        """Drop an adapter that holds no slot from the engine's own cache.

        Called only when ``capabilities.engine_cache`` (the engine keeps adapters
        evicted from a slot, as vLLM's CPU LoRA cache does), when the store unloads
        the adapter, so unregistered adapters do not stay there. A no-op if it is
        not there.
        """
        ...

    def adapters_per_pass(self) -> Mapping[int, int]:
        """Forward passes since start, by the distinct adapters in each (``{n: passes}``).

        Called only when ``capabilities.pass_stats``, from the event loop when metrics
        are scraped: the engine counts each pass as it runs it (0: the base model
        only), and this returns a copy. Plain counts; whoever reads them makes the
        histogram.
        """
        ...

    async def forget(self, sha256: str) -> None:
        """Drop what the engine cached under an adapter content (its prefix-cache blocks).

        Called only when ``capabilities.prefix_cache``, by the pool when an adapter is
        unregistered and no adapter still registered has the same content (``sha256``
        of its weights and config, :attr:`~lorapool.types.LoadedAdapter.sha256`). A
        no-op for a content with nothing cached. Requests already running are not
        affected (a cache keyed by content never serves one content's state to another).
        """
        ...

    async def forget_scope(self, scope: str) -> None:
        """Drop what the engine cached in one prefix-cache scope: a tenant's blocks,
        whatever the content (the base model's included).

        Called only when ``capabilities.prefix_cache``, when a whole tenant is forgotten
        (``AdapterPool.forget`` without an adapter), with the scope that tenant's requests
        carried (:attr:`~lorapool.types.GenerationRequest.cache_scope`). A backend that
        cannot drop one scope drops its whole prefix cache.
        """
        ...

    async def purge(self, adapter_id: str, sha256: str) -> Sequence[str]:
        """Remove every trace of an adapter the pool forgets (``AdapterPool.forget``).

        Always called (whatever the capabilities), once the store has unloaded the
        adapter (it holds no slot, no request uses it): drop it from any cache of the
        engine's own (vLLM's CPU LoRA cache, files written for the engine) and drop state
        computed with it (prefix/KV blocks under its content ``sha256``), even where another
        adapter has the same content (its blocks are recomputed when next needed). Returns
        what it dropped, in a few words each, for the forget's report.
        ``BaseBackend``'s default: :meth:`discard` (``engine_cache``) and :meth:`forget`
        (``prefix_cache``).
        """
        ...

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters and size now (``None``: not counted).

        Called only when ``capabilities.prefix_cache``, from the event loop when
        metrics are scraped; cheap and non-blocking.
        """
        ...


@runtime_checkable
class EvictionPolicy(Protocol):
    """Chooses which entry a full tier gives up.

    ``victim`` receives only entries the tier may evict (not pinned, not in use)
    and must return one of them, or ``None`` when it is empty. Policies are pure
    and synchronous: keys, sizes and costs, never bytes or I/O.
    """

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        """An entry entered the tier (``cost``: seconds it took to load)."""
        ...

    def on_access(self, key: Hashable) -> None:
        """An entry was used."""
        ...

    def on_remove(self, key: Hashable) -> None:
        """An entry left the tier (evicted or removed)."""
        ...

    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        """The entry to evict among ``evictable``."""
        ...

    def expired(self) -> Collection[Hashable]:
        """Entries to drop now whether or not the tier is full (optional; default: none).

        A time-to-live policy returns the entries idle past their TTL; the tier
        drops those no request holds.
        """
        return ()


@dataclass(frozen=True)
class Warm:
    """A prefetch proposal: bring ``adapter_id`` to ``tier``."""

    adapter_id: str
    tier: TierName = "device"


@runtime_checkable
class PrefetchPolicy(Protocol):
    """Observes the pool and proposes adapters to warm (every method optional).

    A policy only proposes: the store decides what it acts on (a rate limit, a
    bounded queue, and a warmed entry may only displace other speculative ones).
    """

    def on_start(self, adapter_ids: Sequence[str]) -> Iterable[Warm]:
        """The pool started with these adapters registered (default: nothing)."""
        return ()

    def on_hint(self, adapter_id: str) -> Iterable[Warm]:
        """An application said a session using ``adapter_id`` is starting (default: nothing)."""
        return ()

    def on_request(self, adapter_id: str) -> Iterable[Warm]:
        """A request using ``adapter_id`` finished (default: nothing)."""
        return ()

    def keep_warm(self) -> Collection[str]:
        """Adapters the device tier should give up last, now (default: none)."""
        return ()


@runtime_checkable
class Source(Protocol):
    """Where adapters come from, for one URI scheme.

    A source knows how to copy one file of an adapter directory from where the
    adapter lives (a local directory, an S3 prefix, an HTTP directory) to a local
    file. The store decides where that file goes, checks its sha256 and retries
    transient failures; a source only moves bytes.
    """

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        """Write file ``name`` of the adapter at ``uri`` to ``dest``; return the bytes written.

        Raise :class:`~lorapool.errors.SourceNotFound` when the file does not exist
        and :class:`~lorapool.errors.SourceError` (``transient=True`` when a retry
        may help) for anything else.
        """
        ...

    def local_path(self, uri: str) -> Path | None:
        """The directory itself when ``uri`` is already on local disk (default: ``None``).

        The store reads local adapters in place instead of copying them into its
        disk tier.
        """
        return None

    async def aclose(self) -> None:
        """Release connections. Idempotent (default: nothing to release)."""
        return None

    def can_delete(self, uri: str) -> bool:
        """Whether :meth:`delete` can delete the adapter at ``uri`` (default: no).

        Asked before a forget with ``delete_source=True`` changes anything.
        """
        return False

    async def delete(self, uri: str) -> list[str]:
        """Delete the adapter at ``uri``: its directory (everything in it) or its archive;
        return what was deleted, as paths or URIs. Only called when :meth:`can_delete`."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete {uri}")


@runtime_checkable
class RegistryStore(Protocol):
    """Durable (or not) storage of :class:`~lorapool.types.AdapterInfo` records and settings."""

    def insert(self, info: AdapterInfo) -> None:
        """Add a record; :class:`~lorapool.errors.AdapterExists` if the id is taken (atomically)."""
        ...

    def delete(self, adapter_id: str) -> None:
        """Remove a record (no-op if absent)."""
        ...

    def records(self) -> Iterator[AdapterInfo]:
        """Every record, in insertion order."""
        ...

    def get_setting(self, key: str) -> str | None:
        """A named value (aliases and traffic splits live here as JSON)."""
        ...

    def set_setting(self, key: str, value: str | None) -> None:
        """Set (``None``: delete) a named value."""
        ...

    def version(self) -> int:
        """A number that changes when another process or node changed the store.

        The registry reads it before each lookup and reloads its in-memory view
        when it moved, so pools that share a store (replicas of one deployment) see
        each other's registrations. Default: a constant (only this process writes).
        """
        return 0

    def transaction(self) -> AbstractContextManager[None]:
        """A context in which the changes made are all kept or, on an exception, none.

        The registry makes each change (a record and the aliases naming it)
        inside one. Default: no atomicity (each write stands alone); a durable
        store should override it (SQLite: one ``BEGIN IMMEDIATE`` ... ``COMMIT``).
        """
        return nullcontext()

    def invalidate(self) -> None:
        """Forget any cached :meth:`version`, so the next call asks the source of truth.

        Default: nothing cached. The registry calls it when a lookup misses, so an id
        registered through another replica a moment ago resolves at once.
        """
        return None

    def close(self) -> None:
        """Release the store. Idempotent (default: nothing to release)."""
        return None


@runtime_checkable
class Scheduler(Protocol):
    """Decides whose request runs next.

    Whatever its policy, a scheduler keeps two bounds the pool relies on: at most
    ``max_inflight`` requests in flight, and never more distinct adapters in flight
    than the store can hold on the device (``can_dispatch``).
    ``lorapool.scheduler.DispatchState`` keeps that state; the optional abilities
    (preemption, hand-off, service tiers) default to not used.
    """

    @property
    def queued(self) -> int:
        """Requests waiting for dispatch (the queue-depth metric)."""
        ...

    def bind(
        self,
        *,
        max_inflight: int,
        can_dispatch: DispatchCheck,
        on_device: ResidencyCheck | None = None,
    ) -> None:
        """Called once by the pool at start with the engine's limits."""
        ...

    def bind_preemption(self, preempt: PreemptHook | None) -> None:
        """Called by the pool at start when its backend can preempt running requests.

        Optional: a scheduler that never preempts ignores it (the default).
        """
        return None

    def bind_handoff(self, hand_off: HandoffHook | None) -> None:
        """Called by the pool at start when its backend can resume handed-off requests.

        Optional: a scheduler that never hands a slot off ignores it (the default).
        """
        return None

    async def acquire(self, ticket: Ticket) -> None:
        """Admit ``ticket`` and wait until it is dispatched.

        May refuse it (``RateLimited``, ``Overloaded``) or give up at its deadline
        (``DeadlineExceeded``). Cancelling the wait withdraws it.
        """
        ...

    def charge(self, ticket: Ticket, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Service a dispatched request received (output as it is produced)."""
        ...

    def cold_start(self, tenant: str) -> ColdStart:
        """The tenant's policy for a request whose adapter is not on the device."""
        ...

    def release(self, ticket: Ticket) -> None:
        """The dispatched request finished (or failed); free its place."""
        ...

    def kick(self) -> None:
        """Something outside changed (a pin, an unload): try to dispatch again."""
        ...

    def tier_of(self, tenant: str) -> str | None:
        """The tenant's service tier (optional; default ``None``: no tiers)."""
        return None

    @property
    def queued_by_tier(self) -> dict[str, int]:
        """Requests waiting per service tier (optional; default empty: no tiers)."""
        return {}


OPTIONAL: dict[type[Any], frozenset[str]] = {
    EvictionPolicy: frozenset({"expired"}),
    PrefetchPolicy: frozenset({"on_start", "on_hint", "on_request", "keep_warm"}),
    Source: frozenset({"local_path", "aclose", "can_delete", "delete"}),
    RegistryStore: frozenset({"version", "invalidate", "close", "transaction"}),
    Scheduler: frozenset({"bind_preemption", "bind_handoff", "tier_of", "queued_by_tier"}),
}
"""The optional methods of each seam whose Protocol gives them a default body."""


def _members(seam: type[Any]) -> list[str]:
    names = getattr(seam, "__protocol_attrs__", None)
    if names is None:  # Python < 3.12
        from typing import _get_protocol_attrs  # type: ignore[attr-defined]

        names = _get_protocol_attrs(seam)
    return sorted(names)


class _WithDefaults:
    """An object of a user's that lacks some optional methods, given the seam's defaults."""

    def __init__(self, obj: object, seam: type[Any], lacking: list[str]) -> None:
        self._obj = obj
        for name in lacking:
            setattr(self, name, getattr(seam, name).__get__(self))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)

    def __repr__(self) -> str:
        return repr(self._obj)


def lacks(obj: object, seam: type[Any]) -> list[str]:
    """The required methods of ``seam`` that ``obj`` does not have (empty: it conforms)."""
    optional = OPTIONAL.get(seam, frozenset())
    return [n for n in _members(seam) if n not in optional and not hasattr(obj, n)]


def conform(obj: T, seam: Any, *, what: str | None = None) -> T:
    """``obj`` as an implementation of ``seam``, checked once where lorapool receives it.

    Refuses (:class:`~lorapool.errors.InvalidRequest`) an object without every
    required method of the seam, naming what is missing. An object without some of
    the seam's optional methods is wrapped to use the seam's defaults for them.
    """
    label = what or f"a {seam.__name__}"
    required = lacks(obj, seam)
    if required:
        raise InvalidRequest(
            f"{type(obj).__name__} is not {label}: it lacks {', '.join(required)} "
            f"(see lorapool.abc.{seam.__name__})"
        )
    missing = [n for n in _members(seam) if not hasattr(obj, n)]
    if not missing:
        return obj
    if isinstance(obj, type):
        raise InvalidRequest(f"{obj.__name__} is a class; {label} must be an instance")
    warnings.warn(
        f"{type(obj).__name__} does not define {', '.join(missing)}; it gets the defaults of "
        f"lorapool.abc.{seam.__name__} (subclass it to inherit them without this warning)",
        DeprecationWarning,
        stacklevel=3,
    )
    return cast(T, _WithDefaults(obj, seam, missing))
