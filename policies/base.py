"""The EvictionPolicy seam."""

from __future__ import annotations

from collections.abc import Collection, Hashable
from typing import Protocol, runtime_checkable

__all__ = ["EvictionPolicy"]


@runtime_checkable
class EvictionPolicy(Protocol):
    """Chooses which entry a full tier gives up.

    ``victim`` receives only entries the tier may evict (not pinned, not in
    use) and must return one of them, or ``None`` when it is empty.
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
