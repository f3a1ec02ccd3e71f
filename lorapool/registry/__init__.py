"""The registry wing: which adapters exist, whose they are, and which version answers.

* :mod:`~lorapool.registry.registry`: :class:`Registry` (tenancy, versions, aliases,
  canary splits, rollback), tenant-scoped names (:func:`qualify`) and the
  name checks.
* :mod:`~lorapool.registry.stores`: the :class:`RegistryStore` seam and its SQLite
  and in-memory implementations.
"""

from lorapool.registry.registry import Alias, Registry, check_adapter_id, check_tenant, qualify
from lorapool.registry.stores import MemoryRegistryStore, RegistryStore, SqliteRegistryStore

__all__ = [
    "Alias",
    "MemoryRegistryStore",
    "Registry",
    "RegistryStore",
    "SqliteRegistryStore",
    "check_adapter_id",
    "check_tenant",
    "qualify",
]
