"""AdapterPool: the façade an application embeds.

The path of one request: the registry resolves the adapter and checks the tenant
may use it (here); then :class:`lorapool.request.Lifecycle` takes it: the
scheduler admits and dispatches it, the store makes the adapter resident and holds
a reference, the backend streams tokens, and the request is billed and releases
everything, whatever way the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from lorapool import tracing
from lorapool.abc import Backend, TierName, conform
from lorapool.access import SourceRules
from lorapool.lifecycle.canary import Canary, CanaryPolicy, CanaryWatch, Verdict
from lorapool.lifecycle.forget import (
    ForgetReport,
    InFlight,
    InFlightMode,
    PurgeAll,
    PurgeReport,
    check_in_flight,
    forget_targets,
    sources_overlap,
)
from lorapool.lifecycle.gate import EvalCase, Gate, GateReport, Progress
from lorapool.lifecycle.promotion import Promotion, baseline_of, promotion_split
from lorapool.registry import Registry, check_adapter_id, check_tenant, qualify
from lorapool.registry.audit import AuditEvent, AuditLog, redact_source
from lorapool.registry.follow import RegistryFollower
from lorapool.registry.metadata import check_metadata
from lorapool.request import (
    Ledger,
    Lifecycle,
    PoolStats,
    TenantUsage,
    cache_scope,
    estimate_tokens,
)
from lorapool.scheduler import Scheduler
from lorapool.scheduler.fcfs import FCFSScheduler
from lorapool.signing import (
    SIGNATURE_FILE,
    Keyring,
    Policy,
    SignedManifest,
    SigningPolicy,
    verify_directory,
    verify_files,
)
from lorapool.store import TieredStore

from .errors import (
    AccessDenied,
    AdapterExists,
    AdapterNotFound,
    BackendError,
    InvalidRequest,
    LoadError,
    LorapoolError,
    PoolClosed,
    PromotionRefused,
    SignatureError,
    SourceNotAllowed,
    SourceNotDeletable,
    UnsupportedParameter,
)
from .formats import BaseModelSpec
from .sampling import refuse_unsupported
from .tools import Tool, ToolChoice, ToolPrompt, ToolRequest, tool_chunks, tool_request
from .types import (
    AdapterInfo,
    AdapterMetadata,
    Chunk,
    Completion,
    FinishReason,
    LoraConfig,
    Message,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    Usage,
)
from .validation import validate_adapter

__all__ = [
    "REGISTRY_FILE",
    "AdapterPool",
    "Gathered",
    "PoolStats",
    "Session",
    "TenantUsage",
    "estimate_tokens",
]

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite"
"""The default registry's file name in the store's ``disk_dir``."""


class AdapterPool:
    """Serve many tenants' LoRA adapters over one backend.

    Use it as an async context manager (``async with AdapterPool(...) as pool``);
    it starts the backend on entry and closes it on exit. ``aclose()`` is
    idempotent. ``store`` and ``scheduler`` default to a :class:`TieredStore`
    and an :class:`FCFSScheduler`. ``registry`` may be a :class:`Registry` or
    the path of a SQLite file that keeps registrations across restarts; by
    default it is the SQLite file ``registry.sqlite`` in the store's
    ``disk_dir`` (next to the adapter copies it names), and in memory when
    the store has no ``disk_dir`` of its own. The pool closes a registry it
    opened.

    ``keyring`` (:class:`~lorapool.signing.Keyring`) turns on signed adapters: an adapter
    directory's ``lorapool-signature.json`` is verified at registration and the manifest is
    checked again against the bytes every time the store reads them to fill host RAM,
    under the keyring as it is then (a key revoked since refuses the next load).
    ``signing`` is whose adapters must be signed (:class:`~lorapool.signing.SigningPolicy`,
    ``{tenant: "required"}``, or one policy for all; default ``optional`` for everyone: an
    unsigned adapter is accepted, a present but bad signature never is). Without a
    keyring signatures are not checked, and a ``required`` policy is a ``ValueError``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        store: TieredStore | None = None,
        scheduler: Scheduler | None = None,
        registry: Registry | str | Path | None = None,
        keyring: Keyring | None = None,
        signing: SigningPolicy | Mapping[str, Policy] | Policy | None = None,
    ) -> None:
        self.backend = backend
        self.store = store if store is not None else TieredStore()
        self.scheduler: Scheduler = (
            FCFSScheduler() if scheduler is None else conform(scheduler, Scheduler)
        )
        self._owns_registry = not isinstance(registry, Registry)
        if registry is None:
            home = self.store.persistent_dir
            registry = Registry() if home is None else Registry.open(home / REGISTRY_FILE)
        elif not isinstance(registry, Registry):
            registry = Registry.open(registry)
        self.registry = registry
        self.audit: AuditLog = registry.audit
        """The registry's audit log (:mod:`lorapool.registry.audit`; kept in its store, so
        a SQLite registry's entries survive restarts): registrations, promotions,
        rollbacks, deletions, refused signatures and accesses."""
        self.keyring = keyring
        """The keys adapters may be signed with (``None``: signatures are not checked)."""
        self.signing = SigningPolicy.of(signing)
        """Whose adapters must be signed; change it with ``pool.signing.set(tenant, ...)``."""
        if keyring is None and (
            self.signing.default == "required" or "required" in self.signing.tenants.values()
        ):
            raise ValueError("a signing policy that requires signatures needs a keyring")
        if keyring is not None:
            self.store.verify_with(self._verify_read, files=(SIGNATURE_FILE,))
        self._ledger = Ledger()
        self.stats: PoolStats = self._ledger.stats
        self.canary = CanaryWatch(self._canary_verdict)
        """The canary watch (:mod:`lorapool.lifecycle.canary`): versions :meth:`promote`
        put in canary, judged on their finished requests and :meth:`feedback`."""
        self._ledger.observers.append(self.canary.observe)
        self._lifecycle = Lifecycle(self.backend, self.store, self.scheduler, self._ledger)
        self._in_flight = InFlight()  # requests by adapter id, for forget
        self._removing: set[str] = set()  # ids this pool is unregistering or forgetting now
        self.follower = RegistryFollower(self.registry.store.version, self._drop_removed)
        """Drops, from this pool's tiers and engine, adapters another replica sharing the
        registry store unregistered or forgot (:mod:`lorapool.registry.follow`)."""
        self._base_spec: BaseModelSpec | None = None
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()

    async def __aenter__(self) -> AdapterPool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the backend and wire the store and scheduler to it. Idempotent."""
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise PoolClosed()
            await self.backend.start()
            self._base_spec = await asyncio.to_thread(_base_spec_of, self.backend)
            caps = self.backend.capabilities
            self.store.bind(self.backend)
            self.scheduler.bind(
                max_inflight=caps.max_batch,
                can_dispatch=self.store.can_dispatch,
                on_device=self.store.on_device,
            )
            if caps.preemption:
                self.scheduler.bind_preemption(self.backend.preempt)
            if caps.resume:
                self._lifecycle.bind_handoff()
            self._started = True
            await self.store.on_start(self.registry.visible(None))
            self.follower.start()

    async def aclose(self) -> None:
        """Close the store and the backend. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        await self.follower.aclose()
        try:
            await self.store.aclose()
        finally:
            try:
                await self.backend.aclose()
            finally:
                if self._owns_registry:
                    self.registry.close()

    # -- adapters --------------------------------------------------------------------

    async def register(
        self,
        adapter_id: str,
        source: str,
        *,
        tenant: str,
        shared: bool = False,
        force: bool = False,
        version: str | None = None,
        activate: bool = True,
        allowed: SourceRules | None = None,
        metadata: AdapterMetadata | None = None,
    ) -> AdapterInfo:
        """Register a PEFT LoRA adapter for ``tenant`` under the name ``adapter_id``.

        Names are the tenant's own: the adapter's id is ``tenant/adapter_id``
        (:func:`lorapool.registry.qualify`; ``acme``'s ``support`` is
        ``acme/support``, and ``globex`` may have a ``support`` of its own).
        The tenant uses it by either form; other tenants cannot see it unless
        ``shared``, and then by its name or full id.

        ``source`` is a local directory, a ``file://``, ``s3://bucket/prefix``
        or ``http(s)://`` URI of a directory holding ``adapter_config.json``
        and ``adapter_model.safetensors``. Remote files are downloaded once,
        checked, and kept in the disk tier. Everything is validated before
        anything is recorded (:func:`lorapool.validation.validate_adapter`:
        the files, the config, every tensor against the base model's modules
        and shapes, dtypes, NaN/Inf, weight norms, the declared base): on error
        the registry and the tiers are as they were. ``force`` accepts weight
        norm anomalies and a differing base name, never unsafe files.

        With ``version``, ``adapter_id`` is a movable alias: this registers the
        immutable version ``adapter_id@version`` and (with ``activate``) sends
        all of the alias's traffic to it; see :meth:`set_traffic` and
        :meth:`rollback`. The registry keeps ``keep_versions`` versions per
        alias and removes older ones that carry no traffic.

        ``allowed`` confines where a caller that is not the platform may register
        from (:class:`~lorapool.access.SourceRules`: local roots with symlinks
        resolved, URL and bucket prefixes); a source outside them is refused with
        :class:`~lorapool.errors.SourceNotAllowed` before anything is read, and the
        store's own directories are always refused. ``None``: the platform's own
        call, unconfined.

        ``metadata`` (:class:`~lorapool.types.AdapterMetadata`: training data and config
        hashes, times, retention, compliance flags) is checked before anything is read
        (:class:`~lorapool.errors.InvalidRequest` naming a bad field) and stored with the
        record; :meth:`versions` and :meth:`list_adapters` return it.
        """
        await self.start()
        check_adapter_id(adapter_id)
        check_tenant(tenant)
        checked = check_metadata(AdapterMetadata() if metadata is None else metadata)
        if allowed is not None:
            private = [d for d in (self.store.disk_dir, self.store.persistent_dir) if d]
            with self._refusals(tenant, "register", qualify(adapter_id, tenant)):
                source = await asyncio.to_thread(allowed.check, source, tenant, private=private)
        name = qualify(adapter_id, tenant)
        adapter_id = name if version is None else f"{name}@{version}"
        if version is not None and name in self.registry and not self.registry.version_ids(name):
            raise AdapterExists(name)
        if adapter_id in self.registry:
            raise AdapterExists(adapter_id)
        staged = await self.store.stage(source)
        try:
            signed = await self._verify_staged(
                staged.files.path, staged.files.sha256, adapter_id, tenant
            )
            report = await asyncio.to_thread(
                validate_adapter,
                staged.files.path,
                base=self._base_spec,
                caps=self.backend.capabilities,
                force=force,
                population_norms=self._comparable_norms(staged.files.config),
            )
            report.raise_if_refused()
            info = AdapterInfo(
                adapter_id=adapter_id,
                tenant=tenant,
                shared=shared,
                source=staged.source,
                sha256=staged.files.sha256,
                size_bytes=staged.files.size_bytes,
                config=staged.files.config,
                norm=report.norm,
                metadata=checked,
            )
            if signed is not None:  # the verified manifest and its signer, kept
                info = dataclasses.replace(
                    info,
                    signature=signed.text(),
                    metadata=dataclasses.replace(info.metadata, signer=signed.key_id),
                )
            event = AuditEvent(
                "register",
                tenant,
                adapter_id,
                tenant if allowed is not None else "platform",
                {
                    "source": redact_source(info.source),
                    "sha256": info.sha256,
                    "size_bytes": info.size_bytes,
                    "shared": shared,
                    "version": version,
                    "activate": activate if version is not None else None,
                    "signer": info.metadata.signer,
                },
            )
            if version is None:
                self.registry.add(info, audit=event)
                pruned: list[str] = []
            else:
                pruned = self.registry.add_version(
                    info, name, version, activate=activate, audit=event
                )
        except BaseException:
            await staged.discard()
            raise
        try:
            await staged.commit(adapter_id)
        except BaseException:
            undone = {"reason": "registration undone: the disk tier could not keep its copy"}
            self.registry.remove(adapter_id, audit=_removal(info, "lorapool", undone))
            raise
        self.store.track(info)
        log.info("registered adapter %s for tenant %s (rank %d)", adapter_id, tenant, info.rank)
        for old in pruned:
            await self.store.remove(old)
            reason = {"reason": f"more than keep_versions={self.registry.keep_versions} versions"}
            self.registry.remove(old, audit=_removal(info, "lorapool", reason, adapter=old))
            log.info("removed %s: more than %d versions", old, self.registry.keep_versions)
        return info

    def _comparable_norms(self, config: LoraConfig) -> list[float]:
        """Norms of registered adapters shaped like ``config`` (same rank, targets, scaling).

        The weight-norm outlier test compares a new adapter with these only:
        a rank-64 all-linear adapter is not an outlier among rank-8 ones.
        """
        key = (config.r, config.target_modules, config.use_rslora)
        return [
            i.norm
            for i in self.registry.visible(None)
            if i.norm is not None
            and (i.config.r, i.config.target_modules, i.config.use_rslora) == key
        ]

    async def unregister(self, adapter_id: str, *, tenant: str) -> None:
        """Remove the tenant's adapter once requests using it have finished.

        An alias goes with all its versions; a single version (``name@v2``)
        is refused with ``AdapterInUse`` while it carries traffic.
        """
        with self._refusals(tenant, "unregister", adapter_id):
            key = self.registry.owned_id(adapter_id, tenant)
        versions = self.registry.version_ids(key)
        removed = versions or [key]
        contents = {i.adapter_id: i.sha256 for i in self.registry.visible(None)}
        event = AuditEvent("unregister", tenant, key, tenant, {"versions": removed})
        with self._removing_ids(removed):
            if versions:
                for vid in versions:
                    await self.store.remove(vid)
                self.registry.remove_alias(key, audit=event)
                self.canary.stop(key)  # a watch must not outlive its alias (nor move a new one)
            else:
                self.registry.remove(key, audit=event)  # refuses a version with traffic, first
                await self.store.remove(key)
        self.scheduler.kick()
        await self._forget({contents[i] for i in removed if i in contents})

    async def _drop_removed(self) -> None:
        """The registry changed (another replica may have written it): purge what this
        pool still holds of adapters no longer registered, unless it is removing them
        itself right now."""
        self.registry.store.invalidate()
        registered = {i.adapter_id for i in self.registry.visible(None)}
        gone = [
            i
            for i in self.store.held()
            if i.adapter_id not in registered and i.adapter_id not in self._removing
        ]
        if gone:
            report = await self.purge(gone)
            log.info("dropped %d adapters another replica removed: %s", len(gone), report)

    @contextlib.contextmanager
    def _removing_ids(self, ids: Iterable[str]) -> Iterator[None]:
        """Mark ``ids`` as being removed by this pool (the follower leaves them alone)."""
        mine = set(ids) - self._removing
        self._removing |= mine
        try:
            yield
        finally:
            self._removing -= mine

    async def _forget(self, contents: set[str]) -> None:
        """Have the backend drop what it cached under each content no registered adapter
        has any more (its prefix-cache blocks, ``Capabilities.prefix_cache``)."""
        if not contents or not self._started or not self.backend.capabilities.prefix_cache:
            return
        still = {i.sha256 for i in self.registry.visible(None)}
        for sha256 in sorted(contents - still):
            await self.backend.forget(sha256)

    def set_traffic(self, name: str, split: dict[str, float], *, tenant: str | None) -> None:
        """Split an alias's traffic over its versions by weight, e.g. ``{"v3": 90, "v4": 10}``.

        Each request goes to one version, chosen deterministically from its id.
        """
        with self._refusals(tenant, "set_traffic", name):
            self.registry.set_traffic(name, split, tenant)

    def rollback(self, name: str, *, tenant: str | None) -> dict[str, float]:
        """Put an alias's previous traffic split back; returns it.

        The audit log records it (``rollback``, ``automatic: false``, the splits before and
        after) in the same registry transaction.
        """
        actor = "platform" if tenant is None else tenant
        event = AuditEvent("rollback", tenant, None, actor, {"automatic": False})
        with self._refusals(tenant, "rollback", name):
            return self.registry.rollback(name, tenant, audit=event)

    @contextlib.contextmanager
    def _refusals(self, tenant: str | None, asked: str, adapter: str | None) -> Iterator[None]:
        """Record the refusals lorapool makes on purpose (:class:`AccessDenied`: a shared
        adapter the tenant may use but not change; :class:`SourceNotAllowed`: a source
        outside the caller's rules) as ``access_denied`` entries, then let them go on.

        ``adapter`` is what the tenant asked for. Another tenant's private adapter is
        :class:`AdapterNotFound`, like a missing one, and is not recorded: an entry only
        for names that exist would tell them apart.
        """
        try:
            yield
        except (AccessDenied, SourceNotAllowed) as exc:
            self.record_denied(tenant, asked, adapter, reason=type(exc).__name__)
            raise

    def record_denied(
        self, tenant: str | None, asked: str, adapter: str | None = None, **detail: Any
    ) -> None:
        """Write an ``access_denied`` entry: ``tenant`` was refused ``asked`` (an operation
        or a route) on ``adapter``. A failure to write it is logged, never raised: the
        refusal stands either way."""
        try:
            self.audit.record(
                "access_denied", tenant=tenant, adapter=adapter, actor=tenant, asked=asked, **detail
            )
        except LorapoolError as exc:
            log.error("could not record a refused access of %s (%s): %s", tenant, asked, exc)

    def versions(self, name: str, *, tenant: str | None) -> list[AdapterInfo]:
        """The versions of an alias, oldest first."""
        alias = self.registry.alias(name, tenant)
        return [self.registry.resolve(v, None) for v in self.registry.version_ids(alias.name)]

    # -- lifecycle: signatures (issue 29) ----------------------------------------------

    async def _verify_staged(
        self, path: Path, sha256: str, adapter_id: str, tenant: str
    ) -> SignedManifest | None:
        """Verify a staged adapter's signature (registration); the verified manifest, or
        ``None`` when unsigned (and allowed) or when the pool has no keyring.

        A refusal is recorded in the audit log and raised as :class:`SignatureError`."""
        if self.keyring is None:
            return None
        try:
            signed = await asyncio.to_thread(
                verify_directory,
                path,
                self.keyring,
                tenant=tenant,
                adapter=adapter_id,
                policy=self.signing.for_tenant(tenant),
                adapter_sha256=sha256,
            )
        except SignatureError as exc:
            self._signature_refused(exc, tenant, "register")
            raise
        return signed

    async def _verify_read(
        self, info: AdapterInfo, files: Mapping[str, bytes], checked: bool
    ) -> None:
        """The store's verifier: check the bytes read to fill host RAM against the adapter's
        stored manifest, under the keyring and the tenant's policy as they are now
        (``checked``: the store found their content digest to be ``info.sha256``, which
        the manifest must sign; the weights are not hashed again)."""
        keyring = self.keyring
        if keyring is None:
            return
        try:
            await asyncio.to_thread(
                verify_files,
                info.signature,
                files,
                keyring,
                tenant=info.tenant,
                adapter=info.adapter_id,
                policy=self.signing.for_tenant(info.tenant),
                adapter_sha256=info.sha256,
                content_sha256=info.sha256 if checked else None,
            )
        except SignatureError as exc:
            self._signature_refused(exc, info.tenant, "load")
            raise

    def _signature_refused(self, exc: SignatureError, tenant: str, when: str) -> None:
        """Log and audit a refused signature (nothing else changes)."""
        log.warning("%s (at %s)", exc, when)
        self.audit.record(
            "signature_refused",
            tenant=tenant,
            adapter=exc.adapter,
            reason=exc.reason,
            detail=exc.detail,
            at=when,
        )

    # -- lifecycle: eval-gated promotion and the canary watch (issue 29) ---------------

    async def promote(
        self,
        name: str,
        version: str,
        *,
        tenant: str,
        gate: Gate | None = None,
        canary: float | None = None,
        canary_policy: CanaryPolicy | None = None,
        on_progress: Progress | None = None,
        actor: str | None = None,
    ) -> Promotion:
        """Move the alias ``name`` to its version ``version``, once it passes ``gate``.

        The gate (:class:`~lorapool.lifecycle.Gate`) runs its cases through this pool
        with the candidate and the baseline (the version the alias serves now),
        interleaved, so their requests share the engine's batches; ``on_progress(done,
        total)`` follows it. When a scorer regresses past the gate's threshold the
        promotion is refused with :class:`~lorapool.errors.PromotionRefused` carrying the
        :class:`~lorapool.lifecycle.GateReport`, the alias is left as it was and the audit
        log records ``promotion_refused``. Otherwise the alias sends all its traffic to
        the version, or ``canary`` percent of it (the rest to the baseline), watched by
        :attr:`canary` under ``canary_policy`` (rolled back by itself when it misbehaves);
        the version's metadata gets the gate's scores, the baseline version, the gate's
        identity and ``promoted_at``, and the audit log records ``promote``.

        ``tenant`` must own the alias (a shared alias of another tenant:
        :class:`~lorapool.errors.AccessDenied`); ``actor`` is written to the audit entry.
        """
        await self.start()
        check_tenant(tenant)
        with self._refusals(tenant, "promote", name):
            key = self.registry.owned_id(name, tenant)
        alias = self.registry.alias(key, None)
        if version not in alias.versions:
            raise AdapterNotFound(f"{name}@{version}")
        if canary_policy is not None and canary is None:
            raise InvalidRequest("canary_policy needs canary (the candidate's share in percent)")
        traffic = dict(alias.traffic)
        candidate = alias.version_id(version)
        base_version = baseline_of(traffic, version)
        baseline = None if base_version is None else alias.version_id(base_version)
        split = promotion_split(base_version, version, canary)
        if traffic == split:
            raise InvalidRequest(f"{key} already sends this traffic to {candidate}: {split}")
        report = None
        if gate is not None:
            if baseline is None:
                raise InvalidRequest(
                    f"{key} serves no other version to compare {candidate} with; promote "
                    "without a gate"
                )

            async def generate(case: EvalCase, adapter: str) -> Completion:
                done = await self.complete(
                    case.prompt,
                    adapter=adapter,
                    tenant=tenant,
                    params=case.params,
                    tools=case.tools,
                    tool_choice=case.tool_choice,
                )
                if done.served_by != "adapter":  # the base model, while the adapter loaded
                    raise BackendError(f"{adapter} did not answer (served by {done.served_by})")
                return done

            report = await gate.run(
                generate, candidate=candidate, baseline=baseline, on_progress=on_progress
            )
            if not report.passed:
                self.audit.record(
                    "promotion_refused",
                    tenant=tenant,
                    adapter=candidate,
                    actor=actor,
                    alias=key,
                    baseline=baseline,
                    gate=report.identity,
                    reason=report.reason,
                    scores=report.to_dict()["scores"],
                )
                log.warning("promotion of %s refused: %s", candidate, report.reason)
                raise PromotionRefused(candidate, report.reason, report)
            if dict(self.registry.alias(key, None).traffic) != traffic:
                raise InvalidRequest(
                    f"{key}'s traffic changed while the gate ran; nothing was promoted"
                )
        # Warm the version before it takes traffic: a version that cannot load gets none,
        # and its first requests do not carry a load into the canary's TTFT.
        info = self.registry.resolve(candidate, None)
        if await self.store.warm(info, "device", limited=False) is None:
            raise LoadError(candidate, "device", "the version could not be loaded; not promoted")
        promoted_at = time.time()
        # The metadata first, then the split and its audit entry in one transaction; a
        # failed split puts the metadata back, so a refused write leaves both as they were.
        before = self._record_promotion(candidate, base_version, report, promoted_at)
        event = AuditEvent(
            "promote",
            tenant,
            candidate,
            actor,
            {
                "alias": key,
                "baseline": baseline,
                "canary": canary,
                "automatic": False,
                "gate": None if report is None else report.identity,
                "scores": None if report is None else report.to_dict()["scores"],
            },
        )
        try:
            self.registry.set_traffic(key, split, None, audit=event)
        except BaseException:
            self.registry.set_metadata(candidate, before)
            raise
        if canary is None:
            self.canary.stop(key)
        else:
            assert baseline is not None  # promotion_split refused a canary without one
            self.canary.watch(
                key,
                tenant=alias.tenant,
                stable=baseline,
                candidate=candidate,
                policy=canary_policy if canary_policy is not None else CanaryPolicy(),
            )
        log.info("promoted %s (%s; baseline %s)", candidate, split, baseline)
        return Promotion(candidate, baseline, split, canary, report, promoted_at)

    def _record_promotion(
        self,
        candidate: str,
        baseline: str | None,
        report: GateReport | None,
        promoted_at: float,
    ) -> AdapterMetadata:
        """Write the promotion into the version's metadata (scores, baseline, gate, time);
        returns the metadata it had."""
        before = self.registry.resolve(candidate, None).metadata
        changes: dict[str, Any] = {"promoted_at": promoted_at, "baseline_version": baseline}
        if report is not None:
            changes["eval_scores"] = report.candidate_scores
            changes["gate"] = report.identity
        self.registry.set_metadata(candidate, dataclasses.replace(before, **changes))
        return before

    def feedback(self, request_id: str, score: float, *, tenant: str | None = None) -> bool:
        """A quality score for a finished request (higher is better; e.g. 0 to 1).

        The canary watch compares a canary's mean score with its stable version's. Returns
        whether the score was counted: ``False`` when the request is not a recent request
        of a watched canary (or, with ``tenant``, not that tenant's).
        """
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise InvalidRequest(f"feedback score must be a number, not {score!r}")
        if not math.isfinite(score):
            raise InvalidRequest("feedback score must be finite")
        return self.canary.feedback(request_id, float(score), tenant=tenant)

    def _canary_verdict(self, canary: Canary, verdict: Verdict) -> bool:
        """Carry out the canary watch's verdict: the alias's traffic all to the stable
        version (rollback) or to the candidate (promotion after a clean window); audit
        and log it. ``False`` when the alias is no longer in that canary."""
        stable = canary.stable.rpartition("@")[2]
        candidate = canary.candidate.rpartition("@")[2]
        try:
            traffic = self.registry.alias(canary.alias, None).traffic
        except LorapoolError:
            return False  # the alias is gone
        if traffic.get(stable, 0) <= 0 or traffic.get(candidate, 0) <= 0:
            return False  # someone moved the traffic since
        rollback = verdict.action == "rollback"
        split = {stable if rollback else candidate: 100.0}
        event = AuditEvent(
            "rollback" if rollback else "promote",
            canary.tenant,
            canary.candidate,
            "canary-watch",
            {
                "alias": canary.alias,
                "automatic": True,
                "reason": verdict.reason,
                "stable": canary.stable,
                "numbers": dict(verdict.numbers),
            },
        )
        self.registry.set_traffic(canary.alias, split, None, audit=event)
        if rollback:
            log.warning(
                "canary %s rolled back to %s: %s",
                canary.candidate,
                canary.stable,
                verdict.reason,
                extra={"alias": canary.alias, "canary": dict(verdict.numbers)},
            )
        else:
            log.info("canary %s promoted to all traffic: %s", canary.candidate, verdict.reason)
            with contextlib.suppress(LorapoolError):
                info = self.registry.resolve(canary.candidate, None)
                self.registry.set_metadata(
                    canary.candidate, dataclasses.replace(info.metadata, promoted_at=time.time())
                )
        return True

    # -- lifecycle: forget (issue 29) ---------------------------------------------------

    async def forget(
        self,
        adapter: str | None = None,
        *,
        tenant: str,
        in_flight: InFlightMode = "drain",
        delete_source: bool = False,
        replicas: PurgeAll | None = None,
        actor: str | None = None,
    ) -> ForgetReport:
        """Delete ``tenant``'s adapter (every version of an alias) everywhere, for good.

        ``adapter=None`` forgets every adapter the tenant owns. In order: the registry
        rows go (every version and the alias; from then on every request for it is
        :class:`~lorapool.errors.AdapterNotFound`); the requests already using it finish
        (``in_flight="drain"``) or are cancelled (``"cancel"``: each ends with
        :class:`~lorapool.errors.AdapterForgotten`, billed for what it produced); the store
        drops it from device slots, host RAM and the disk tier (a disk copy stays only while
        another registered adapter, another tenant's, has the same bytes); the backend drops
        it from its own caches and drops prefix/KV state computed with it
        (:meth:`~lorapool.abc.Backend.purge`). With ``delete_source`` the source's files go
        too (a local directory, S3 objects; an ``http(s)://`` source is refused with
        :class:`~lorapool.errors.SourceNotDeletable` before anything changes).

        ``replicas`` runs the purge on every copy of the pool instead of this one only
        (Ray Serve's replicas: :class:`~lorapool.integrations.ray_serve.PoolReplica`).
        Returns a :class:`~lorapool.lifecycle.forget.ForgetReport` of what was removed
        where; the audit log gets a ``forget`` entry with it.
        """
        await self.start()
        check_tenant(tenant)
        mode = check_in_flight(in_flight)
        with self._refusals(tenant, "forget", adapter):
            targets = forget_targets(self.registry, adapter, tenant)
        if delete_source:
            leaving = {i.adapter_id for i in targets.infos}
            others = {i.source for i in self.registry.visible(None) if i.adapter_id not in leaving}
            for info in targets.infos:
                if not self.store.source_deletable(info.source):
                    raise SourceNotDeletable(
                        redact_source(info.source), "its source cannot delete adapters"
                    )
                # Deleting a source deletes everything under it: refuse when another
                # registered adapter is read from it, from inside it, or from around it.
                if any(sources_overlap(info.source, other) for other in others):
                    raise SourceNotDeletable(
                        redact_source(info.source),
                        "another registered adapter is read from it or from within it",
                    )
        report = ForgetReport(
            tenant,
            adapter,
            mode,
            targets.ids,
            tuple(sorted({i.sha256 for i in targets.infos})),
        )
        failure: BaseException | None = None
        infos: list[AdapterInfo] = []  # the records out of the registry so far
        with self._removing_ids(targets.ids):
            try:
                # Whatever fails from here on, what has left the registry is purged and the
                # forget is audited (with "failed"): nothing removed is left unreachable.
                for alias in targets.aliases:
                    self.canary.stop(alias)
                    self.registry.remove_alias(alias)
                    infos += [i for i in targets.infos if i.adapter_id.startswith(f"{alias}@")]
                for key in targets.adapters:
                    self.registry.remove(key)
                    infos += [i for i in targets.infos if i.adapter_id == key]
                # A whole tenant's forget also drops its prefix blocks (the base model's too).
                scope = cache_scope(tenant) if adapter is None else None
                if replicas is None:
                    purges: Sequence[PurgeReport] = [
                        await self.purge(infos, in_flight=mode, scope=scope)
                    ]
                else:
                    purges = await replicas(infos, mode, scope)
                report = dataclasses.replace(report, purges=tuple(purges))
                if delete_source:
                    deleted: list[str] = []
                    for source in sorted({i.source for i in infos}):
                        deleted += await self.store.delete_source(source)
                    report = dataclasses.replace(report, source=tuple(deleted))
            except BaseException as exc:
                failure = exc
                if infos and not report.purges:  # the registry failed part-way: purge what left it
                    with contextlib.suppress(Exception):
                        purged = await self.purge(infos, in_flight=mode)
                        report = dataclasses.replace(report, purges=(purged,))
                raise
            finally:
                detail = report.summary()
                if failure is not None:
                    detail["failed"] = f"{type(failure).__name__}: {failure}"
                    detail["removed"] = [i.adapter_id for i in infos]
                self.audit.record(
                    "forget",
                    tenant=tenant,
                    adapter=adapter,
                    actor=actor if actor is not None else tenant,
                    **detail,
                )
        log.info(
            "forgot %s of tenant %s: %d registry ids, %d disk copies, %d requests cancelled",
            adapter if adapter is not None else "every adapter",
            tenant,
            len(report.registry),
            len(report.disk_paths),
            report.cancelled,
        )
        return report

    async def purge(
        self,
        infos: Sequence[AdapterInfo],
        *,
        in_flight: InFlightMode = "drain",
        scope: str | None = None,
    ) -> PurgeReport:
        """This pool's part of :meth:`forget`, for adapters already out of the registry.

        The registry is read again first (a store shared with other pools may have
        changed); requests using the adapters drain or are cancelled; the store removes
        them from every tier, keeping a disk copy only while a registered adapter has the
        same content; the backend purges them from its caches, and with ``scope`` (a
        forgotten tenant's prefix-cache scope) every block of that scope. Idempotent: an adapter
        this pool never held is simply not found anywhere. Each Ray Serve replica runs
        it when an adapter is forgotten through any of them.
        """
        await self.start()
        mode = check_in_flight(in_flight)
        self.registry.store.invalidate()
        registered = self.registry.visible(None)
        still = {i.adapter_id for i in registered}
        gone = [i for i in infos if i.adapter_id not in still]
        shared = {i.sha256 for i in registered}
        drained, cancelled = await self._in_flight.stop([i.adapter_id for i in gone], mode)
        tiers: dict[str, tuple[str, ...]] = {}
        paths: list[str] = []
        kept: set[str] = set()
        engine: list[str] = []
        for info in gone:
            keep = info.sha256 in shared
            where, path = await self.store.purge(info, keep_disk=keep)
            tiers[info.adapter_id] = tuple(where)
            if path is not None:
                paths.append(str(path))
            if keep:
                kept.add(info.sha256)
        for info in gone:
            engine += await self.backend.purge(info.adapter_id, info.sha256)
        if scope is not None and self.backend.capabilities.prefix_cache:
            await self.backend.forget_scope(scope)
            engine.append("prefix cache: the tenant's blocks")
        self.scheduler.kick()
        return PurgeReport(
            replica=None,
            tiers=tiers,
            disk_paths=tuple(paths),
            disk_kept=tuple(sorted(kept)),
            engine=tuple(engine),
            drained=drained,
            cancelled=cancelled,
        )

    def list_adapters(self, *, tenant: str) -> list[AdapterInfo]:
        """Adapters ``tenant`` may use: its own and the shared ones."""
        return self.registry.visible(tenant)

    async def unload(self, adapter_id: str, *, tenant: str | None) -> None:
        """Free the adapter's device slot and host memory once its requests finish.

        It stays registered (and on disk); the next request loads it again.
        ``tenant`` names whose adapter (``None``: the platform, by full id).
        """
        info = self.registry.resolve(adapter_id, tenant)
        await self.store.unload(info.adapter_id)
        self.scheduler.kick()

    async def prefetch(
        self,
        adapter_id: str,
        *,
        tenant: str | None,
        tier: TierName = "device",
        wait: bool = False,
    ) -> str | None:
        """Hint that ``adapter_id`` will be needed soon: warm it into ``tier``.

        The store rate-limits hints and never lets one evict an adapter that
        requests have used; without room the adapter stops at the tier below.
        With ``wait=True`` this returns the tier the adapter reached, else it
        returns at once (``None``) and the warming runs in the background.
        ``tenant`` names whose adapter (``None``: the platform, by full id).
        """
        await self.start()
        info = self.registry.resolve(adapter_id, tenant)
        if wait:
            return await self.store.warm(info, tier)
        self.store.hint(info, tier)
        return None

    async def preload(
        self,
        adapter_ids: Iterable[str] | None = None,
        *,
        tier: TierName = "host",
        progress: bool | None = None,
    ) -> dict[str, str | None]:
        """Warm many adapters (all registered ones by default) and wait for them.

        Shows a progress bar on a terminal (``progress=None``) or when asked.
        Like every prefetch it never evicts what requests have used. Returns
        ``{adapter id: tier reached}``.
        """
        from tqdm.auto import tqdm

        await self.start()
        ids = (
            list(adapter_ids)
            if adapter_ids is not None
            else [i.adapter_id for i in self.registry.visible(None)]
        )
        infos = [self.registry.resolve(a, None) for a in ids]
        reached: dict[str, str | None] = {}
        disable = None if progress is None else not progress
        with tqdm(
            total=len(infos), desc=f"preload to {tier}", unit="adapter", disable=disable
        ) as bar:

            async def one(info: AdapterInfo) -> None:
                reached[info.adapter_id] = await self.store.warm(info, tier, limited=False)
                bar.update(1)

            await asyncio.gather(*(one(i) for i in infos))
        return reached

    def session(self, tenant: str, *, adapter: str | None = None) -> Session:
        """A tenant's session: prefetches ``adapter`` on entry, then generates with it.

        ``async with pool.session("acme", adapter="acme/support") as s:
        await s.complete("hi")``.
        """
        check_tenant(tenant)
        return Session(self, tenant, adapter)

    async def pin(self, adapter_id: str, *, tenant: str | None) -> None:
        """Load the adapter onto the device and keep it there until :meth:`unpin`.

        ``tenant`` names whose adapter (``None``: the platform, by full id).
        """
        await self.start()
        info = self.registry.resolve(adapter_id, tenant)
        await self.store.pin(info)

    async def unpin(self, adapter_id: str, *, tenant: str | None) -> None:
        """Let a pinned adapter be evicted again."""
        info = self.registry.resolve(adapter_id, tenant)
        self.store.unpin(info.adapter_id)
        self.scheduler.kick()

    # -- generation ------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[Message],
        *,
        adapter: str | None = None,
        tenant: str,
        params: SamplingParams | None = None,
        deadline: float | None = None,
        tools: Sequence[Mapping[str, Any] | Tool] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Stream a completion of ``prompt`` (a string or chat messages) with ``adapter``.

        ``adapter=None`` uses the base model. ``deadline``: seconds from now
        the request may wait for dispatch; past it, it leaves the queue with
        ``DeadlineExceeded`` and is charged nothing. Leaving the loop early
        cancels the request in the engine; every token streamed is billed to the
        tenant (:meth:`usage`) however the stream ends. When the adapter is not on the
        device, the tenant's cold-start policy applies: wait for it, serve from
        the base model meanwhile (the chunks say ``served_by="base"``), or
        refuse with ``ColdStartRejected``.

        ``tools`` (OpenAI's function definitions), ``tool_choice`` (``auto``, ``none``,
        ``required`` or ``{"type": "function", "function": {"name": ...}}``) and
        ``parallel_tool_calls`` ask for tool calls (:mod:`lorapool.tools`): the tools are
        rendered into the chat prompt, and a sample's calls come in its last chunk
        (``Chunk.tool_calls``, finish reason ``tool_calls``); while its output may still
        be a call its text is held back. ``required`` or a named function constrain the
        output to calls, so the backend must honour ``structured.json_schema``. A backend
        without ``Capabilities.tools`` refuses tools with ``UnsupportedParameter``.

        ``request_id``: the request's id (default: a fresh one), which picks its version
        of an alias's traffic split and names it to :meth:`feedback`.
        """
        await self.start()
        check_tenant(tenant)
        if not isinstance(prompt, str) and not isinstance(prompt, Sequence):
            raise InvalidRequest(
                "prompt must be a string or a list of {'role', 'content'} messages"
            )
        params = params if params is not None else SamplingParams()
        calls = tool_request(tools, tool_choice, parallel_tool_calls)
        if calls is not None:
            prompt, params = self._with_tools(prompt, params, calls)
        refuse_unsupported(params, self.backend.capabilities.sampling, type(self.backend).__name__)
        request_id = _request_id(request_id)
        span = tracing.request(tenant, adapter)  # None unless lorapool.tracing is enabled
        try:
            with tracing.phase(span, "lorapool.registry.resolve"):
                info = (
                    self.registry.resolve(adapter, tenant, request_id=request_id)
                    if adapter is not None
                    else None
                )
            run = self._lifecycle.run(
                request_id,
                prompt,
                info,
                tenant=tenant,
                params=params,
                deadline=deadline,
                tools=() if calls is None else calls.definitions(),
                span=span,
            )
            if info is not None:  # no await since resolve: a forget sees this request
                run = self._in_flight.track(info.adapter_id, run)
            stream = run if calls is None or not calls.calls else tool_chunks(run, calls)
            async with contextlib.aclosing(run), contextlib.aclosing(stream):
                # the caller leaving ends the request at once
                async for chunk in stream:
                    yield chunk
        finally:
            if span is not None:
                span.end("error")  # a no-op when the lifecycle ended it with its outcome

    def _with_tools(
        self, prompt: str | Sequence[Message], params: SamplingParams, calls: ToolRequest
    ) -> tuple[ToolPrompt, SamplingParams]:
        """The prompt carrying the tools to render, and the parameters constraining the
        output to calls where the choice forces them."""
        if isinstance(prompt, str):
            raise InvalidRequest("tools need a chat prompt (a list of messages), not a string")
        if calls.rendered and not self.backend.capabilities.tools:
            raise UnsupportedParameter(type(self.backend).__name__, ["tools"])
        constraint = calls.constraint()
        if constraint is not None:
            if params.structured is not None:
                raise InvalidRequest(
                    f"tool_choice {calls.choice!r} constrains the answer to tool calls; it "
                    "cannot also follow structured output (response_format): send one"
                )
            params = params.model_copy(update={"structured": constraint})
        return ToolPrompt(prompt, calls.definitions()), params

    def usage(self, tenant: str) -> TenantUsage:
        """A copy of the tenant's totals since the pool started (for billing and quotas)."""
        return self._ledger.usage(tenant)

    async def complete(
        self,
        prompt: str | Sequence[Message],
        *,
        adapter: str | None = None,
        tenant: str,
        params: SamplingParams | None = None,
        deadline: float | None = None,
        tools: Sequence[Mapping[str, Any] | Tool] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        request_id: str | None = None,
    ) -> Completion:
        """Generate the whole completion and return it at once (see :meth:`generate`).

        With ``n`` samples, the top-level fields are sample 0's and ``choices`` holds every
        sample by index; ``usage`` is the whole request's.
        """
        gathered = Gathered()
        stream = self.generate(
            prompt,
            adapter=adapter,
            tenant=tenant,
            params=params,
            deadline=deadline,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            request_id=request_id,
        )
        async for chunk in stream:
            gathered.add(chunk)
        return gathered.completion(adapter)


