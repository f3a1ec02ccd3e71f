"""The PostgreSQL registry store's parts that need no server: its schema names and
migrations, URL recognition, passwords kept out of its repr, and psycopg imported only
when a store is opened (issue 31)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorapool.registry.pg_migrations import LATEST, check_schema_name, migration_sql
from lorapool.registry.postgres import _redact, is_postgres_url


@pytest.mark.parametrize("name", ["lorapool", "tenant_a", "_x", "a1"])
def test_plain_schema_names_are_accepted(name: str) -> None:
    assert check_schema_name(name) == name


@pytest.mark.parametrize("name", ["", "Lorapool", "1abc", "a-b", "a;drop", "x" * 41, 'a"'])
def test_other_schema_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        check_schema_name(name)


def test_migrations_are_numbered_from_one_and_name_their_schema() -> None:
    assert LATEST >= 1
    sql = migration_sql(1, "tenant_a")
    assert "CREATE TABLE tenant_a.adapters" in sql and "tenant_a.audit" in sql
    for bad in (0, LATEST + 1):
        with pytest.raises(ValueError, match="no migration"):
            migration_sql(bad, "lorapool")


def test_postgres_urls_are_recognised_and_redacted() -> None:
    assert is_postgres_url("postgresql://u@h/db") and is_postgres_url("postgres://h/db")
    assert not is_postgres_url("registry.sqlite") and not is_postgres_url("/x/postgresql://")
    assert _redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert _redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_lorapool_does_not_import_psycopg() -> None:
    code = (
        "import sys, lorapool, lorapool.registry, lorapool.registry.postgres; "
        "print('psycopg' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
