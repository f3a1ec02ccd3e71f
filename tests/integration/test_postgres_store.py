"""PostgresRegistryStore on a real PostgreSQL server (issue 31, item 1): the registry
store conformance checks run on the memory, SQLite and PostgreSQL stores alike; the
schema is created and migrated by lorapool (versioned, a newer schema refused); every
change is one transaction (a failed register leaves no row, no alias, no audit entry);
the audit log lives in the database, append-only, one chain across stores; changes
propagate between stores by LISTEN/NOTIFY; a database restart is survived."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorapool.errors import AdapterExists, AdapterNotFound, RegistryUnavailable
from lorapool.registry import MemoryRegistryStore, Registry, SqliteRegistryStore
from lorapool.registry.audit import AuditEvent
from lorapool.registry.pg_migrations import LATEST
from lorapool.registry.postgres import PostgresRegistryStore
from lorapool.types import AdapterInfo, AdapterMetadata, LoraConfig

from .postgres_server import PostgresServer, fresh_schema, postgres, wait_for

__all__ = ["postgres"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(120)


def _info(adapter_id: str, **kw: object) -> AdapterInfo:
    base = AdapterInfo(
        adapter_id=adapter_id,
        tenant=adapter_id.split("/")[0],
        shared=False,
        source=f"/adapters/{adapter_id}",
        sha256="ab" * 32,
        size_bytes=1234,
        config=LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")),
    )
    return dataclasses.replace(base, **kw)


StoreFactory = Callable[[], Any]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresServer
) -> Iterator[StoreFactory]:
    """A factory of stores on one backing database (two calls: two handles on it)."""
    opened: list[object] = []
    schema = fresh_schema()
    memory = MemoryRegistryStore()

    def make() -> Any:
        store: Any
        if request.param == "memory":
            return memory
        if request.param == "sqlite":
            store = SqliteRegistryStore(tmp_path / "registry.sqlite")
        else:
            store = PostgresRegistryStore(postgres.dsn, schema=schema)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# -- conformance: every durable store behaves alike ------------------------------------


def test_records_in_insertion_order_and_round_trip(make_store: StoreFactory) -> None:
    store = make_store()
    meta = AdapterMetadata(
        trained_at=1700000000.5, eval_scores={"exact": 0.75}, compliance=("gdpr",)
    )
    infos = [
        _info("acme/b", norm=1.5, metadata=meta, signature='{"sig": 1}'),
        _info("acme/a", shared=True),
        _info("globex/c"),
    ]
    for info in infos:
        store.insert(info)
    assert list(store.records()) == infos


def test_a_duplicate_id_is_refused_and_changes_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    store.insert(_info("acme/a"))
    with pytest.raises(AdapterExists):
        store.insert(_info("acme/a", sha256="cd" * 32))
    assert [i.sha256 for i in store.records()] == ["ab" * 32]


def test_delete_replace_and_settings(make_store: StoreFactory) -> None:
    store = make_store()
    for name in ("acme/a", "acme/b", "acme/c"):
        store.insert(_info(name))
    store.replace(_info("acme/a", size_bytes=99))
    with pytest.raises(AdapterNotFound):
        store.replace(_info("acme/zzz"))
    store.delete("acme/b")
    store.delete("acme/never")
    records = list(store.records())
    assert [(i.adapter_id, i.size_bytes) for i in records] == [("acme/a", 99), ("acme/c", 1234)]
    assert store.get_setting("aliases") is None
    store.set_setting("aliases", '{"x": 1}')
    store.set_setting("aliases", '{"x": 2}')
    assert store.get_setting("aliases") == '{"x": 2}'
    store.set_setting("aliases", None)
    assert store.get_setting("aliases") is None


def test_a_transaction_is_all_or_nothing_and_nests(make_store: StoreFactory) -> None:
    store = make_store()
    registry = Registry(store)
    store.insert(_info("acme/kept"))
    with pytest.raises(RuntimeError, match="boom"), store.transaction():
        store.insert(_info("acme/lost"))
        with store.transaction():
            store.set_setting("k", "v")
            registry.audit.record("register", tenant="acme", adapter="acme/lost")
        raise RuntimeError("boom")
    assert [i.adapter_id for i in store.records()] == ["acme/kept"]
    assert store.get_setting("k") is None
    assert registry.audit.entries() == []
    with store.transaction():
        store.insert(_info("acme/x"))
        with pytest.raises(AdapterExists):  # a duplicate inside a change leaves it usable
            store.insert(_info("acme/kept"))
        store.set_setting("k", "v")
    assert [i.adapter_id for i in store.records()] == ["acme/kept", "acme/x"]
    assert store.get_setting("k") == "v"


def test_the_audit_log_filters_and_one_chain_across_handles(make_store: StoreFactory) -> None:
    one, two = Registry(make_store()), Registry(make_store())
    one.add(_info("acme/a"), audit=AuditEvent("register", "acme", "acme/a", "acme"))
    two.add(_info("globex/b"), audit=AuditEvent("register", "globex", "globex/b", "platform"))
    one.audit.record("access_denied", tenant="globex", adapter="acme/a", asked="unregister")
    assert two.audit.verify() == 3
    assert [e.adapter for e in one.audit.entries(tenant="globex")] == ["globex/b", "acme/a"]
    assert [e.seq for e in two.audit.entries(action="register", after=1)] == [2]
    assert len(one.audit.entries(limit=2)) == 2


# -- PostgreSQL specifics ----------------------------------------------------------------


def test_the_schema_is_created_versioned_and_a_newer_one_refused(postgres: PostgresServer) -> None:
    import psycopg

    schema = fresh_schema()
    store = PostgresRegistryStore(postgres.dsn, schema=schema, listen=False)
    assert store.schema_version() == LATEST
    store.close()
    again = PostgresRegistryStore(postgres.dsn, schema=schema, listen=False)  # no re-run
    assert again.schema_version() == LATEST
    again.close()
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {schema}.migrations VALUES (%s, 0)", (LATEST + 1,))
    with pytest.raises(RegistryUnavailable, match="newer lorapool"):
        PostgresRegistryStore(postgres.dsn, schema=schema, listen=False)
    with pytest.raises(ValueError, match="schema"):
        PostgresRegistryStore(postgres.dsn, schema="x; DROP TABLE y")


def test_replicas_opening_together_migrate_once(postgres: PostgresServer) -> None:
    schema = fresh_schema()
    stores: list[PostgresRegistryStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(PostgresRegistryStore(postgres.dsn, schema=schema, listen=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 6
    assert all(s.schema_version() == LATEST for s in stores)
    for s in stores:
        s.close()


def test_the_audit_table_refuses_update_delete_and_truncate(postgres: PostgresServer) -> None:
    import psycopg

    schema = fresh_schema()
    registry = Registry(PostgresRegistryStore(postgres.dsn, schema=schema, listen=False))
    registry.audit.record("register", tenant="acme", adapter="acme/a")
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        for sql in (
            f"UPDATE {schema}.audit SET actor = 'mallory'",
            f"DELETE FROM {schema}.audit",
            f"TRUNCATE {schema}.audit",
        ):
            with pytest.raises(psycopg.Error, match="append-only"):
                conn.execute(sql)
    assert registry.audit.verify() == 1
    registry.close()


def test_a_failed_register_leaves_no_row_alias_or_entry(postgres: PostgresServer) -> None:
    schema = fresh_schema()

    class FailsOnAliases(PostgresRegistryStore):
        def set_setting(self, key: str, value: str | None) -> None:
            raise RegistryUnavailable("write the setting", "injected")

    registry = Registry(FailsOnAliases(postgres.dsn, schema=schema))
    with pytest.raises(RegistryUnavailable, match="injected"):
        registry.add_version(
            _info("acme/bot@v1"),
            "acme/bot",
            "v1",
            activate=True,
            audit=AuditEvent("register", "acme", "acme/bot@v1"),
        )
    registry.close()
    fresh = PostgresRegistryStore(postgres.dsn, schema=schema, listen=False)
    assert list(fresh.records()) == []
    assert fresh.get_setting("aliases") is None
    assert fresh.audit_rows() == []
    fresh.close()


def test_changes_propagate_by_notify_not_by_own_writes(postgres: PostgresServer) -> None:
    schema = fresh_schema()
    a = PostgresRegistryStore(postgres.dsn, schema=schema)
    b = PostgresRegistryStore(postgres.dsn, schema=schema)
    ra, rb = Registry(a), Registry(b)
    try:
        seen_a, seen_b = a.version(), b.version()
        ra.add(_info("acme/a"))
        wait_for(lambda: b.version() != seen_b, timeout=10)
        assert a.version() == seen_a  # its own change needs no reload
        assert rb.resolve("acme/a", "acme").adapter_id == "acme/a"
        # an alias moved on one is the other's answer at its next lookup
        ra.add_version(_info("acme/bot@v1"), "acme/bot", "v1", activate=True)
        ra.add_version(_info("acme/bot@v2"), "acme/bot", "v2", activate=True)
        wait_for(lambda: rb.resolve("acme/bot", "acme").adapter_id == "acme/bot@v2")
        seen_b = b.version()
        ra.rollback("acme/bot", "acme")
        wait_for(lambda: b.version() != seen_b)
        assert rb.resolve("acme/bot", "acme", request_id="r1").adapter_id == "acme/bot@v1"
        seen_b = b.version()
        ra.remove("acme/a")
        wait_for(lambda: b.version() != seen_b)
        with pytest.raises(AdapterNotFound):
            rb.resolve("acme/a", "acme")
    finally:
        ra.close()
        rb.close()


def test_a_lookup_miss_asks_the_database_without_a_listener(postgres: PostgresServer) -> None:
    schema = fresh_schema()
    writer = Registry(PostgresRegistryStore(postgres.dsn, schema=schema, listen=False))
    reader = Registry(PostgresRegistryStore(postgres.dsn, schema=schema, listen=False))
    writer.add(_info("acme/a"))
    assert reader.resolve("acme/a", "acme").adapter_id == "acme/a"  # invalidate() on the miss
    writer.close()
    reader.close()


def test_concurrent_writers_extend_one_chain(postgres: PostgresServer) -> None:
    schema = fresh_schema()
    registries = [Registry(PostgresRegistryStore(postgres.dsn, schema=schema)) for _ in range(4)]

    def register(k: int) -> None:
        for i in range(5):
            name = f"t{k}/a{i}"
            registries[k].add(_info(name), audit=AuditEvent("register", f"t{k}", name))

    threads = [threading.Thread(target=register, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert registries[0].audit.verify() == 20
    wait_for(lambda: len(registries[3]) == 20)
    for r in registries:
        r.close()


def test_a_database_restart_keeps_the_view_and_resyncs(postgres: PostgresServer) -> None:
    schema = fresh_schema()

    class Counting(PostgresRegistryStore):
        connects = 0

        def _connect(self) -> Any:
            if threading.current_thread() is threading.main_thread():
                self.connects += 1
            return super()._connect()

    a = PostgresRegistryStore(postgres.dsn, schema=schema)
    b = Counting(postgres.dsn, schema=schema)
    ra, rb = Registry(a), Registry(b)
    try:
        ra.add(_info("acme/before"))
        wait_for(lambda: "acme/before" in rb)
        postgres.stop("fast")
        wait_for(lambda: not b.listening)
        # down: lookups are served from the last view; changes fail, typed
        assert rb.resolve("acme/before", "acme").adapter_id == "acme/before"
        connects = b.connects
        for _ in range(3):  # a miss asks the database: unreachable, no error
            with pytest.raises(AdapterNotFound):
                rb.resolve("acme/never", "acme")
        assert b.connects - connects <= 1  # then it waits RECONNECT_PAUSE between tries
        with pytest.raises(RegistryUnavailable):
            ra.add(_info("acme/lost"))
        assert "acme/lost" not in ra
        postgres.start()
        wait_for(lambda: a.listening and b.listening, timeout=30)
        assert b.reconnects >= 1
        ra.add(_info("acme/after"))
        wait_for(lambda: "acme/after" in rb)
        assert rb.resolve("acme/before", "acme").adapter_id == "acme/before"
        assert "acme/lost" not in rb
    finally:
        if not postgres.running:
            postgres.start()
        ra.close()
        rb.close()
