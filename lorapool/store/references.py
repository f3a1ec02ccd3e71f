"""References and pins: what no tier may evict.

A request holds a reference on its adapter from dispatch to its last token;
an adapter with references, or pinned, stays in every tier it is in. An
unload waits for the references to drain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from lorapool.types import AdapterInfo

__all__ = ["References"]


class References:
    """Reference counts and pins, per adapter id.

    ``infos`` maps adapter ids to their registrations; the disk tier, keyed
    by content, asks :meth:`protected_sha` through it.
    """

    def __init__(self, infos: Mapping[str, AdapterInfo]) -> None:
        self.pins: set[str] = set()
        """Pinned adapter ids."""
        self._infos = infos
        self._refs: dict[str, int] = {}
        self._drained: dict[str, asyncio.Event] = {}

    def __len__(self) -> int:
        """Distinct adapters with references."""
        return len(self._refs)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._refs

    def count(self, adapter_id: str) -> int:
        """References on an adapter."""
        return self._refs.get(adapter_id, 0)

    def take(self, adapter_id: str) -> None:
        """Add one reference."""
        self._refs[adapter_id] = self._refs.get(adapter_id, 0) + 1

    def release(self, adapter_id: str) -> None:
        """Drop one reference; wakes an unload waiting for the adapter to drain."""
        n = self._refs.get(adapter_id, 0) - 1
        if n > 0:
            self._refs[adapter_id] = n
        else:
            self._refs.pop(adapter_id, None)
            event = self._drained.get(adapter_id)
            if event is not None:
                event.set()

    async def drained(self, adapter_id: str) -> None:
        """Wait for the next time the adapter's references drop to zero."""
        event = self._drained.setdefault(adapter_id, asyncio.Event())
        event.clear()
        await event.wait()

    def forget_waiters(self, adapter_id: str) -> None:
        """The unload is done waiting for the adapter."""
        self._drained.pop(adapter_id, None)

    def protected(self, adapter_id: str) -> bool:
        """True if the adapter has references or is pinned (no tier may evict it)."""
        return self._refs.get(adapter_id, 0) > 0 or adapter_id in self.pins

    def protected_sha(self, sha: str) -> bool:
        """True if an adapter with references or pinned has content ``sha`` (a disk-tier key)."""
        infos = (self._infos.get(a) for a in (*self._refs, *self.pins))
        return any(i is not None and i.sha256 == sha for i in infos)
