"""Which adapters exist, who owns them, and who may use them.

The registry keeps the tenancy rules; its records live in a
:class:`~lorapool.registry.RegistryStore`: in memory by default, or in
a SQLite file (``Registry.open("registry.sqlite")``) that survives restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorapool.abc import conform
from lorapool.errors import (
    AccessDenied,
    AdapterExists,
    AdapterInUse,
    AdapterNotFound,
    InvalidRequest,
)
from lorapool.registry.audit import AuditEvent, AuditLog
from lorapool.registry.metadata import check_metadata
from lorapool.registry.stores import MemoryRegistryStore, RegistryStore, SqliteRegistryStore
from lorapool.types import AdapterInfo, AdapterMetadata

__all__ = ["Alias", "Registry", "check_adapter_id", "check_tenant", "qualify"]

_ALIASES = "aliases"


@dataclass
class Alias:
    """A movable name over immutable versions (``acme/support`` -> ``acme/support@v3``).

    ``traffic`` maps versions to weights; a request picks one deterministically
    from its request id. ``history`` keeps earlier traffic splits for rollback.
    """

    name: str
    tenant: str
    shared: bool
    versions: list[str] = field(default_factory=list)
    traffic: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def version_id(self, version: str) -> str:
        """The registry id of one version."""
        return f"{self.name}@{version}"

    def pick(self, request_id: str) -> str:
        """The version a request goes to: a stable hash of its id into the weights."""
        total = sum(self.traffic.values())
        digest = hashlib.sha256(f"{self.name}\0{request_id}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * total
        for version, weight in sorted(self.traffic.items()):
            point -= weight
            if point < 0:
                return version
        return max(self.traffic, key=lambda v: self.traffic[v])


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")


def check_adapter_id(adapter_id: str) -> None:
    """Refuse ids that are empty, too long, or not ``name`` / ``tenant/name`` shaped."""
    if not isinstance(adapter_id, str) or not _ID.match(adapter_id) or len(adapter_id) > 200:
        raise InvalidRequest(
            f"adapter id {adapter_id!r} is not valid: use letters, digits, '.', '_', '-' in "
            "'/'-separated parts, at most 200 characters (e.g. 'acme/support')"
        )


def check_tenant(tenant: str) -> None:
    """Refuse tenant names that could not prefix an adapter id (``acme``, ``team-7``)."""
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise InvalidRequest(
            f"tenant {tenant!r} is not a valid tenant name: use 1 to 64 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit, no '/'"
        )


def _checked(info: AdapterInfo) -> AdapterInfo:
    """``info`` with its metadata checked and in stored form (:func:`check_metadata`)."""
    metadata = check_metadata(info.metadata)
    if info.signature is not None and not isinstance(info.signature, str):
        raise InvalidRequest("signature must be the signed manifest's JSON text or None")
    return info if metadata == info.metadata else dataclasses.replace(info, metadata=metadata)


def _about(audit: AuditEvent | None, alias: Alias, before: dict[str, float]) -> AuditEvent | None:
    """``audit`` completed for a traffic change of ``alias``: its owner and id where the
    event leaves them out, and the split before and after."""
    if audit is None:
        return None
    return dataclasses.replace(
        audit,
        tenant=alias.tenant if audit.tenant is None else audit.tenant,
        adapter=alias.name if audit.adapter is None else audit.adapter,
        detail={**audit.detail, "from": dict(before), "to": dict(alias.traffic)},
    )


def qualify(name: str, tenant: str) -> str:
    """The registry id of ``tenant``'s adapter ``name``: ``tenant/name``.

    Names are scoped to their tenant: ``acme``'s ``support`` is ``acme/support``
    and ``globex``'s is ``globex/support``. A name that already starts with
    ``tenant/`` is its own id (``acme`` may say ``support`` or ``acme/support``).
    Tenant names hold no ``/``, so two tenants' ids never collide.
    """
    return name if name.startswith(f"{tenant}/") else f"{tenant}/{name}"


class Registry:
    """Adapter metadata with tenancy: names are scoped to their tenant.

    Each adapter's id is ``tenant/name`` (:func:`qualify`); a tenant names its
    own adapters with or without the prefix, and shared adapters by their name
    without the owner's prefix (or their full id). Another tenant's private
    adapter is not found, exactly like one that does not exist: lookups never
    say that a name is taken by someone else. ``tenant=None`` is the platform:
    any adapter by its full id.

    Reads come from memory; every change is written through to ``store``
    first, in one transaction, so a failed write changes nothing. Before each
    read the registry asks the store for its
    :meth:`~lorapool.registry.RegistryStore.version` and reloads when another
    process changed it: pools sharing one store see each other's registrations
    and removals.
    """

    def __init__(self, store: RegistryStore | None = None, *, keep_versions: int = 5) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.store: RegistryStore = (
            MemoryRegistryStore() if store is None else conform(store, RegistryStore)
        )
        self.keep_versions = keep_versions
        self.audit = AuditLog(self.store)
        """The audit log (:mod:`lorapool.registry.audit`), kept in :attr:`store`."""
        self._adapters: dict[str, AdapterInfo] = {}
        self._aliases: dict[str, Alias] = {}
        self._shared: dict[str, str] | None = None
        self._seen: int | None = None
        self._reload()

    def _store_version(self) -> int | None:
        try:
            return int(self.store.version())
        except RuntimeError:  # closed: keep serving what is in memory
            return self._seen

    def _reload(self) -> None:
        self._seen = self._store_version()
        self._adapters = {i.adapter_id: i for i in self.store.records()}
        raw = self.store.get_setting(_ALIASES)
        self._aliases = {
            name: Alias(**fields) for name, fields in (json.loads(raw) if raw else {}).items()
        }
        self._shared = None

    def _sync(self) -> None:
        """Reload if another process changed the store since we last looked."""
        if self._seen is not None and self._store_version() != self._seen:
            self._reload()

    def _refresh(self) -> None:
        """Ask a store that caches its version (a remote one) again, past its cache.

        Called when a lookup misses: an id registered through another replica a
        moment ago resolves at once.
        """
        self.store.invalidate()
        if self._store_version() != self._seen:
            self._reload()

    @classmethod
    def open(cls, path: str | Path) -> Registry:
        """A registry kept in the SQLite file at ``path`` (created if missing)."""
        return cls(SqliteRegistryStore(path))

    def close(self) -> None:
        """Close the store. Idempotent."""
        self.store.close()

    def __len__(self) -> int:
        self._sync()
        return len(self._adapters)

    def __contains__(self, adapter_id: object) -> bool:
        """Whether a full id (``tenant/name``, an alias or a version) is registered."""
        self._sync()
        return adapter_id in self._adapters or adapter_id in self._aliases

    # -- names -----------------------------------------------------------------------

    def _owner(self, key: str) -> tuple[str, bool] | None:
        """The owner of the adapter or alias ``key`` and whether it is shared."""
        alias = self._aliases.get(key)
        if alias is not None:
            return alias.tenant, alias.shared
        info = self._adapters.get(key)
        return None if info is None else (info.tenant, info.shared)

    def _shared_names(self) -> dict[str, str]:
        """Shared adapters and aliases by short name (the id without the owner) and full id."""
        if self._shared is None:
            index: dict[str, str] = {}
            owners = [(k, i.tenant, i.shared) for k, i in self._adapters.items()]
            owners += [(k, a.tenant, a.shared) for k, a in self._aliases.items()]
            for key, owner, shared in owners:
                if shared:
                    index[key] = key
                    index.setdefault(key.removeprefix(f"{owner}/"), key)
            self._shared = index
        return self._shared

    def _key(self, name: str, tenant: str | None) -> str | None:
        """The id ``tenant`` means by ``name``, or ``None`` when it may not see one.

        In order: the tenant's own ``tenant/name``; its own adapter registered
        under exactly ``name`` (ids recorded before names were scoped); a shared
        adapter by short name or full id.
        """
        if tenant is None:
            return name if self._owner(name) is not None else None
        for key in (qualify(name, tenant), name):
            owner = self._owner(key)
            if owner is not None and owner[0] == tenant:
                return key
        return self._shared_names().get(name)

    def locate(self, name: str, tenant: str | None) -> str:
        """The full id (an adapter's or an alias's) ``tenant`` means by ``name``.

        :class:`AdapterNotFound` when the tenant can see none: missing, or
        another tenant's private adapter, alike.
        """
        self._sync()
        key = self._key(name, tenant)
        if key is None:
            self._refresh()
            key = self._key(name, tenant)
        if key is None:
            raise AdapterNotFound(name)
        return key

    def _changed(self) -> None:
        self._shared = None

    def _record(self, audit: AuditEvent | None) -> None:
        """Write ``audit``'s entry (inside the change's transaction)."""
        if audit is not None:
            self.audit.write(audit)

    # -- versions and aliases ------------------------------------------------------------

    def _aliases_json(self, aliases: dict[str, Alias]) -> str:
        return json.dumps({n: asdict(a) for n, a in sorted(aliases.items())})

    def _save_aliases(self, audit: AuditEvent | None = None) -> None:
        with self.store.transaction():
            self.store.set_setting(_ALIASES, self._aliases_json(self._aliases))
            self._record(audit)

    def alias(self, name: str, tenant: str | None) -> Alias:
        """The alias ``tenant`` may use under ``name``."""
        key = self.locate(name, tenant)
        alias = self._aliases.get(key)
        if alias is None:
            raise AdapterNotFound(name)
        return alias

    def _owned_alias(self, name: str, tenant: str | None) -> Alias:
        alias = self.alias(name, tenant)
        if tenant is not None and alias.tenant != tenant:
            raise AccessDenied(name, tenant)
        return alias

    def add_version(
        self,
        info: AdapterInfo,
        name: str,
        version: str,
        *,
        activate: bool,
        audit: AuditEvent | None = None,
    ) -> list[str]:
        """Record ``info`` (id ``name@version``) as a new version of the alias ``name``.

        ``name`` is the alias's full id (``tenant/name``). ``activate`` sends all
        traffic to it (the previous split can be rolled back). The record and the
        alias are written in one transaction: a failure leaves neither. Returns the
        ids of old versions beyond ``keep_versions`` that carry no traffic: the
        caller removes them. ``audit``: the entry written in the same transaction.
        """
        self._sync()
        info = _checked(info)
        if not version or "@" in version or "/" in version:
            raise InvalidRequest(f"version {version!r} must be a non-empty name without '@' or '/'")
        if name in self._adapters:
            raise AdapterExists(name)
        current = self._aliases.get(name)
        if current is not None and current.tenant != info.tenant:
            raise AdapterExists(name)  # not reachable through qualify(): ids carry the owner
        if current is not None and version in current.versions:
            raise AdapterExists(f"{name}@{version}")
        if info.adapter_id in self._adapters:
            raise AdapterExists(info.adapter_id)
        if current is None:
            self._check_shared_name(name, info)
        self._check_shared_name(info.adapter_id, info)
        alias = (
            Alias(name, info.tenant, info.shared)
            if current is None
            else Alias(**json.loads(json.dumps(asdict(current))))
        )
        alias.versions.append(version)
        if activate or not alias.traffic:
            if alias.traffic:
                alias.history.append(dict(alias.traffic))
            alias.traffic = {version: 100.0}
        aliases = {**self._aliases, name: alias}
        with self.store.transaction():
            self.store.insert(info)
            self.store.set_setting(_ALIASES, self._aliases_json(aliases))
            self._record(audit)
        self._adapters[info.adapter_id] = info
        self._aliases = aliases
        self._changed()
        idle = [v for v in alias.versions if v not in alias.traffic]
        excess = len(alias.versions) - self.keep_versions
        return [alias.version_id(v) for v in idle[: max(0, excess)]]

    def set_traffic(
        self,
        name: str,
        split: dict[str, float],
        tenant: str | None,
        *,
        audit: AuditEvent | None = None,
    ) -> None:
        """Split the alias's traffic over versions by weight (``{"v3": 90, "v4": 10}``).

        ``audit``: the entry written in the same transaction (its ``adapter``, when
        ``None``, is the alias's id; ``detail`` gets ``from`` and ``to``, the splits).
        """
        alias = self._owned_alias(name, tenant)
        unknown = sorted(set(split) - set(alias.versions))
        if unknown:
            raise InvalidRequest(f"{name} has no versions {unknown}; it has {alias.versions}")
        if any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
            raise InvalidRequest("traffic weights must be >= 0 and add up to more than 0")
        before = (list(alias.history), dict(alias.traffic))
        alias.history.append(dict(alias.traffic))
        alias.traffic = {v: float(w) for v, w in split.items() if w > 0}
        self._save_or_restore(alias, before, _about(audit, alias, before[1]))

    def _save_or_restore(
        self,
        alias: Alias,
        before: tuple[list[dict[str, float]], dict[str, float]],
        audit: AuditEvent | None = None,
    ) -> None:
        try:
            self._save_aliases(audit)
        except BaseException:
            alias.history, alias.traffic = before
            raise

    def rollback(
        self, name: str, tenant: str | None, *, audit: AuditEvent | None = None
    ) -> dict[str, float]:
        """Restore the alias's previous traffic split; returns it.

        ``audit``: the entry written in the same transaction (its ``tenant`` and
        ``adapter``, when ``None``, are the alias's owner and id; ``detail`` gets ``from``
        and ``to``, the splits).
        """
        alias = self._owned_alias(name, tenant)
        before = (list(alias.history), dict(alias.traffic))
        while alias.history:
            previous = alias.history.pop()
            if all(v in alias.versions for v in previous):
                alias.traffic = previous
                self._save_or_restore(alias, before, _about(audit, alias, before[1]))
                return dict(previous)
        alias.history, alias.traffic = before
        raise InvalidRequest(f"{name} has no earlier traffic split to roll back to")

    def _check_shared_name(self, key: str, info: AdapterInfo) -> None:
        """A shared adapter's short name must name one shared adapter only."""
        if not info.shared:
            return
        short = key.removeprefix(f"{info.tenant}/")
        taken = self._shared_names().get(short)
        if taken is not None and taken != key:
            raise AdapterExists(short)

    def add(self, info: AdapterInfo, *, audit: AuditEvent | None = None) -> None:
        """Record a new adapter; :class:`AdapterExists` if the id is taken.

        ``audit``: the entry written in the same transaction."""
        self._sync()
        info = _checked(info)
        if info.adapter_id in self._adapters or info.adapter_id in self._aliases:
            raise AdapterExists(info.adapter_id)
        self._check_shared_name(info.adapter_id, info)
        with self.store.transaction():
            self.store.insert(info)
            self._record(audit)
        self._adapters[info.adapter_id] = info
        self._changed()

    def set_metadata(
        self, adapter_id: str, metadata: AdapterMetadata, *, audit: AuditEvent | None = None
    ) -> AdapterInfo:
        """Replace the metadata of the adapter or version ``adapter_id`` (its full id, e.g.
        ``acme/support@v3``) and return the updated record.

        The metadata is checked first (:func:`~lorapool.registry.metadata.check_metadata`,
        :class:`InvalidRequest` naming the field) and written in one store transaction:
        on any error the record is as it was. :class:`AdapterNotFound` for an unknown id;
        an alias is :class:`InvalidRequest` (its versions each have their own metadata).
        ``audit``: an entry written in the same transaction (a promotion's).
        """
        self._sync()
        checked = check_metadata(metadata)
        if adapter_id not in self._adapters:
            self._refresh()
        if adapter_id in self._aliases and adapter_id not in self._adapters:
            versions = ", ".join(self._aliases[adapter_id].versions)
            raise InvalidRequest(
                f"{adapter_id} is an alias; set the metadata of one of its versions "
                f"({adapter_id}@VERSION; it has {versions})"
            )
        info = self._adapters.get(adapter_id)
        if info is None:
            raise AdapterNotFound(adapter_id)
        updated = dataclasses.replace(info, metadata=checked)
        with self.store.transaction():
            replace = getattr(self.store, "replace", None)
            if callable(replace):
                replace(updated)
            else:  # a store without replace(): the same change as two writes in one transaction
                self.store.delete(adapter_id)
                self.store.insert(updated)
            self._record(audit)
        self._adapters[adapter_id] = updated
        return updated

    def remove(self, adapter_id: str, *, audit: AuditEvent | None = None) -> None:
        """Forget an adapter by its full id (no-op if unknown).

        A version that carries traffic is refused with :class:`AdapterInUse`;
        move the traffic first (``set_traffic``/``rollback``). ``audit``: the entry
        written in the same transaction (none when nothing is removed).
        """
        self._sync()
        if adapter_id not in self._adapters:
            return
        name, _, version = adapter_id.rpartition("@")
        alias = self._aliases.get(name) if name else None
        if alias is None or version not in alias.versions:
            with self.store.transaction():
                self.store.delete(adapter_id)
                self._record(audit)
            del self._adapters[adapter_id]
            self._changed()
            return
        if alias.traffic.get(version, 0) > 0 and len(alias.versions) > 1:
            raise AdapterInUse(
                f"{adapter_id} carries {alias.traffic[version]:g} of {name}'s traffic; "
                "move it with set_traffic or rollback before removing the version"
            )
        kept = Alias(**json.loads(json.dumps(asdict(alias))))
        kept.versions.remove(version)
        kept.traffic.pop(version, None)
        kept.history = [h for h in kept.history if version not in h]
        aliases = dict(self._aliases)
        if kept.versions:
            aliases[name] = kept
        else:
            del aliases[name]
        with self.store.transaction():
            self.store.delete(adapter_id)
            self.store.set_setting(_ALIASES, self._aliases_json(aliases))
            self._record(audit)
        del self._adapters[adapter_id]
        self._aliases = aliases
        self._changed()

    def remove_alias(self, name: str, *, audit: AuditEvent | None = None) -> None:
        """Forget the alias ``name`` (its full id) and every version of it.

        ``audit``: the entry written in the same transaction (none when nothing is removed).
        """
        self._sync()
        alias = self._aliases.get(name)
        if alias is None:
            return
        aliases = {n: a for n, a in self._aliases.items() if n != name}
        ids = [alias.version_id(v) for v in alias.versions]
        with self.store.transaction():
            for vid in ids:
                self.store.delete(vid)
            self.store.set_setting(_ALIASES, self._aliases_json(aliases))
            self._record(audit)
        for vid in ids:
            self._adapters.pop(vid, None)
        self._aliases = aliases
        self._changed()

    def version_ids(self, name: str) -> list[str]:
        """Ids of every version of the alias with full id ``name`` (empty if not an alias)."""
        self._sync()
        alias = self._aliases.get(name)
        return [] if alias is None else [alias.version_id(v) for v in alias.versions]

    def resolve(self, adapter_id: str, tenant: str | None, *, request_id: str = "") -> AdapterInfo:
        """The adapter ``tenant`` means by ``adapter_id`` (``tenant=None``: the platform).

        An alias resolves to one of its versions, chosen from ``request_id``
        by the alias's traffic split. :class:`AdapterNotFound` for a name the
        tenant cannot see, whether it is missing or another tenant's.
        """
        key = self.locate(adapter_id, tenant)
        alias = self._aliases.get(key)
        if alias is not None:
            key = alias.version_id(alias.pick(request_id))
        info = self._adapters.get(key)
        if info is None:
            raise AdapterNotFound(adapter_id)
        return info

    def owned_id(self, adapter_id: str, tenant: str | None) -> str:
        """The full id of the adapter or alias ``tenant`` owns under ``adapter_id``.

        Changes (unregister, traffic) need ownership: a shared adapter the tenant
        may use but does not own is :class:`AccessDenied`; another tenant's private
        one is :class:`AdapterNotFound`.
        """
        key = self.locate(adapter_id, tenant)
        owner = self._owner(key)
        if tenant is not None and owner is not None and owner[0] != tenant:
            raise AccessDenied(adapter_id, tenant)
        return key

    def owned(self, adapter_id: str, tenant: str | None) -> AdapterInfo:
        """The adapter if ``tenant`` owns it (an alias: its current version)."""
        key = self.owned_id(adapter_id, tenant)
        alias = self._aliases.get(key)
        if alias is not None:
            key = alias.version_id(alias.pick(""))
        info = self._adapters.get(key)
        if info is None:
            raise AdapterNotFound(adapter_id)
        return info

    def visible(self, tenant: str | None) -> list[AdapterInfo]:
        """Adapters ``tenant`` may use: its own and the shared ones, sorted by id."""
        self._sync()
        return sorted(
            (
                i
                for i in self._adapters.values()
                if tenant is None or i.shared or i.tenant == tenant
            ),
            key=lambda i: i.adapter_id,
        )
