"""Which adapters exist, who owns them, and who may use them.

The registry keeps the tenancy rules; its records live in a
:class:`~lorapool.registry.RegistryStore`: in memory by default, or in
a SQLite file (``Registry.open("registry.sqlite")``) that survives restarts.
"""

from __future__ import annotations

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
from lorapool.registry.stores import MemoryRegistryStore, RegistryStore, SqliteRegistryStore
from lorapool.types import AdapterInfo

__all__ = ["Alias", "Registry", "check_adapter_id"]

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


def check_adapter_id(adapter_id: str) -> None:
    """Refuse ids that are empty, too long, or not ``name`` / ``tenant/name`` shaped."""
    if not isinstance(adapter_id, str) or not _ID.match(adapter_id) or len(adapter_id) > 200:
        raise InvalidRequest(
            f"adapter id {adapter_id!r} is not valid: use letters, digits, '.', '_', '-' in "
            "'/'-separated parts, at most 200 characters (e.g. 'acme/support')"
        )


def _check_use(adapter_id: str, owner: str, shared: bool, tenant: str | None) -> None:
    """``AccessDenied`` unless ``tenant`` may use it (its owner, a shared one, or the platform)."""
    if tenant is not None and not shared and owner != tenant:
        raise AccessDenied(adapter_id, tenant)


class Registry:
    """Adapter metadata with tenancy: private adapters are visible to their owner only.

    Reads come from memory; every change is written through to ``store``
    first, so a failed write changes nothing. Before each read the registry
    asks the store for its :meth:`~lorapool.registry.RegistryStore.version`
    and reloads when another process changed it: pools sharing one store see
    each other's registrations and removals.
    """

    def __init__(self, store: RegistryStore | None = None, *, keep_versions: int = 5) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.store: RegistryStore = (
            MemoryRegistryStore() if store is None else conform(store, RegistryStore)
        )
        self.keep_versions = keep_versions
        self._adapters: dict[str, AdapterInfo] = {}
        self._aliases: dict[str, Alias] = {}
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

    def _sync(self, lookup: str | None = None) -> None:
        """Reload if another process changed the store since we last looked.

        A store that caches its version (a remote one) is asked again, past
        its cache, when ``lookup`` is unknown here: an id registered through
        another replica a moment ago resolves at once.
        """
        if self._seen is not None and self._store_version() != self._seen:
            self._reload()
        if lookup is None or lookup in self._adapters or lookup in self._aliases:
            return
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
        self._sync()
        return adapter_id in self._adapters or adapter_id in self._aliases

    # -- versions and aliases ------------------------------------------------------------

    def _save_aliases(self) -> None:
        self.store.set_setting(
            _ALIASES, json.dumps({n: asdict(a) for n, a in sorted(self._aliases.items())})
        )

    def alias(self, name: str, tenant: str | None) -> Alias:
        """The alias ``tenant`` may use under ``name``."""
        self._sync(name)
        alias = self._aliases.get(name)
        if alias is None:
            raise AdapterNotFound(name)
        _check_use(name, alias.tenant, alias.shared, tenant)
        return alias

    def _owned_alias(self, name: str, tenant: str | None) -> Alias:
        alias = self.alias(name, tenant)
        if tenant is not None and alias.tenant != tenant:
            raise AccessDenied(name, tenant)
        return alias

    def add_version(
        self, info: AdapterInfo, name: str, version: str, *, activate: bool
    ) -> list[str]:
        """Record ``info`` (id ``name@version``) as a new version of the alias ``name``.

        ``activate`` sends all traffic to it (the previous split can be rolled
        back). Returns the ids of old versions beyond ``keep_versions`` that
        carry no traffic: the caller removes them.
        """
        self._sync()
        check_adapter_id(name)
        if not version or "@" in version or "/" in version:
            raise InvalidRequest(f"version {version!r} must be a non-empty name without '@' or '/'")
        if name in self._adapters:
            raise AdapterExists(name)
        alias = self._aliases.get(name)
        if alias is not None and alias.tenant != info.tenant:
            raise AccessDenied(name, info.tenant)
        if alias is not None and version in alias.versions:
            raise AdapterExists(f"{name}@{version}")
        self.add(info)
        if alias is None:
            alias = Alias(name, info.tenant, info.shared)
            self._aliases[name] = alias
        alias.versions.append(version)
        if activate or not alias.traffic:
            if alias.traffic:
                alias.history.append(dict(alias.traffic))
            alias.traffic = {version: 100.0}
        self._save_aliases()
        idle = [v for v in alias.versions if v not in alias.traffic]
        excess = len(alias.versions) - self.keep_versions
        return [alias.version_id(v) for v in idle[: max(0, excess)]]

    def set_traffic(self, name: str, split: dict[str, float], tenant: str | None) -> None:
        """Split the alias's traffic over versions by weight (``{"v3": 90, "v4": 10}``)."""
        self._sync()
        alias = self._owned_alias(name, tenant)
        unknown = sorted(set(split) - set(alias.versions))
        if unknown:
            raise InvalidRequest(f"{name} has no versions {unknown}; it has {alias.versions}")
        if any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
            raise InvalidRequest("traffic weights must be >= 0 and add up to more than 0")
        alias.history.append(dict(alias.traffic))
        alias.traffic = {v: float(w) for v, w in split.items() if w > 0}
        self._save_aliases()

    def rollback(self, name: str, tenant: str | None) -> dict[str, float]:
        """Restore the alias's previous traffic split; returns it."""
        self._sync()
        alias = self._owned_alias(name, tenant)
        while alias.history:
            previous = alias.history.pop()
            if all(v in alias.versions for v in previous):
                alias.traffic = previous
                self._save_aliases()
                return dict(previous)
        raise InvalidRequest(f"{name} has no earlier traffic split to roll back to")

    def add(self, info: AdapterInfo) -> None:
        """Record a new adapter; :class:`AdapterExists` if the id is taken."""
        self._sync()
        if info.adapter_id in self._adapters:
            raise AdapterExists(info.adapter_id)
        self.store.insert(info)
        self._adapters[info.adapter_id] = info

    def remove(self, adapter_id: str) -> None:
        """Forget an adapter (no-op if unknown).

        A version that carries traffic is refused with :class:`AdapterInUse`;
        move the traffic first (``set_traffic``/``rollback``).
        """
        self._sync()
        if adapter_id not in self._adapters:
            return
        name, _, version = adapter_id.rpartition("@")
        alias = self._aliases.get(name) if name else None
        if alias is not None and version in alias.versions:
            if alias.traffic.get(version, 0) > 0 and len(alias.versions) > 1:
                raise AdapterInUse(
                    f"{adapter_id} carries {alias.traffic[version]:g} of {name}'s traffic; "
                    "move it with set_traffic or rollback before removing the version"
                )
            self.store.delete(adapter_id)
            del self._adapters[adapter_id]
            alias.versions.remove(version)
            alias.traffic.pop(version, None)
            alias.history = [h for h in alias.history if version not in h]
            if not alias.versions:
                del self._aliases[name]
            self._save_aliases()
            return
        self.store.delete(adapter_id)
        del self._adapters[adapter_id]

    def remove_alias(self, name: str) -> None:
        """Forget the alias ``name`` and every version of it."""
        self._sync()
        alias = self._aliases.pop(name, None)
        if alias is None:
            return
        for version in alias.versions:
            vid = alias.version_id(version)
            if vid in self._adapters:
                self.store.delete(vid)
                del self._adapters[vid]
        self._save_aliases()

    def version_ids(self, name: str) -> list[str]:
        """Ids of every version of the alias ``name`` (empty if it is not an alias)."""
        self._sync()
        alias = self._aliases.get(name)
        return [] if alias is None else [alias.version_id(v) for v in alias.versions]

    def resolve(self, adapter_id: str, tenant: str | None, *, request_id: str = "") -> AdapterInfo:
        """The adapter ``tenant`` may use under this id (``tenant=None``: platform access).

        An alias resolves to one of its versions, chosen from ``request_id``
        by the alias's traffic split.
        """
        self._sync(adapter_id)
        alias = self._aliases.get(adapter_id)
        if alias is not None:
            self.alias(adapter_id, tenant)
            adapter_id = alias.version_id(alias.pick(request_id))
        info = self._adapters.get(adapter_id)
        if info is None:
            raise AdapterNotFound(adapter_id)
        _check_use(adapter_id, info.tenant, info.shared, tenant)
        return info

    def owned(self, adapter_id: str, tenant: str | None) -> AdapterInfo:
        """The adapter if ``tenant`` owns it (changes such as unregister need ownership)."""
        self._sync(adapter_id)
        alias = self._aliases.get(adapter_id)
        if alias is not None:
            self._owned_alias(adapter_id, tenant)
            adapter_id = alias.version_id(alias.pick(""))
        info = self._adapters.get(adapter_id)
        if info is None:
            raise AdapterNotFound(adapter_id)
        if tenant is not None and info.tenant != tenant:
            raise AccessDenied(adapter_id, tenant)
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
