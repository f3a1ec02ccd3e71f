"""The audit log: an append-only, tamper-evident record of what happened to adapters.

Each entry carries the sha256 of the entry before it (``prev``) and its own (``hash``,
over its fields and ``prev``), so editing, removing or inserting an entry breaks the
chain at that entry (:meth:`AuditLog.verify`). Entries live with the registry, in its
:class:`~lorapool.registry.RegistryStore` (:class:`~lorapool.registry.stores.AuditRows`:
the ``audit`` table of the SQLite file, a list in memory): ``Registry.audit`` is the
log, and ``AdapterPool.audit`` is its registry's. A store that keeps no audit rows (a
third-party one) gets a log in memory.

A registry change and the entry recording it are written in one store transaction
(the registry's methods take ``audit=AuditEvent(...)``); :meth:`AuditLog.record`
writes an entry on its own (a refusal, which changes nothing).

Actions recorded: ``register``, ``signature_refused``, ``promote``,
``promotion_refused``, ``rollback`` (``detail["automatic"]`` says whether the canary
watch did it), ``unregister``, ``forget``, ``access_denied``. ``tenant`` is the tenant
the entry is about (for ``access_denied``: the tenant refused), ``actor`` who acted
(a tenant, ``platform`` for the platform's own calls, or a lorapool component).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lorapool.errors import AuditChainBroken, InvalidRequest, RegistryUnavailable
from lorapool.registry.stores import AuditConflict, AuditRows, MemoryRegistryStore

__all__ = ["GENESIS", "AuditEntry", "AuditEvent", "AuditLog", "redact_source"]

_APPEND_ATTEMPTS = 16
"""Tries to append while other writers keep taking the tail (stores without transactions)."""

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

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values (the CLI's ``--json``, the admin endpoint)."""
        out = asdict(self)
        out["detail"] = dict(self.detail)
        return out


@dataclass(frozen=True)
class AuditEvent:
    """An entry to write with a registry change, in the change's own transaction
    (``Registry.add(..., audit=AuditEvent("register", tenant="acme", ...))``): the
    change and its entry land together, or neither does."""

    action: str
    tenant: str | None
    adapter: str | None = None
    actor: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


_MAX_DETAIL = 64 * 1024
"""Bytes of JSON an entry's detail may hold: entries record facts, not payloads."""


def _canonical(detail: Mapping[str, Any]) -> str:
    """``detail`` as canonical JSON text; :class:`InvalidRequest` for values JSON cannot hold."""
    try:
        text = json.dumps(dict(detail), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"an audit entry's detail must be JSON values: {exc}") from None
    if len(text.encode()) > _MAX_DETAIL:
        raise InvalidRequest(f"an audit entry's detail is over {_MAX_DETAIL} bytes of JSON")
    return text


def _optional_text(name: str, value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > 500):
        raise InvalidRequest(f"an audit entry's {name} must be a string (<= 500 chars) or None")
    return value


def redact_source(source: str) -> str:
    """A source URI as the audit log keeps it: without user, password, query or fragment
    (a presigned URL's signature, a token in the address), so the log holds no secret."""
    parts = urlsplit(source)
    if not parts.scheme or parts.scheme == "file":
        return source[:500]
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))[:500]


