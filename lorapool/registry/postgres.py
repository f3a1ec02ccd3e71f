"""A registry shared by replicas on several hosts: :class:`PostgresRegistryStore`.

Every replica of a deployment (server processes behind a load balancer, on any host)
opens the same PostgreSQL database::

    registry = Registry(PostgresRegistryStore("postgresql://lorapool@db:5432/lorapool"))

Records, settings (aliases, traffic splits) and the audit log live in one PostgreSQL
schema (``lorapool`` by default) that the store creates and migrates itself
(:mod:`lorapool.registry.pg_migrations`). Each change is one transaction: it first
takes the row of the schema's ``state`` table (so changes from all replicas are
serialized, and the audit chain never forks), and sends ``NOTIFY`` on the schema's
channel before committing. PostgreSQL delivers a notification only when its
transaction commits, so a failed change is heard by nobody.

Propagation: a thread per store ``LISTEN``\\ s on the channel over a connection of its
own and moves :meth:`~PostgresRegistryStore.version` when another replica committed;
the :class:`~lorapool.registry.Registry` compares it (a number in memory, no query)
before each lookup and reloads. An unregister, rollback, alias move or forget on one
replica thus takes effect on the others at their next request after the
notification arrives (milliseconds on a LAN), without polling.

Connection loss: lookups keep being served from each replica's last view (it is in
memory); changes fail with :class:`~lorapool.errors.RegistryUnavailable`. The listener
reconnects with exponential backoff (up to :data:`MAX_BACKOFF` seconds apart) and,
once back, moves the version so the registry reloads everything it may have missed.
The main connection reconnects at its next use.

psycopg 3 (the ``postgres`` extra) is imported only when a store is opened.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from lorapool.abc import RegistryStore
from lorapool.errors import AdapterExists, AdapterNotFound, RegistryUnavailable
from lorapool.registry.metadata import metadata_from_json, metadata_json
from lorapool.registry.pg_migrations import LATEST, check_schema_name, migration_sql
from lorapool.registry.stores import AUDIT_COLUMNS
from lorapool.types import AdapterInfo, LoraConfig

if TYPE_CHECKING:
    import psycopg

__all__ = ["MAX_BACKOFF", "PostgresRegistryStore", "is_postgres_url"]

log = logging.getLogger("lorapool.registry.postgres")

MAX_BACKOFF = 5.0
"""Longest wait, in seconds, between two attempts of the listener to reconnect."""

LOCK_TIMEOUT_MS = 2000
"""How long a change waits for another replica's change to commit before it is
:class:`RegistryUnavailable` (registry changes take milliseconds; a replica killed
mid-change releases its lock when PostgreSQL sees its connection close)."""

_COLUMNS = (
    "adapter_id, tenant, shared, source, sha256, size_bytes, config, norm, metadata, signature"
)

RECONNECT_PAUSE = 1.0
"""Seconds after a failed connect before the main connection tries again (sooner when
the listener reconnects first)."""

T = TypeVar("T")


def is_postgres_url(value: str) -> bool:
    """Whether ``value`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return isinstance(value, str) and value.startswith(("postgresql://", "postgres://"))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "a PostgreSQL registry needs psycopg 3: pip install 'lorapool[postgres]'"
        ) from exc
    return psycopg


def _redact(dsn: str) -> str:
    """``dsn`` without its password (for messages and logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, ""))


class PostgresRegistryStore(RegistryStore):
    """Records, settings and the audit log in a PostgreSQL schema, shared by replicas.

    ``dsn``: a libpq connection string or ``postgresql://`` URL. ``schema``: the
    PostgreSQL schema holding lorapool's tables (several deployments may share one
    database under different schemas); created and migrated on open. ``listen``:
    start the ``LISTEN`` thread (``False``: a store that only writes, such as a CLI,
    and sees others' changes only through :meth:`invalidate`). ``connect_timeout``:
    seconds to wait for the server when connecting.

    Opening fails with :class:`~lorapool.errors.RegistryUnavailable` when the database
    cannot be reached or its schema is newer than this lorapool's.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "lorapool",
        listen: bool = True,
        connect_timeout: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.channel = f"lorapool_registry_{self.schema}"
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._depth = 0
        self._db: psycopg.Connection[Any] | None = None
        self._own_pid: int | None = None
        self._version = 0
        self._generation = 0  # the database's change counter as far as this store knows
        self._closed = False
        self._retry_at = 0.0  # monotonic time before which the main connection is not retried
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._listener: threading.Thread | None = None
        self.reconnects = 0
        """How many times the listener connected again after losing the database."""
        with self._lock:
            conn = self._conn()
            self._migrate(conn)
            self._generation = self._read_generation(conn)
        if listen:
            self._listener = threading.Thread(
                target=self._listen, name=f"lorapool-registry-listen-{self.schema}", daemon=True
            )
            self._listener.start()
            self._listening.wait(max(1.0, connect_timeout))

    def __repr__(self) -> str:
        return f"PostgresRegistryStore({_redact(self.dsn)!r}, schema={self.schema!r})"

    # -- connections -----------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        pg = _psycopg()
        try:
            conn: psycopg.Connection[Any] = pg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name="lorapool",
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                options=f"-c lock_timeout={LOCK_TIMEOUT_MS}",
            )
        except pg.Error as exc:
            raise RegistryUnavailable(
                f"connect to {_redact(self.dsn)}", f"{type(exc).__name__}: {exc}"
            ) from exc
        return conn

    def _conn(self) -> psycopg.Connection[Any]:
        """The main connection, opened again if it was lost (call holding ``_lock``).

        After a failed attempt the next waits :data:`RECONNECT_PAUSE` seconds (or until
        the listener is connected again): while the database is away, a lookup that
        misses fails at once instead of waiting for a connect timeout on the event loop.
        """
        if self._closed:
            raise RuntimeError(f"the registry store {self!r} is closed")
        if self._db is not None and (self._db.closed or self._db.broken):
            self._drop()
        if self._db is None:
            if time.monotonic() < self._retry_at:
                raise RegistryUnavailable(
                    f"connect to {_redact(self.dsn)}", "unreachable a moment ago; retrying soon"
                )
            try:
                self._db = self._connect()
            except RegistryUnavailable:
                self._retry_at = time.monotonic() + RECONNECT_PAUSE
                raise
            self._own_pid = self._db.info.backend_pid
        return self._db

    def _drop(self) -> None:
        if self._db is not None:
            with suppress(Exception):
                self._db.close()
            self._db = None

    @contextmanager
    def _typed(self, operation: str) -> Iterator[None]:
        """psycopg's errors as :class:`RegistryUnavailable` (a unique violation passes)."""
        pg = _psycopg()
        try:
            yield
        except pg.errors.UniqueViolation:
            raise
        except pg.Error as exc:
            if isinstance(exc, pg.OperationalError):
                self._drop()
            raise RegistryUnavailable(operation, f"{type(exc).__name__}: {exc}") from exc

    def _read(self, operation: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run a read; outside a transaction, once more on a fresh connection when the
        connection turns out to be lost (the server restarted since the last use)."""
        pg = _psycopg()
        with self._lock:
            for attempt in range(2):
                conn = self._conn()
                try:
                    with self._typed(operation):
                        return fn(conn)
                except RegistryUnavailable as exc:
                    lost = isinstance(exc.__cause__, pg.OperationalError)
                    if attempt or self._depth or not lost:
                        raise
            raise AssertionError("unreachable")

    def _write(self, operation: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run a write inside :meth:`transaction` (joining an open one)."""
        with self.transaction(), self._typed(operation):
            return fn(self._conn())

    # -- schema ----------------------------------------------------------------------

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        s = self.schema
        with self._typed(f"create or migrate the schema {s!r}"):
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"lorapool:{s}",))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.migrations ("
                    "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
                )
                row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {s}.migrations")
                current = int(row.fetchone()[0])  # type: ignore[index]
                if current > LATEST:
                    raise RegistryUnavailable(
                        f"open the registry schema {s!r}",
                        f"it is at version {current}, written by a newer lorapool "
                        f"(this one knows up to {LATEST}): upgrade lorapool",
                    )
                for version in range(current + 1, LATEST + 1):
                    conn.execute(migration_sql(version, s))
                    conn.execute(
                        f"INSERT INTO {s}.migrations (version, applied_at) VALUES (%s, %s)",
                        (version, time.time()),
                    )
                    log.info("registry schema %s migrated to version %d", s, version)
            except BaseException:
                with suppress(Exception):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        s = self.schema
        return self._read(
            "read the schema version",
            lambda c: int(c.execute(f"SELECT max(version) FROM {s}.migrations").fetchone()[0]),  # type: ignore[index]
        )

    def _read_generation(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(f"SELECT generation FROM {self.schema}.state WHERE id = 1").fetchone()
        return int(row[0]) if row is not None else 0

    # -- change propagation ----------------------------------------------------------

    def _moved(self) -> None:
        """Something this store did not write may have changed: the registry reloads."""
        self._version += 1

    def _listen(self) -> None:
        """The listener thread: ``LISTEN``, move the version on others' notifications,
        reconnect with backoff, and resync after a reconnect."""
        pg = _psycopg()
        delay = 0.05
        connected_before = False
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except RegistryUnavailable:
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            try:
                with conn:
                    conn.execute(f"LISTEN {self.channel}")
                    if connected_before:  # resync: changes while away sent no notification here
                        self.reconnects += 1
                        log.info("registry listener reconnected to %s", _redact(self.dsn))
                        self._generation = self._read_generation(conn)
                        self._retry_at = 0.0  # the database is back: connect at once
                        self._moved()
                    connected_before = True
                    delay = 0.05
                    self._listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._heard(note.pid, note.payload)
            except pg.Error as exc:
                if not self._stop.is_set():
                    log.warning("registry listener lost %s: %s", _redact(self.dsn), exc)
            finally:
                self._listening.clear()

    def _heard(self, pid: int, payload: str) -> None:
        with suppress(ValueError):
            self._generation = max(self._generation, int(payload))
        if pid != self._own_pid:
            self._moved()

    @property
    def listening(self) -> bool:
        """Whether the listener is connected (changes from other replicas arrive at once)."""
        return self._listening.is_set()

    def wait_listening(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the listener to be connected."""
        return self._listening.wait(timeout)

    # -- RegistryStore ---------------------------------------------------------------

    def version(self) -> int:
        """A number in memory that moves when another replica committed a change (heard
        through ``LISTEN``) or the listener reconnected: no query."""
        return self._version

    def invalidate(self) -> None:
        """Compare the database's change counter with this store's view (one query; the
        registry calls it when a lookup misses). Unreachable: nothing changes."""
        try:
            generation = self._read("read the change counter", self._read_generation)
        except (RegistryUnavailable, RuntimeError):
            return
        if generation != self._generation:
            self._generation = generation
            self._moved()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One PostgreSQL transaction: committed whole (with its ``NOTIFY``) or rolled back.

        It first takes the ``state`` row, so the changes of every replica are serialized
        (a change waits up to :data:`LOCK_TIMEOUT_MS` for another to commit). Nested
        calls join the outer transaction; one thread at a time uses the connection.
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
        pg = _psycopg()
        s = self.schema
        for attempt in range(2):  # a connection found lost at BEGIN is opened again once
            conn = self._conn()
            try:
                with self._typed("begin a change"):
                    conn.execute("BEGIN")
                    row = conn.execute(
                        f"UPDATE {s}.state SET generation = generation + 1 WHERE id = 1 "
                        "RETURNING generation"
                    ).fetchone()
                break
            except RegistryUnavailable as exc:
                with suppress(Exception):
                    conn.execute("ROLLBACK")
                if attempt or not isinstance(exc.__cause__, pg.OperationalError):
                    raise
        generation = int(row[0]) if row is not None else 0
        self._depth = 1
        try:
            yield
        except BaseException:
            with suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                with self._typed("record the change"):
                    conn.execute("SELECT pg_notify(%s, %s)", (self.channel, str(generation)))
                    conn.execute("COMMIT")
            except RegistryUnavailable:
                with suppress(Exception):
                    conn.execute("ROLLBACK")
                raise
            if generation == self._generation + 1:
                self._generation = generation
            # else another replica committed in between: its notification moves the version
        finally:
            self._depth = 0

    def insert(self, info: AdapterInfo) -> None:
        """Add a record; the primary key makes a duplicate id fail atomically."""
        pg = _psycopg()
        s = self.schema

        def run(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                f"INSERT INTO {s}.adapters (adapter_id, tenant, shared, source, sha256, "
                "size_bytes, config, created_at, norm, metadata, signature) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    info.adapter_id,
                    info.tenant,
                    info.shared,
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

        try:
            if self._depth:
                # Inside a change: a savepoint keeps the transaction usable after a duplicate.
                with self._typed(f"record adapter {info.adapter_id!r}"):
                    conn = self._conn()
                    conn.execute("SAVEPOINT lorapool_insert")
                    try:
                        run(conn)
                    except pg.errors.UniqueViolation:
                        conn.execute("ROLLBACK TO SAVEPOINT lorapool_insert")
                        raise
                    conn.execute("RELEASE SAVEPOINT lorapool_insert")
            else:
                self._write(f"record adapter {info.adapter_id!r}", run)
        except pg.errors.UniqueViolation:
            raise AdapterExists(info.adapter_id) from None

    def replace(self, info: AdapterInfo) -> None:
        """Write ``info`` over the record with its id (its place and registration time
        kept); :class:`AdapterNotFound` if there is none."""
        s = self.schema

        def run(conn: psycopg.Connection[Any]) -> int:
            cursor = conn.execute(
                f"UPDATE {s}.adapters SET tenant = %s, shared = %s, source = %s, sha256 = %s, "
                "size_bytes = %s, config = %s, norm = %s, metadata = %s, signature = %s "
                "WHERE adapter_id = %s",
                (
                    info.tenant,
                    info.shared,
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
            return cursor.rowcount

        with self.transaction():
            if self._write(f"update adapter {info.adapter_id!r}", run) != 1:
                raise AdapterNotFound(info.adapter_id)

    def delete(self, adapter_id: str) -> None:
        """Remove a record (no-op if absent)."""
        s = self.schema
        self._write(
            f"remove adapter {adapter_id!r}",
            lambda c: c.execute(f"DELETE FROM {s}.adapters WHERE adapter_id = %s", (adapter_id,)),
        )

    def records(self) -> Iterator[AdapterInfo]:
        """Every record, in insertion order."""
        s = self.schema
        rows = self._read(
            "read the adapters",
            lambda c: c.execute(f"SELECT {_COLUMNS} FROM {s}.adapters ORDER BY seq").fetchall(),
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
                size_bytes=int(size_bytes),
                config=LoraConfig.model_validate(json.loads(config)),
                norm=norm,
                metadata=metadata_from_json(metadata),
                signature=signature,
            )

    def get_setting(self, key: str) -> str | None:
        """A named value."""
        s = self.schema
        row = self._read(
            f"read the setting {key!r}",
            lambda c: c.execute(
                f"SELECT value FROM {s}.settings WHERE key = %s", (key,)
            ).fetchone(),
        )
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str | None) -> None:
        """Set (``None``: delete) a named value."""
        s = self.schema

        def run(conn: psycopg.Connection[Any]) -> None:
            if value is None:
                conn.execute(f"DELETE FROM {s}.settings WHERE key = %s", (key,))
            else:
                conn.execute(
                    f"INSERT INTO {s}.settings (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

        self._write(f"write the setting {key!r}", run)

    # -- the audit log's rows (lorapool.registry.stores.AuditRows) --------------------

    def audit_tail(self) -> tuple[int, str] | None:
        """The last audit row's ``seq`` and ``hash``."""
        s = self.schema
        row = self._read(
            "read the audit log",
            lambda c: c.execute(
                f"SELECT seq, hash FROM {s}.audit ORDER BY seq DESC LIMIT 1"
            ).fetchone(),
        )
        return None if row is None else (int(row[0]), str(row[1]))

    def audit_insert(self, row: Mapping[str, Any]) -> None:
        """Append an audit row (inside :meth:`transaction`, which serializes appends)."""
        s = self.schema
        self._write(
            "write the audit log",
            lambda c: c.execute(
                f"INSERT INTO {s}.audit ({', '.join(AUDIT_COLUMNS)}) VALUES "
                f"({', '.join('%s' for _ in AUDIT_COLUMNS)})",
                tuple(row[k] for k in AUDIT_COLUMNS),
            ),
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
        where = ["seq > %s"]
        args: list[object] = [after]
        for column, value in (("tenant", tenant), ("adapter", adapter), ("action", action)):
            if value is not None:
                where.append(f"{column} = %s")
                args.append(value)
        query = (
            f"SELECT {', '.join(AUDIT_COLUMNS)} FROM {self.schema}.audit "
            f"WHERE {' AND '.join(where)} ORDER BY seq"
        )
        if limit is not None:
            query += " LIMIT %s"
            args.append(limit)
        rows = self._read("read the audit log", lambda c: c.execute(query, args).fetchall())
        return [dict(zip(AUDIT_COLUMNS, r, strict=True)) for r in rows]

    def close(self) -> None:
        """Stop the listener and close the connections. Idempotent."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
            self._listener = None
        with self._lock:
            self._drop()
            self._closed = True
