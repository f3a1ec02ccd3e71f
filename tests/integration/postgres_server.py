"""A throwaway PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` under a temp dir.

Debian's ``postgresql`` package (``scripts/setup-postgres.sh`` installs it) provides the
binaries. PostgreSQL refuses to run as root, so as root the cluster belongs to the
``postgres`` user and its commands run through ``runuser``. The server listens on
127.0.0.1 on a free port, with ``trust`` authentication and no durability (fsync off):
it lives for one test module. Without the binaries the tests are skipped, except in CI
(``CI`` set), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster on loopback; :meth:`stop` / :meth:`start` restart it on the
    same port and data (a database restart, as the tests need)."""

    def __init__(self) -> None:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            message = "PostgreSQL's initdb/pg_ctl not found: run scripts/setup-postgres.sh"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self._initdb, self._pg_ctl = initdb, pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="lorapool-pg-"))
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.data = self.root / "data"
        self.port = _free_port()
        self._run(
            [self._initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        )
        self.running = False

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(
            self._as + cmd, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr or done.stdout}")

    @property
    def dsn(self) -> str:
        """The ``postgresql://`` URL of the ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start (or start again) and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=100 -c shared_buffers=16MB"
        )
        self._run(
            [
                self._pg_ctl,
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ]
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop it (``fast``: clients are disconnected; ``immediate``: a crash)."""
        if self.running:
            self._run([self._pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])
            self.running = False

    def destroy(self) -> None:
        """Stop it and remove its files."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the module's tests, removed after them (even on failure)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def fresh_schema() -> str:
    """A schema name no other test uses (each test gets an empty registry)."""
    return f"t_{uuid.uuid4().hex[:12]}"


def wait_for(check: object, timeout: float = 10.0, step: float = 0.005) -> float:
    """Seconds until ``check()`` is true; ``AssertionError`` after ``timeout`` (a hang guard)."""
    start = time.monotonic()
    while True:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(step)
