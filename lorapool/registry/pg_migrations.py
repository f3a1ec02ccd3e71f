"""The schema of :class:`~lorapool.registry.postgres.PostgresRegistryStore`, as versioned steps.

Each step is SQL that takes the schema from the previous version to its own; the
``migrations`` table of the schema records the versions applied. :func:`migrate` applies
the missing steps in order, in one transaction holding an advisory lock, so replicas
starting together migrate once. A database written by a newer lorapool (a version past
:data:`LATEST`) is refused rather than guessed at.

Steps are never edited once released: a change of schema is a new step at the end.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["LATEST", "MIGRATIONS", "check_schema_name", "migration_sql"]

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


def check_schema_name(schema: str) -> str:
    """``schema`` if it is a plain lower-case SQL identifier (it is written into SQL
    unquoted); :class:`ValueError` otherwise."""
    if not isinstance(schema, str) or not _NAME.match(schema):
        raise ValueError(
            f"schema {schema!r} must be 1 to 40 lower-case letters, digits or '_', "
            "not starting with a digit"
        )
    return schema


def _v1(s: str) -> str:
    return f"""
CREATE TABLE {s}.adapters (
    seq        BIGSERIAL,
    adapter_id TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    shared     BOOLEAN NOT NULL,
    source     TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    config     TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    norm       DOUBLE PRECISION,
    metadata   TEXT,
    signature  TEXT
);
CREATE TABLE {s}.settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE {s}.audit (
    seq     BIGINT PRIMARY KEY,
    at      DOUBLE PRECISION NOT NULL,
    action  TEXT NOT NULL,
    tenant  TEXT,
    adapter TEXT,
    actor   TEXT,
    detail  TEXT NOT NULL,
    prev    TEXT NOT NULL,
    hash    TEXT NOT NULL
);
CREATE INDEX audit_by_tenant ON {s}.audit (tenant, seq);
CREATE INDEX audit_by_adapter ON {s}.audit (adapter, seq);
CREATE FUNCTION {s}.audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON {s}.audit
    FOR EACH ROW EXECUTE FUNCTION {s}.audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON {s}.audit
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_append_only();
CREATE TABLE {s}.state (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO {s}.state (id, generation) VALUES (1, 0);
"""


MIGRATIONS: tuple[Callable[[str], str], ...] = (_v1,)
"""Step ``i`` (0-based) builds version ``i + 1`` from version ``i``; given the schema name."""

LATEST = len(MIGRATIONS)
"""The schema version this lorapool writes."""


def migration_sql(version: int, schema: str) -> str:
    """The SQL of the step that builds ``version`` (1-based) in ``schema``."""
    if not 1 <= version <= LATEST:
        raise ValueError(f"no migration to version {version} (latest is {LATEST})")
    return MIGRATIONS[version - 1](check_schema_name(schema))