class Gathered:
    """A stream's chunks gathered into one :class:`Completion` (:meth:`AdapterPool.complete`;
    the server's answers that do not stream): a sample per ``Chunk.index``."""

    def __init__(self) -> None:
        self._samples: dict[int, _Sample] = {}
        self.usage: Usage | None = None

    def add(self, chunk: Chunk) -> None:
        """Add the stream's next chunk."""
        sample = self._samples.get(chunk.index)
        if sample is None:
            sample = self._samples[chunk.index] = _Sample()
        sample.add(chunk)
        if chunk.usage is not None:
            self.usage = chunk.usage

    def completion(self, adapter: str | None) -> Completion:
        """Sample 0's fields with every sample in ``choices`` (for more than one); ``usage``
        the whole request's. ``RuntimeError`` when the stream ended without its last chunk."""
        samples, usage = self._samples, self.usage
        if not samples or usage is None or any(s.finish is None for s in samples.values()):
            raise RuntimeError("the backend ended the stream without a final chunk")
        choices = tuple(samples[i].completion(i, usage, adapter) for i in sorted(samples))
        if len(choices) == 1:
            return choices[0]
        return dataclasses.replace(choices[0], choices=choices)


@dataclass
class _Sample:
    """One sample's chunks, gathered for :meth:`AdapterPool.complete`."""

    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    finish: FinishReason | None = None
    served_by: str = "adapter"

    def add(self, chunk: Chunk) -> None:
        """Add one of the sample's chunks."""
        self.texts.append(chunk.text)
        self.ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.calls.extend(chunk.tool_calls)
        self.served_by = chunk.served_by
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason

    def completion(self, index: int, usage: Usage, adapter: str | None) -> Completion:
        """The sample as a :class:`Completion` (``usage``: the whole request's)."""
        if self.finish is None:
            raise RuntimeError("the backend ended the stream without a final chunk")
        return Completion(
            text="".join(self.texts),
            token_ids=tuple(self.ids),
            finish_reason=self.finish,
            usage=usage,
            adapter_id=adapter,
            served_by=self.served_by,
            index=index,
            logprobs=tuple(self.logprobs),
            tool_calls=tuple(self.calls),
        )


