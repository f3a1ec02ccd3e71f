"""The registry wing: which adapters exist, whose they are, and which version answers.

* :mod:`~lorapool.registry.registry`: :class:`Registry` (tenancy, versions, aliases,
  canary splits, rollback) and :func:`check_adapter_id`.
* :mod:`~lorapool.registry.stores`: the :class:`RegistryStore` seam and its SQLite
  and in-memory implementations.
"""

from lorapool.registry.registry import Alias, Registry, check_adapter_id
from lorapool.registry.stores import MemoryRegistryStore, RegistryStore, SqliteRegistryStore

__all__ = [
    "Alias",
    "MemoryRegistryStore",
    "Registry",
    "RegistryStore",
    "SqliteRegistryStore",
    "check_adapter_id",
]