class AuditLog:
    """Append entries, read them back, verify the chain.

    ``rows`` is where the entries live: the registry's store (both lorapool stores keep
    them; a SQLite registry's entries survive restarts and are shared by every process
    on the file), or, for ``None`` or a store that keeps no audit rows, a list in memory.
    Appends run inside the store's transaction, reading the tail there, so writers in
    several threads or processes extend one chain.
    """

    def __init__(self, rows: object | None = None) -> None:
        self.rows: AuditRows = rows if isinstance(rows, AuditRows) else MemoryRegistryStore()
        self.persistent = isinstance(rows, AuditRows)
        """Whether entries live in the given store (``False``: in this object's memory)."""

    def record(
        self,
        action: str,
        *,
        tenant: str | None,
        adapter: str | None = None,
        actor: str | None = None,
        **detail: Any,
    ) -> AuditEntry:
        """Append one entry (in a transaction of its own) and return it.

        ``detail`` holds JSON values (:class:`InvalidRequest` otherwise).
        """
        return self.write(AuditEvent(action, tenant, adapter, actor, detail))

    def write(self, event: AuditEvent) -> AuditEntry:
        """Append the entry ``event`` describes; inside an open store transaction it joins
        that transaction (the registry's changes call it so)."""
        if not isinstance(event.action, str) or not 0 < len(event.action) <= 64:
            raise InvalidRequest("an audit entry's action must be a name of 1 to 64 characters")
        tenant = _optional_text("tenant", event.tenant)
        adapter = _optional_text("adapter", event.adapter)
        actor = _optional_text("actor", event.actor)
        text = _canonical(event.detail)
        detail = json.loads(text)
        for attempt in range(_APPEND_ATTEMPTS):
            with self.rows.transaction():
                tail = self.rows.audit_tail()
                seq, prev = (1, GENESIS) if tail is None else (tail[0] + 1, tail[1])
                entry = AuditEntry(
                    seq, time.time(), event.action, tenant, adapter, actor, detail, prev
                )
                entry = AuditEntry(**{**entry.__dict__, "hash": entry.digest()})
                try:
                    self.rows.audit_insert({**entry.__dict__, "detail": text})
                except AuditConflict:
                    if attempt + 1 == _APPEND_ATTEMPTS:
                        raise RegistryUnavailable(
                            "append to the audit log", "other writers kept appending first"
                        ) from None
                    continue
            return entry
        raise AssertionError("unreachable")

    def entries(
        self,
        *,
        tenant: str | None = None,
        adapter: str | None = None,
        action: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Entries in order, filtered (``after``: only those with a larger ``seq``;
        ``limit``: at most that many)."""
        rows = self.rows.audit_rows(
            tenant=tenant, adapter=adapter, action=action, after=after, limit=limit
        )
        return [_entry(r) for r in rows]

    def head(self) -> tuple[int, str]:
        """The last entry's ``seq`` and ``hash`` (``(0, GENESIS)`` when empty).

        The chain shows edits, removals and insertions, but not the loss of its newest
        entries; keep the head somewhere else (a ticket, a log line, another system) to
        check that too.
        """
        tail = self.rows.audit_tail()
        return (0, GENESIS) if tail is None else tail

    def verify(self) -> int:
        """Check the whole chain; returns the number of entries, or raises
        :class:`~lorapool.errors.AuditChainBroken` naming the first entry that fails."""
        prev = GENESIS
        n = 0
        for row in self.rows.audit_rows():
            n += 1
            try:
                entry = _entry(row)
            except (TypeError, ValueError) as exc:
                raise AuditChainBroken(n, f"it cannot be read ({exc})") from None
            if entry.seq < n:
                raise AuditChainBroken(entry.seq, f"it is out of place (entry {n} belongs here)")
            if entry.seq > n:
                gone = f"entries {n} to {entry.seq - 1}" if entry.seq > n + 1 else f"entry {n}"
                raise AuditChainBroken(n, f"it is missing ({gone} gone; entry {entry.seq} follows)")
            if entry.prev != prev:
                raise AuditChainBroken(entry.seq, "its prev is not the hash of the entry before")
            if entry.digest() != entry.hash:
                raise AuditChainBroken(entry.seq, "its content does not match its hash")
            prev = entry.hash
        return n


def _entry(row: Mapping[str, Any]) -> AuditEntry:
    """An entry from a store's row (``detail`` as JSON text)."""
    return AuditEntry(
        seq=int(row["seq"]),
        at=float(row["at"]),
        action=str(row["action"]),
        tenant=row["tenant"],
        adapter=row["adapter"],
        actor=row["actor"],
        detail=json.loads(row["detail"]),
        prev=str(row["prev"]),
        hash=str(row["hash"]),
    )