def _request_id(request_id: str | None) -> str:
    """The caller's request id, checked, or a fresh one."""
    if request_id is None:
        return uuid.uuid4().hex
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 200:
        raise InvalidRequest("request_id must be a string of 1 to 200 characters")
    return request_id


def _removal(
    info: AdapterInfo, actor: str, detail: dict[str, Any], *, adapter: str | None = None
) -> AuditEvent:
    """The ``unregister`` entry for a removal lorapool makes itself (an undone
    registration, an old version pruned)."""
    return AuditEvent("unregister", info.tenant, adapter or info.adapter_id, actor, detail)


def _base_spec_of(backend: Backend) -> BaseModelSpec | None:
    """The base model's description for validation, when the backend runs a local checkpoint."""
    model_path = backend.capabilities.model_path
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        log.info("no local base checkpoint: adapters are validated without base-model checks")
        return None
    try:
        return BaseModelSpec.from_dir(model_path)
    except (OSError, ValueError) as exc:
        log.warning(
            "cannot describe the base model at %s (%s); validating without it", model_path, exc
        )
        return None


class Session:
    """One tenant's run of requests, usually with one adapter (see :meth:`AdapterPool.session`)."""

    def __init__(self, pool: AdapterPool, tenant: str, adapter: str | None) -> None:
        self.pool = pool
        self.tenant = tenant
        self.adapter = adapter

    async def __aenter__(self) -> Session:
        if self.adapter is not None:
            await self.pool.prefetch(self.adapter, tenant=self.tenant)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def generate(
        self,
        prompt: str | Sequence[Message],
        *,
        params: SamplingParams | None = None,
        deadline: float | None = None,
        tools: Sequence[Mapping[str, Any] | Tool] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> AsyncIterator[Chunk]:
        """Stream a completion with the session's tenant and adapter (tools as for
        :meth:`AdapterPool.generate`)."""
        return self.pool.generate(
            prompt,
            adapter=self.adapter,
            tenant=self.tenant,
            params=params,
            deadline=deadline,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )

    async def complete(
        self,
        prompt: str | Sequence[Message],
        *,
        params: SamplingParams | None = None,
        tools: Sequence[Mapping[str, Any] | Tool] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> Completion:
        """The whole completion with the session's tenant and adapter."""
        return await self.pool.complete(
            prompt,
            adapter=self.adapter,
            tenant=self.tenant,
            params=params,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )
