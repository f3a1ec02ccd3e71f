"""Which adapters exist, who owns them, and who may use them.

The registry keeps the tenancy rules; its records live in a
:class:`~lorapool.registry_store.RegistryStore`: in memory by default, or in
a SQLite file (``Registry.open("registry.sqlite")``) that survives restarts.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import AccessDenied, AdapterExists, AdapterNotFound, InvalidRequest
from .registry_store import MemoryRegistryStore, RegistryStore, SqliteRegistryStore
from .types import AdapterInfo

__all__ = ["Registry", "check_adapter_id"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


def check_adapter_id(adapter_id: str) -> None:
    """Refuse ids that are empty, too long, or not ``name`` / ``tenant/name`` shaped."""
    if not isinstance(adapter_id, str) or not _ID.match(adapter_id) or len(adapter_id) > 200:
        raise InvalidRequest(
            f"adapter id {adapter_id!r} is not valid: use letters, digits, '.', '_', '-' in "
            "'/'-separated parts, at most 200 characters (e.g. 'acme/support')"
        )


class Registry:
    """Adapter metadata with tenancy: private adapters are visible to their owner only.

    Reads come from memory; every change is written through to ``store``
    first, so a failed write changes nothing.
    """

    def __init__(self, store: RegistryStore | None = None) -> None:
        self.store: RegistryStore = store if store is not None else MemoryRegistryStore()
        self._adapters: dict[str, AdapterInfo] = {i.adapter_id: i for i in self.store.records()}

    @classmethod
    def open(cls, path: str | Path) -> Registry:
        """A registry kept in the SQLite file at ``path`` (created if missing)."""
        return cls(SqliteRegistryStore(path))

    def close(self) -> None:
        """Close the store. Idempotent."""
        self.store.close()

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._adapters

    def add(self, info: AdapterInfo) -> None:
        """Record a new adapter; :class:`AdapterExists` if the id is taken."""
        if info.adapter_id in self._adapters:
            raise AdapterExists(info.adapter_id)
        self.store.insert(info)
        self._adapters[info.adapter_id] = info

    def remove(self, adapter_id: str) -> None:
        """Forget an adapter (no-op if unknown)."""
        if adapter_id in self._adapters:
            self.store.delete(adapter_id)
            del self._adapters[adapter_id]

    def resolve(self, adapter_id: str, tenant: str | None) -> AdapterInfo:
        """The adapter ``tenant`` may use under this id (``tenant=None``: platform access)."""
        info = self._adapters.get(adapter_id)
        if info is None:
            raise AdapterNotFound(adapter_id)
        if tenant is not None and not info.shared and info.tenant != tenant:
            raise AccessDenied(adapter_id, tenant)
        return info

    def owned(self, adapter_id: str, tenant: str | None) -> AdapterInfo:
        """The adapter if ``tenant`` owns it (changes such as unregister need ownership)."""
        info = self._adapters.get(adapter_id)
        if info is None:
            raise AdapterNotFound(adapter_id)
        if tenant is not None and info.tenant != tenant:
            raise AccessDenied(adapter_id, tenant)
        return info

    def visible(self, tenant: str | None) -> list[AdapterInfo]:
        """Adapters ``tenant`` may use: its own and the shared ones, sorted by id."""
        return sorted(
            (
                i
                for i in self._adapters.values()
                if tenant is None or i.shared or i.tenant == tenant
            ),
            key=lambda i: i.adapter_id,
        )
