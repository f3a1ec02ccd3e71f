"""The audit log (issue 29, item 4): a hash chain kept in the registry's store, shown
tampered with by ``verify`` (API and ``lorapool audit verify``) naming the entry; filters;
entries across a restart of a SQLite registry; an entry lands with the change it
records or not at all; the pool records register, unregister, rollback and refused
accesses."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool
from lorapool.access import SourceRules
from lorapool.errors import (
    AccessDenied,
    AdapterNotFound,
    AuditChainBroken,
    InvalidRequest,
    RegistryUnavailable,
    SourceNotAllowed,
)
from lorapool.registry import MemoryRegistryStore, Registry
from lorapool.registry.audit import GENESIS, AuditEvent, AuditLog, redact_source
from lorapool.registry.stores import AuditConflict
from lorapool.testing import MockBackend
from lorapool.types import AdapterInfo, LoraConfig

from .test_store import make_adapters


def _fill(log: AuditLog) -> None:
    log.record("register", tenant="acme", adapter="acme/a@v1", actor="acme", sha256="1" * 64)
    log.record("register", tenant="acme", adapter="acme/a@v2", actor="acme", sha256="2" * 64)
    log.record("register", tenant="globex", adapter="globex/b", actor="platform")
    log.record("rollback", tenant="acme", adapter="acme/a", actor="acme", automatic=False)
    log.record("access_denied", tenant="globex", adapter="acme/a", asked="unregister")


def _info(adapter_id: str) -> AdapterInfo:
    return AdapterInfo(
        adapter_id=adapter_id,
        tenant=adapter_id.split("/")[0],
        shared=False,
        source="/nowhere",
        sha256="0" * 64,
        size_bytes=1,
        config=LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",)),
    )


def test_each_entry_carries_the_hash_of_the_one_before() -> None:
    log = AuditLog()
    _fill(log)
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after.prev == before.hash and after.hash == after.digest()
    assert log.verify() == 5
    assert log.head() == (5, entries[-1].hash)
    assert AuditLog().head() == (0, GENESIS) and AuditLog().verify() == 0


@pytest.mark.parametrize("field", ["action", "tenant", "adapter", "actor", "detail", "at"])
def test_editing_any_field_of_an_entry_breaks_the_chain_at_that_entry(field: str) -> None:
    store = MemoryRegistryStore()
    log = AuditLog(store)
    _fill(log)
    row = store._audit[2]  # entry 3
    row[field] = {"detail": json.dumps({"x": 1}), "at": row["at"] + 1.0}.get(field, "edited")
    with pytest.raises(AuditChainBroken) as broken:
        log.verify()
    assert broken.value.seq == 3 and "content" in broken.value.detail
    assert "entry 3" in str(broken.value)


def test_a_removed_or_relinked_entry_is_named() -> None:
    store = MemoryRegistryStore()
    log = AuditLog(store)
    _fill(log)
    del store._audit[1]  # entry 2 gone
    with pytest.raises(AuditChainBroken) as broken:
        log.verify()
    assert broken.value.seq == 2 and "missing" in broken.value.detail

    store = MemoryRegistryStore()
    log = AuditLog(store)
    _fill(log)
    # Entry 4 recomputed over an edited detail, with its own hash made to match: entry 5's
    # link to it breaks (without an outside anchor, only the newest entry could be forged).
    row = store._audit[3]
    forged = log.entries()[3]
    forged = type(forged)(**{**forged.__dict__, "detail": {"automatic": True}})
    row["detail"] = json.dumps({"automatic": True})
    row["hash"] = forged.digest()
    with pytest.raises(AuditChainBroken) as broken:
        log.verify()
    assert broken.value.seq == 5 and "prev" in broken.value.detail


def test_filters() -> None:
    log = AuditLog()
    _fill(log)
    assert [e.seq for e in log.entries(tenant="acme")] == [1, 2, 4]
    assert [e.seq for e in log.entries(tenant="globex")] == [3, 5]
    assert [e.seq for e in log.entries(adapter="acme/a")] == [4, 5]
    assert [e.seq for e in log.entries(action="register")] == [1, 2, 3]
    assert [e.seq for e in log.entries(action="register", tenant="acme")] == [1, 2]
    assert [e.seq for e in log.entries(after=3)] == [4, 5]
    assert [e.seq for e in log.entries(limit=2)] == [1, 2]
    assert log.entries(tenant="nobody") == []
    denied = log.entries(action="access_denied")[0]
    assert denied.detail == {"asked": "unregister"} and denied.actor is None


def test_detail_must_be_json_and_nothing_is_written_otherwise() -> None:
    log = AuditLog()
    with pytest.raises(InvalidRequest, match="JSON"):
        log.record("register", tenant="acme", blob=object())
    with pytest.raises(InvalidRequest, match="action"):
        log.record("", tenant="acme")
    with pytest.raises(InvalidRequest, match="bytes"):
        log.record("register", tenant="acme", blob="x" * 70_000)
    assert log.entries() == []
    entry = log.record("promote", tenant="acme", scores=(0.5, 1), nested={"a": [1, 2]})
    assert entry.detail == {"scores": [0.5, 1], "nested": {"a": [1, 2]}}
    assert log.verify() == 1


def test_a_sqlite_registry_keeps_its_entries_across_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    registry = Registry.open(db)
    assert registry.audit.persistent
    _fill(registry.audit)
    before = registry.audit.entries()
    registry.close()

    again = Registry.open(db)
    try:
        assert again.audit.entries() == before  # every field, the hash included
        entry = again.audit.record("unregister", tenant="acme", adapter="acme/a")
        assert entry.seq == 6 and entry.prev == before[-1].hash
        assert again.audit.verify() == 6
        assert [e.seq for e in again.audit.entries(tenant="acme")] == [1, 2, 4, 6]
    finally:
        again.close()


def test_two_registries_on_one_file_extend_one_chain(tmp_path: Path) -> None:
    """Two processes' pools on one file (two connections): appends never fork the chain."""
    db = tmp_path / "registry.sqlite"
    one, two = Registry.open(db), Registry.open(db)
    try:
        for i in range(6):
            (one if i % 2 else two).audit.record("register", tenant="acme", adapter=f"acme/{i}")
        assert one.audit.verify() == 6 and two.audit.verify() == 6
        assert [e.adapter for e in one.audit.entries()] == [f"acme/{i}" for i in range(6)]
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_an_entry_lands_with_its_change_or_not_at_all(tmp_path: Path, kind: str) -> None:
    registry = Registry() if kind == "memory" else Registry.open(tmp_path / "r.sqlite")
    try:
        registry.add(_info("acme/a"), audit=AuditEvent("register", "acme", "acme/a"))
        assert [e.action for e in registry.audit.entries()] == ["register"]
        # The entry cannot be written (not JSON): the registration does not happen either.
        bad = AuditEvent("register", "acme", "acme/b", detail={"x": object()})
        with pytest.raises(InvalidRequest):
            registry.add(_info("acme/b"), audit=bad)
        assert "acme/b" not in registry and len(registry.audit.entries()) == 1
        # The change fails after its entry was written: the entry goes too.
        with pytest.raises(RuntimeError), registry.store.transaction():
            registry.audit.record("unregister", tenant="acme", adapter="acme/a")
            raise RuntimeError("the change failed")
        assert len(registry.audit.entries()) == 1 and registry.audit.verify() == 1
    finally:
        registry.close()
    if kind == "sqlite":
        again = Registry.open(tmp_path / "r.sqlite")
        try:
            assert "acme/b" not in again and [e.seq for e in again.audit.entries()] == [1]
        finally:
            again.close()


