"""The RegistryStore seam: where adapter metadata lives.

:class:`MemoryRegistryStore` keeps it in a dict (tests, throwaway pools);
:class:`SqliteRegistryStore` keeps it in one SQLite file: embedded, durable and
transactional, so a restarted process finds every registration again. Stores
are synchronous and small; the :class:`~lorapool.registry.Registry` on top
holds the tenancy rules.

Both also keep the registry's audit log (:class:`AuditRows`): an append-only list of
rows, written inside the same transaction as the change each one records. In the
SQLite file it is the ``audit`` table, whose triggers refuse ``UPDATE`` and
``DELETE``; the hash chain (:mod:`lorapool.registry.audit`) shows an edit made past them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lorapool.abc import RegistryStore
from lorapool.errors import AdapterExists, AdapterNotFound, RegistryUnavailable
from lorapool.registry.metadata import metadata_from_json, metadata_json
from lorapool.types import AdapterInfo, LoraConfig

__all__ = [
    "AUDIT_COLUMNS",
    "AuditConflict",
    "AuditRows",
    "MemoryRegistryStore",
    "RegistryStore",
    "SqliteRegistryStore",
]

AUDIT_COLUMNS = ("seq", "at", "action", "tenant", "adapter", "actor", "detail", "prev", "hash")
"""An audit row's fields, in order; ``detail`` is JSON text."""


class AuditConflict(Exception):
    """:meth:`AuditRows.audit_insert` found the tail moved since it was read: another
    writer appended first (a store without transactions across processes, such as Ray
    Serve's registry actor). The log reads the tail again and retries."""


