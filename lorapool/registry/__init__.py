"""The registry wing: which adapters exist, whose they are, and which version answers.

* :mod:`~lorapool.registry.registry`: :class:`Registry` (tenancy, versions, aliases,
  canary splits, rollback), tenant-scoped names (:func:`qualify`) and the
  name checks.
* :mod:`~lorapool.registry.stores`: the :class:`RegistryStore` seam and its SQLite
  and in-memory implementations.
* :mod:`~lorapool.registry.postgres`: :class:`PostgresRegistryStore`, one registry in
  PostgreSQL shared by replicas on several hosts, changes pushed by ``LISTEN/NOTIFY``
  (the ``postgres`` extra).
"""

from lorapool.registry.postgres import PostgresRegistryStore
from lorapool.registry.registry import Alias, Registry, check_adapter_id, check_tenant, qualify
from lorapool.registry.stores import MemoryRegistryStore, RegistryStore, SqliteRegistryStore

__all__ = [
    "Alias",
    "MemoryRegistryStore",
    "PostgresRegistryStore",
    "Registry",
    "RegistryStore",
    "SqliteRegistryStore",
    "check_adapter_id",
    "check_tenant",
    "qualify",
]