def _edit_entry_in_the_file(db: Path, seq: int) -> None:
    """What someone with the file would do: the triggers refuse an UPDATE, so drop them."""
    raw = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("UPDATE audit SET tenant = 'someone-else' WHERE seq = ?", (seq,))
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("DELETE FROM audit WHERE seq = ?", (seq,))
        raw.execute("DROP TRIGGER audit_no_update")
        raw.execute(
            "UPDATE audit SET detail = ? WHERE seq = ?", (json.dumps({"automatic": True}), seq)
        )
        raw.commit()
    finally:
        raw.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorapool", "audit", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        check=False,
    )


def test_an_entry_edited_in_the_sqlite_file_fails_verify_naming_it(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    registry = Registry.open(db)
    _fill(registry.audit)
    registry.close()

    done = _cli("verify", "--registry", str(db))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK 5 entries")

    listed = _cli("list", "--registry", str(db), "--tenant", "acme", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 4]
    assert rows[2]["action"] == "rollback" and rows[2]["detail"] == {"automatic": False}
    text = _cli("list", "--registry", str(db), "--action", "access_denied")
    assert text.returncode == 0 and "tenant=globex" in text.stdout and "unregister" in text.stdout

    _edit_entry_in_the_file(db, 4)

    reopened = Registry.open(db)
    try:
        with pytest.raises(AuditChainBroken) as broken:
            reopened.audit.verify()
        assert broken.value.seq == 4
    finally:
        reopened.close()
    done = _cli("verify", "--registry", str(db))
    assert done.returncode == 1
    assert done.stdout.startswith("BROKEN at entry 4:"), done.stdout

    missing = _cli("verify", "--registry", str(tmp_path / "nothing.sqlite"))
    assert missing.returncode == 2 and "no registry file" in missing.stderr
    assert not (tmp_path / "nothing.sqlite").exists()


class _RacingStore(MemoryRegistryStore):
    """A store without cross-process transactions (Ray's registry actor): another writer
    appends between this writer's read of the tail and its append, ``races`` times."""

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races

    def audit_insert(self, row: Mapping[str, Any]) -> None:
        if self.races:
            self.races -= 1
            tail = self.audit_tail()
            seq, prev = (1, GENESIS) if tail is None else (tail[0] + 1, tail[1])
            theirs = {**row, "seq": seq, "prev": prev, "action": "other", "hash": ""}
            super().audit_insert(theirs)
            raise AuditConflict("taken")
        super().audit_insert(row)


def test_an_append_that_loses_the_race_reads_the_tail_again() -> None:
    store = _RacingStore(races=2)
    log = AuditLog(store)
    entry = log.record("register", tenant="acme", adapter="acme/a")
    assert entry.seq == 3 and [e.action for e in log.entries()] == ["other", "other", "register"]
    assert entry.prev == log.entries()[1].hash
    # A writer that always loses gives up with a typed error, writing nothing of its own.
    hopeless = AuditLog(_RacingStore(races=10**6))
    with pytest.raises(RegistryUnavailable, match="audit log"):
        hopeless.record("register", tenant="acme")
    assert {e.action for e in hopeless.entries()} == {"other"}


def test_sources_are_recorded_without_secrets() -> None:
    presigned = "https://bucket.s3.amazonaws.com/acme/a?X-Amz-Signature=abc&X-Amz-Credential=k"
    assert redact_source(presigned) == "https://bucket.s3.amazonaws.com/acme/a"
    assert redact_source("https://user:token@host:8443/a#frag") == "https://host:8443/a"
    assert redact_source("s3://bucket/acme/a") == "s3://bucket/acme/a"
    assert redact_source("/srv/adapters/acme") == "/srv/adapters/acme"


# -- through a pool (MockBackend: the pool's own logic; tests/integration has TorchBackend) --


async def test_the_pool_records_register_unregister_rollback_and_refusals(
    tmp_path: Path,
) -> None:
    dirs = make_adapters(tmp_path, 4)
    db = tmp_path / "registry.sqlite"
    async with AdapterPool(MockBackend(), registry=db) as pool:
        assert pool.audit is pool.registry.audit
        v1 = await pool.register("support", str(dirs["t/a0"]), tenant="acme", version="v1")
        await pool.register("support", str(dirs["t/a1"]), tenant="acme", version="v2")
        await pool.register(
            "shared", str(dirs["t/a2"]), tenant="platform", shared=True, version="v1"
        )
        assert pool.rollback("support", tenant="acme") == {"v1": 100.0}
        with pytest.raises(AccessDenied):
            await pool.unregister("platform/shared", tenant="globex")
        with pytest.raises(AccessDenied):
            pool.rollback("platform/shared", tenant="globex")
        with pytest.raises(AdapterNotFound):  # another tenant's private alias: not recorded
            pool.rollback("acme/support", tenant="globex")
        rules = SourceRules(sources=(str(tmp_path / "allowed"),))
        with pytest.raises(SourceNotAllowed):
            await pool.register("x", str(dirs["t/a3"]), tenant="globex", allowed=rules)
        await pool.unregister("support", tenant="acme")

    async with AdapterPool(MockBackend(), registry=db) as pool:  # kept across the restart
        entries = pool.audit.entries()
        assert [(e.action, e.tenant, e.adapter) for e in entries] == [
            ("register", "acme", "acme/support@v1"),
            ("register", "acme", "acme/support@v2"),
            ("register", "platform", "platform/shared@v1"),
            ("rollback", "acme", "acme/support"),
            ("access_denied", "globex", "platform/shared"),
            ("access_denied", "globex", "platform/shared"),
            ("access_denied", "globex", "globex/x"),
            ("unregister", "acme", "acme/support"),
        ]
        register = entries[0].detail
        assert register["sha256"] == v1.sha256 and register["shared"] is False
        assert register["version"] == "v1" and register["source"] == str(dirs["t/a0"])
        rollback = entries[3].detail
        assert rollback == {"automatic": False, "from": {"v2": 100.0}, "to": {"v1": 100.0}}
        assert [e.detail["asked"] for e in entries[4:7]] == ["unregister", "rollback", "register"]
        assert entries[6].detail["reason"] == "SourceNotAllowed"
        assert entries[7].detail == {"versions": ["acme/support@v1", "acme/support@v2"]}
        assert "acme/support" not in json.dumps([e.as_dict() for e in entries[4:7]])
        assert pool.audit.verify() == 8


async def test_pruned_versions_are_recorded(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 3)
    async with AdapterPool(MockBackend(), registry=Registry(keep_versions=1)) as pool:
        await pool.register("a", str(dirs["t/a0"]), tenant="acme", version="v1")
        await pool.register("a", str(dirs["t/a1"]), tenant="acme", version="v2")
        pruned = pool.audit.entries(action="unregister")
        assert [(e.adapter, e.actor) for e in pruned] == [("acme/a@v1", "lorapool")]
        assert "keep_versions" in pruned[0].detail["reason"]