@runtime_checkable
class AuditRows(Protocol):
    """A store that keeps the audit log's rows (both lorapool stores do).

    Rows are mappings with the keys :data:`AUDIT_COLUMNS`. The log appends inside
    :meth:`transaction` (reading the tail and inserting after it), so two writers never
    fork the chain and an entry lands with the registry change it records.
    """

    def audit_tail(self) -> tuple[int, str] | None:
        """The last row's ``seq`` and ``hash`` (``None``: no rows yet)."""
        ...

    def audit_insert(self, row: Mapping[str, Any]) -> None:
        """Append a row (its ``seq`` one past the tail); :class:`AuditConflict` when a
        store that cannot hold the tail in a transaction finds it moved."""
        ...

    def audit_rows(
        self,
        *,
        tenant: str | None = None,
        adapter: str | None = None,
        action: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows in ``seq`` order matching every filter given (``after``: larger ``seq``)."""
        ...

    def transaction(self) -> AbstractContextManager[None]:
        """All or nothing (see :meth:`lorapool.abc.RegistryStore.transaction`)."""
        ...


class MemoryRegistryStore(RegistryStore):
    """Records in a dict; gone with the process."""

    def __init__(self) -> None:
        self._records: dict[str, AdapterInfo] = {}
        self._settings: dict[str, str] = {}
        self._audit: list[dict[str, Any]] = []
        self._lock = threading.RLock()

    def insert(self, info: AdapterInfo) -> None:
        """Add a record."""
        if info.adapter_id in self._records:
            raise AdapterExists(info.adapter_id)
        self._records[info.adapter_id] = info

    def replace(self, info: AdapterInfo) -> None:
        """Put ``info`` in place of the record with its id (its place in the order kept);
        :class:`AdapterNotFound` if there is none."""
        if info.adapter_id not in self._records:
            raise AdapterNotFound(info.adapter_id)
        self._records[info.adapter_id] = info

    def delete(self, adapter_id: str) -> None:
        """Remove a record."""
        self._records.pop(adapter_id, None)

    def records(self) -> Iterator[AdapterInfo]:
        """Every record."""
        return iter(list(self._records.values()))

    def get_setting(self, key: str) -> str | None:
        """A named value."""
        return self._settings.get(key)

    def set_setting(self, key: str, value: str | None) -> None:
        """Set or delete a named value."""
        if value is None:
            self._settings.pop(key, None)
        else:
            self._settings[key] = value

    def version(self) -> int:
        """Constant: nobody else writes this dict."""
        return 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: on an exception the records, settings and audit rows are put
        back. One thread at a time; nested calls join the outer one."""
        with self._lock:
            records, settings, rows = dict(self._records), dict(self._settings), len(self._audit)
            try:
                yield
            except BaseException:
                self._records, self._settings = records, settings
                del self._audit[rows:]
                raise

    def audit_tail(self) -> tuple[int, str] | None:
        """The last audit row's ``seq`` and ``hash``."""
        if not self._audit:
            return None
        last = self._audit[-1]
        return int(last["seq"]), str(last["hash"])

    def audit_insert(self, row: Mapping[str, Any]) -> None:
        """Append an audit row."""
        self._audit.append({k: row[k] for k in AUDIT_COLUMNS})

    def audit_rows(
        self,
        *,
        tenant: str | None = None,
        adapter: str | None = None,
        action: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Audit rows in order, filtered."""
        with self._lock:
            rows = list(self._audit)
        out = [
            dict(r)
            for r in rows
            if r["seq"] > after
            and (tenant is None or r["tenant"] == tenant)
            and (adapter is None or r["adapter"] == adapter)
            and (action is None or r["action"] == action)
        ]
        return out if limit is None else out[:limit]

    def close(self) -> None:
        """Nothing to release."""


BUSY_TIMEOUT = 0.5
"""Seconds a change waits for another connection's write lock before it is
:class:`RegistryUnavailable`. Registry writes take milliseconds and run on the event
loop's thread, so a long wait (SQLite's default is 5 s) would stall every request."""


@contextmanager
def _typed(operation: str) -> Iterator[None]:
    """SQLite's operational failures (full disk, locked or damaged file) as a typed error.

    An ``IntegrityError`` (a duplicate id) passes through for the caller to name.
    """
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.Error as exc:
        raise RegistryUnavailable(operation, f"{type(exc).__name__}: {exc}") from exc


_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    shared     INTEGER NOT NULL,
    source     TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    config     TEXT NOT NULL,
    created_at REAL NOT NULL,
    norm       REAL,
    metadata   TEXT,
    signature  TEXT
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq     INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    action  TEXT NOT NULL,
    tenant  TEXT,
    adapter TEXT,
    actor   TEXT,
    detail  TEXT NOT NULL,
    prev    TEXT NOT NULL,
    hash    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit (tenant, seq);
CREATE INDEX IF NOT EXISTS audit_by_adapter ON audit (adapter, seq);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class SqliteRegistryStore(RegistryStore):
    """Records in a SQLite file (created if missing), one transaction per change.

    Writes are short and happen on the calling thread; SQLite's WAL journal
    lets readers in other processes (a CLI, a dashboard) look at the file while
    the pool runs.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._depth = 0
        self._lock = threading.RLock()
        with _typed(f"open {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._migrate(self._db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Add the columns a file written by an older lorapool lacks (``NULL`` in old rows:
        no norm, empty metadata, unsigned)."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(adapters)")}
        for name, kind in (("norm", "REAL"), ("metadata", "TEXT"), ("signature", "TEXT")):
            if name not in columns:
                db.execute(f"ALTER TABLE adapters ADD COLUMN {name} {kind}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"the registry store {self.path} is closed")
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction (``BEGIN IMMEDIATE``): committed whole or rolled back.

        Nested calls join the outer transaction; one thread at a time uses the connection
        for a change.
        """
        with self._lock:
            yield from self._transaction()

    def _transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        db = self._conn()
        with _typed("begin a change"):
            db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        else:
            try:
                with _typed("record the change"):
                    db.execute("COMMIT")
            except RegistryUnavailable:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        finally:
            self._depth = 0

    def insert(self, info: AdapterInfo) -> None:
        """Add a record; the primary key makes a duplicate id fail atomically."""
        try:
            with _typed(f"record adapter {info.adapter_id!r}"):
                self._conn().execute(
                    "INSERT INTO adapters (adapter_id, tenant, shared, source, sha256, size_bytes, "
                    "config, created_at, norm, metadata, signature) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        info.adapter_id,
                        info.tenant,
                        int(info.shared),
                        info.source,
                        info.sha256,
                        info.size_bytes,
                        info.config.model_dump_json(),
                        time.time(),
                        info.norm,
                        metadata_json(info.metadata),
                        info.signature,
                    ),
                )
        except sqlite3.IntegrityError:
            raise AdapterExists(info.adapter_id) from None

    def replace(self, info: AdapterInfo) -> None:
        """Write ``info`` over the record with its id (its registration time kept);
        :class:`AdapterNotFound` if there is none."""
        with _typed(f"update adapter {info.adapter_id!r}"):
            cursor = self._conn().execute(
                "UPDATE adapters SET tenant = ?, shared = ?, source = ?, sha256 = ?, "
                "size_bytes = ?, config = ?, norm = ?, metadata = ?, signature = ? "
                "WHERE adapter_id = ?",
                (
                    info.tenant,
                    int(info.shared),
                    info.source,
                    info.sha256,
                    info.size_bytes,
                    info.config.model_dump_json(),
                    info.norm,
                    metadata_json(info.metadata),
                    info.signature,
                    info.adapter_id,
                ),
            )
        if cursor.rowcount != 1:
            raise AdapterNotFound(info.adapter_id)

    def delete(self, adapter_id: str) -> None:
        """Remove a record."""
        with _typed(f"remove adapter {adapter_id!r}"):
            self._conn().execute("DELETE FROM adapters WHERE adapter_id = ?", (adapter_id,))

    def records(self) -> Iterator[AdapterInfo]:
        """Every record, oldest first."""
        with _typed("read the adapters"):
            rows = (
                self._conn()
                .execute(
                    "SELECT adapter_id, tenant, shared, source, sha256, size_bytes, config, norm, "
                    "metadata, signature FROM adapters ORDER BY created_at, rowid"
                )
                .fetchall()
            )
        for row in rows:
            adapter_id, tenant, shared, source, sha256, size_bytes, config, norm = row[:8]
            metadata, signature = row[8:]
            yield AdapterInfo(
                adapter_id=adapter_id,
                tenant=tenant,
                shared=bool(shared),
                source=source,
                sha256=sha256,
                size_bytes=size_bytes,
                config=LoraConfig.model_validate(json.loads(config)),
                norm=norm,
                metadata=metadata_from_json(metadata),
                signature=signature,
            )

    def audit_tail(self) -> tuple[int, str] | None:
        """The last audit row's ``seq`` and ``hash``."""
        with _typed("read the audit log"):
            query = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
            row = self._conn().execute(query).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def audit_insert(self, row: Mapping[str, Any]) -> None:
        """Append an audit row (call inside :meth:`transaction`)."""
        with _typed("write the audit log"):
            self._conn().execute(
                f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) VALUES "
                f"({', '.join('?' for _ in AUDIT_COLUMNS)})",
                tuple(row[k] for k in AUDIT_COLUMNS),
            )

    def audit_rows(
        self,
        *,
        tenant: str | None = None,
        adapter: str | None = None,
        action: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Audit rows in ``seq`` order, filtered in SQL."""
        where: list[str] = ["seq > ?"]
        args: list[object] = [after]
        for column, value in (("tenant", tenant), ("adapter", adapter), ("action", action)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        query = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit WHERE {' AND '.join(where)}"
        query += " ORDER BY seq"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with _typed("read the audit log"):
            rows = self._conn().execute(query, args).fetchall()
        return [dict(zip(AUDIT_COLUMNS, r, strict=True)) for r in rows]

    def get_setting(self, key: str) -> str | None:
        """A named value."""
        with _typed(f"read the setting {key!r}"):
            query = "SELECT value FROM settings WHERE key = ?"
            row = self._conn().execute(query, (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str | None) -> None:
        """Set or delete a named value."""
        with _typed(f"write the setting {key!r}"):
            if value is None:
                self._conn().execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                self._conn().execute(
                    "INSERT INTO settings VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    def version(self) -> int:
        """SQLite's ``data_version``: it moves when another connection commits.

        One cheap pragma (no table read), so every lookup can afford it.
        """
        with _typed("read its version"):
            row = self._conn().execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the connection."""
        if self._db is not None:
            self._db.close()
            self._db = None
