"""Adapter metadata (issue 29, item 6): checked at registration, kept by both registry
stores (SQLite across a restart, and files written by older versions migrated),
returned by versions()/list_adapters(), replaced atomically by Registry.set_metadata."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from lorapool import AdapterPool
from lorapool.errors import AdapterNotFound, InvalidRequest, RegistryUnavailable
from lorapool.registry import MemoryRegistryStore, Registry, SqliteRegistryStore
from lorapool.testing import MockBackend
from lorapool.types import AdapterInfo, AdapterMetadata, LoraConfig

from .test_store import make_adapters

DATA = "ab" * 32
CONFIG = "CD" * 32  # upper case is accepted and kept in lower case

FULL = AdapterMetadata(
    training_data_sha256=DATA,
    training_config_sha256=CONFIG,
    trained_at=1_700_000_000.5,
    eval_scores={"tool_name_exact": 0.98, "args_json": 1},
    retention_days=30,
    compliance=("gdpr", "pii-reviewed"),
)
STORED = replace(
    FULL,
    training_config_sha256=CONFIG.lower(),
    eval_scores={"tool_name_exact": 0.98, "args_json": 1.0},
)


def _registries(tmp_path: Path) -> dict[str, Callable[[], Registry]]:
    db = tmp_path / "registry.sqlite"
    return {"memory": Registry, "sqlite": lambda: Registry.open(db)}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_metadata_set_at_registration_is_returned_by_versions_and_lists(
    tmp_path: Path, kind: str
) -> None:
    dirs = make_adapters(tmp_path, 2)
    registry = _registries(tmp_path)[kind]()
    async with AdapterPool(MockBackend(), registry=registry) as pool:
        info = await pool.register(
            "support", str(dirs["t/a0"]), tenant="acme", version="v1", metadata=FULL
        )
        await pool.register("support", str(dirs["t/a1"]), tenant="acme", version="v2")
        assert info.metadata == STORED
        versions = pool.versions("support", tenant="acme")
        assert [v.metadata for v in versions] == [STORED, AdapterMetadata()]
        listed = {a.adapter_id: a.metadata for a in pool.list_adapters(tenant="acme")}
        assert listed["acme/support@v1"] == STORED
    registry.close()
    if kind == "sqlite":  # a restarted process finds it again, every field
        again = Registry.open(tmp_path / "registry.sqlite")
        try:
            assert again.resolve("acme/support@v1", None).metadata == STORED
            assert again.resolve("acme/support@v1", None).metadata.compliance == FULL.compliance
        finally:
            again.close()


BAD = {
    "short sha256": AdapterMetadata(training_data_sha256="abc"),
    "not hex": AdapterMetadata(training_config_sha256="z" * 64),
    "negative retention": AdapterMetadata(retention_days=-1),
    "fractional retention": AdapterMetadata(retention_days=1.5),  # type: ignore[arg-type]
    "boolean retention": AdapterMetadata(retention_days=True),
    "NaN score": AdapterMetadata(eval_scores={"exact": float("nan")}),
    "text score": AdapterMetadata(eval_scores={"exact": "high"}),  # type: ignore[dict-item]
    "empty score name": AdapterMetadata(eval_scores={"": 1.0}),
    "negative time": AdapterMetadata(trained_at=-5.0),
    "infinite time": AdapterMetadata(promoted_at=float("inf")),
    "flags as a string": AdapterMetadata(compliance="gdpr"),  # type: ignore[arg-type]
    "empty flag": AdapterMetadata(compliance=("",)),
    "control character": AdapterMetadata(signer="key\n1"),
    "not metadata": {"retention_days": 3},  # type: ignore[dict-item]
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_metadata_is_refused_and_nothing_is_registered(tmp_path: Path, case: str) -> None:
    dirs = make_adapters(tmp_path, 1)
    async with AdapterPool(MockBackend(), registry=Registry()) as pool:
        with pytest.raises(InvalidRequest, match="metadata"):
            await pool.register("a", str(dirs["t/a0"]), tenant="acme", metadata=BAD[case])  # type: ignore[arg-type]
        assert len(pool.registry) == 0
        await pool.register("a", str(dirs["t/a0"]), tenant="acme")  # the name is still free


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_set_metadata_replaces_a_versions_metadata_and_persists(
    tmp_path: Path, kind: str
) -> None:
    dirs = make_adapters(tmp_path, 2)
    registry = _registries(tmp_path)[kind]()
    async with AdapterPool(MockBackend(), registry=registry) as pool:
        await pool.register("support", str(dirs["t/a0"]), tenant="acme", version="v1")
        await pool.register("support", str(dirs["t/a1"]), tenant="acme", version="v2")
        order = [i.adapter_id for i in registry.store.records()]
        promoted = AdapterMetadata(
            promoted_at=1_700_000_100.0,
            eval_scores={"exact": 0.97},
            baseline_version="v1",
            gate="tool-calls@" + "0" * 12,
        )
        updated = registry.set_metadata("acme/support@v2", promoted)
        assert updated.metadata == promoted
        assert updated == replace(registry.resolve("acme/support@v2", None), metadata=promoted)
        assert pool.versions("support", tenant="acme")[1].metadata == promoted
        assert pool.versions("support", tenant="acme")[0].metadata == AdapterMetadata()
        assert [i.adapter_id for i in registry.store.records()] == order  # its place kept

        with pytest.raises(AdapterNotFound):
            registry.set_metadata("acme/support@v9", promoted)
        with pytest.raises(InvalidRequest, match="alias"):
            registry.set_metadata("acme/support", promoted)
        with pytest.raises(InvalidRequest, match="retention_days"):
            registry.set_metadata("acme/support@v2", AdapterMetadata(retention_days=-3))
        assert registry.resolve("acme/support@v2", None).metadata == promoted  # unchanged
    registry.close()
    if kind == "sqlite":
        again = Registry.open(tmp_path / "registry.sqlite")
        try:
            assert again.resolve("acme/support@v2", None).metadata == promoted
        finally:
            again.close()


class _FailingReplace(MemoryRegistryStore):
    """A store whose write fails (a full disk, a lost connection): unit test of atomicity."""

    fail = False

    def replace(self, info: AdapterInfo) -> None:
        if self.fail:
            raise RegistryUnavailable("update", "disk full")
        super().replace(info)


def _info(adapter_id: str, **fields: object) -> AdapterInfo:
    return AdapterInfo(
        adapter_id=adapter_id,
        tenant=adapter_id.split("/")[0],
        shared=False,
        source="/nowhere",
        sha256="0" * 64,
        size_bytes=1,
        config=LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",)),
        **fields,  # type: ignore[arg-type]
    )


def test_a_failed_set_metadata_changes_nothing() -> None:
    store = _FailingReplace()
    registry = Registry(store)
    registry.add(_info("acme/a", metadata=FULL))
    store.fail = True
    with pytest.raises(RegistryUnavailable):
        registry.set_metadata("acme/a", AdapterMetadata(retention_days=1))
    assert registry.resolve("acme/a", None).metadata == STORED
    assert next(store.records()).metadata == STORED


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_signature_is_kept_by_both_stores(tmp_path: Path, kind: str) -> None:
    manifest = '{"files": {}, "key_id": "platform-2026"}'
    registry = _registries(tmp_path)[kind]()
    registry.add(_info("acme/signed", signature=manifest))
    registry.add(_info("acme/unsigned"))
    registry.set_metadata("acme/signed", AdapterMetadata(signer="platform-2026"))
    assert registry.resolve("acme/signed", None).signature == manifest  # metadata change keeps it
    registry.close()
    if kind == "sqlite":
        again = Registry.open(tmp_path / "registry.sqlite")
        try:
            assert again.resolve("acme/signed", None).signature == manifest
            assert again.resolve("acme/signed", None).metadata.signer == "platform-2026"
            assert again.resolve("acme/unsigned", None).signature is None
        finally:
            again.close()


OLD_SCHEMAS = {
    # before weight norms were recorded
    "no norm": """CREATE TABLE adapters (
        adapter_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, shared INTEGER NOT NULL,
        source TEXT NOT NULL, sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL,
        config TEXT NOT NULL, created_at REAL NOT NULL);
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);""",
    # the schema before issue 29: norms, no metadata or signature
    "norm": """CREATE TABLE adapters (
        adapter_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, shared INTEGER NOT NULL,
        source TEXT NOT NULL, sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL,
        config TEXT NOT NULL, created_at REAL NOT NULL, norm REAL);
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);""",
}


@pytest.mark.parametrize("schema", sorted(OLD_SCHEMAS))
def test_a_registry_file_of_an_older_version_opens_and_takes_metadata(
    tmp_path: Path, schema: str
) -> None:
    db = tmp_path / "old.sqlite"
    raw = sqlite3.connect(db)
    raw.executescript(OLD_SCHEMAS[schema])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",)).model_dump_json()
    raw.execute(
        "INSERT INTO adapters (adapter_id, tenant, shared, source, sha256, size_bytes, config, "
        "created_at) VALUES ('acme/old', 'acme', 0, '/src', ?, 10, ?, 1.0)",
        ("1" * 64, config),
    )
    raw.commit()
    raw.close()

    registry = Registry.open(db)
    old = registry.resolve("acme/old", None)
    assert old.metadata == AdapterMetadata() and old.signature is None and old.norm is None
    registry.set_metadata("acme/old", FULL)
    registry.add(_info("acme/new", metadata=FULL, signature="{}"))
    registry.close()

    store = SqliteRegistryStore(db)  # and again: the migrated file opens as it is
    try:
        records = {i.adapter_id: i for i in store.records()}
        assert records["acme/old"].metadata == STORED and records["acme/old"].sha256 == "1" * 64
        assert records["acme/new"].metadata == STORED and records["acme/new"].signature == "{}"
    finally:
        store.close()
