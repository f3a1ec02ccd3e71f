"""The audit log: an append-only, tamper-evident record of what happened to adapters.

Each entry carries the sha256 of the entry before it (``prev``) and its own (``hash``,
over its fields and ``prev``), so editing, removing or inserting an entry breaks the
chain at that entry (:meth:`AuditLog.verify`). Entries live with the registry (its
:class:`~lorapool.registry.RegistryStore`; SQLite by default).

Actions recorded: ``register``, ``signature_refused``, ``promote``,
``promotion_refused``, ``rollback`` (``detail["automatic"]`` says whether the canary
watch did it), ``unregister``, ``forget``, ``access_denied``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorapool.errors import AuditChainBroken

__all__ = ["AuditEntry", "AuditLog"]

GENESIS = "0" * 64
"""The ``prev`` of the first entry."""


@dataclass(frozen=True)
class AuditEntry:
    """One audit record. ``detail`` holds the action's facts (JSON values only)."""

    seq: int
    at: float
    action: str
    tenant: str | None
    adapter: str | None
    actor: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)
    prev: str = GENESIS
    hash: str = ""

    def digest(self) -> str:
        """The sha256 this entry must carry: its fields and ``prev``, canonical JSON."""
        body = {
            "seq": self.seq,
            "at": self.at,
            "action": self.action,
            "tenant": self.tenant,
            "adapter": self.adapter,
            "actor": self.actor,
            "detail": self.detail,
            "prev": self.prev,
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


class AuditLog:
    """Append entries, read them back, verify the chain.

    SCAFFOLDING (issue 29): entries are kept in memory here; persistence in the
    registry's store comes with the audit log's own work.
    """

    def __init__(self) -> None:
        self._entries: list[AuditEntry] = []
        self._lock = threading.Lock()

    def record(
        self,
        action: str,
        *,
        tenant: str | None,
        adapter: str | None = None,
        actor: str | None = None,
        **detail: Any,
    ) -> AuditEntry:
        """Append one entry and return it."""
        with self._lock:
            prev = self._entries[-1].hash if self._entries else GENESIS
            entry = AuditEntry(
                len(self._entries) + 1, time.time(), action, tenant, adapter, actor, detail, prev
            )
            entry = AuditEntry(**{**entry.__dict__, "hash": entry.digest()})
            self._entries.append(entry)
            return entry

    def entries(
        self,
        *,
        tenant: str | None = None,
        adapter: str | None = None,
        action: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Entries in order, filtered (``after``: only those with a larger ``seq``)."""
        out = [
            e
            for e in self._entries
            if e.seq > after
            and (tenant is None or e.tenant == tenant)
            and (adapter is None or e.adapter == adapter)
            and (action is None or e.action == action)
        ]
        return out if limit is None else out[:limit]

    def verify(self) -> int:
        """Check the whole chain; returns the number of entries, or raises
        :class:`~lorapool.errors.AuditChainBroken` naming the first entry that fails."""
        prev = GENESIS
        for n, entry in enumerate(self._entries, 1):
            if entry.seq != n:
                raise AuditChainBroken(entry.seq, f"expected entry {n} here")
            if entry.prev != prev:
                raise AuditChainBroken(entry.seq, "its prev is not the hash of the entry before")
            if entry.digest() != entry.hash:
                raise AuditChainBroken(entry.seq, "its content does not match its hash")
            prev = entry.hash
        return len(self._entries)
