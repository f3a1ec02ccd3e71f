"""Two pool processes on one PostgreSQL database (issue 31's proofs): an adapter
registered through one is served by the other; a rollback and an unregister on one are
seen by the other within a second, pushed by LISTEN/NOTIFY (the time is measured and
printed; the assertion is a generous hang guard); the database restarted mid-run: both
keep serving what is registered and see new registrations once it is back; a process
killed mid-registration leaves no half row, and its lock goes with it.

Real parts: SmolLM2 on the TorchBackend in each process, real PEFT adapters, a real
PostgreSQL server (``initdb``/``pg_ctl``) started and removed by the module."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorapool.registry.postgres import PostgresRegistryStore

from .postgres_server import PostgresServer, fresh_schema, postgres

__all__ = ["postgres"]

pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORKER = Path(__file__).with_name("pg_replica.py")
ROOT = Path(__file__).resolve().parents[2]
PROPAGATION_GUARD = 5.0
"""Seconds: a hang guard only; the issue's bound (1 s) is what the printed times show."""


class Replica:
    """A pool process (pg_replica.py) driven by JSON lines."""

    def __init__(self, name: str, dsn: str, schema: str, model_dir: Path, tmp: Path) -> None:
        self.name = name
        self.log = tmp / f"{name}.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), dsn, schema, str(model_dir), str(tmp / name)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=ROOT,
                start_new_session=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def next(self, timeout: float = 120) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.name}: no answer in {timeout} s; log:\n{self.log.read_text()[-3000:]}"
            ) from None

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None and self.proc.poll() is None, self.log.read_text()
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, timeout: float = 120, **cmd: Any) -> Any:
        self.send(**cmd)
        answer = self.next(timeout)
        assert "ok" in answer, f"{self.name} {cmd}: {answer}"
        return answer["ok"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture(scope="module")
def replicas(
    postgres: PostgresServer,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Replica, Replica, str]]:
    schema = fresh_schema()
    tmp = tmp_path_factory.mktemp("replicas")
    PostgresRegistryStore(postgres.dsn, schema=schema, listen=False).close()  # migrate once
    a = Replica("a", postgres.dsn, schema, model_dir, tmp)
    b = Replica("b", postgres.dsn, schema, model_dir, tmp)
    try:
        assert a.next(180) == {"ready": True}
        assert b.next(180) == {"ready": True}
        yield a, b, schema
    finally:
        a.kill()
        b.kill()


def _propagation(
    writer: Replica, watcher: Replica, expect: str | None, change: dict[str, Any]
) -> float:
    """Seconds from just before ``change`` is sent to ``writer`` until ``watcher``'s own
    view resolves the changed adapter to ``expect``."""
    watcher.send(
        op="watch", adapter=change["adapter"], expect=expect, timeout=PROPAGATION_GUARD + 5
    )
    time.sleep(0.2)  # the watch is running
    before = time.time()
    writer.call(**change)
    seen = watcher.next()
    assert "ok" in seen and seen["ok"]["seen_at"] is not None, seen
    return max(0.0, float(seen["ok"]["seen_at"]) - before)


def test_registered_on_one_served_by_the_other_and_changes_propagate(
    replicas: tuple[Replica, Replica, str], adapters: dict[str, Path]
) -> None:
    a, b, _ = replicas
    source = str(adapters["r8-attn"])
    a.call(op="register", adapter="bot", source=source, version="v1")
    # Served by b, which never registered it: the same greedy answer as a's.
    b.call(op="watch", adapter="bot", expect="acme/bot@v1")
    prompt = "The capital of France is"
    on_b = b.call(op="generate", adapter="bot", prompt=prompt)
    on_a = a.call(op="generate", adapter="bot", prompt=prompt)
    assert on_b["served_by"] == "adapter" and on_a["served_by"] == "adapter"
    assert on_b["text"] == on_a["text"]
    base = b.call(op="generate", prompt=prompt)
    assert base["text"] != on_b["text"]  # the adapter changes the answer: it was applied

    other = str(adapters["r16-qv-rslora"])
    register = {"op": "register", "adapter": "bot", "source": other, "version": "v2"}
    moved = _propagation(a, b, "acme/bot@v2", register)
    rolled = _propagation(a, b, "acme/bot@v1", {"op": "rollback", "adapter": "bot"})
    # the other way round: b unregisters, a sees it gone
    removed = _propagation(b, a, None, {"op": "unregister", "adapter": "bot"})
    print(
        f"\npropagation (change sent on one replica -> seen by the other's registry): "
        f"alias moved {moved * 1000:.1f} ms, rollback {rolled * 1000:.1f} ms, "
        f"unregister {removed * 1000:.1f} ms"
    )
    for seconds in (moved, rolled, removed):
        assert seconds < PROPAGATION_GUARD
    for replica in (a, b):  # after the unregister neither serves it
        replica.send(op="generate", adapter="bot", prompt=prompt)
        assert "AdapterNotFound" in replica.next()["error"]


def test_a_forget_on_one_purges_the_others_copies(
    replicas: tuple[Replica, Replica, str], adapters: dict[str, Path]
) -> None:
    """Each replica holds its own copies (device slot, RAM, disk tier for a remote source): a
    forget through
    one removes the adapter from the registry and its copies there; the other, told by
    NOTIFY, drops its own copies too (its follower), not only its registry view."""
    a, b, _ = replicas
    a.call(op="register", adapter="secret", source=str(adapters["r16-qv-rslora"]))
    b.call(op="watch", adapter="secret", expect="acme/secret")
    prompt = "My account number is"
    for r in (a, b):
        assert r.call(op="generate", adapter="secret", prompt=prompt)["served_by"] == "adapter"
    held = b.call(op="tiers", id="acme/secret")
    assert held["device"] and held["host"] and held["known"], held  # a local source: no disk copy
    before = time.time()
    a.call(op="forget", adapter="secret")
    deadline = time.monotonic() + PROPAGATION_GUARD
    while True:
        held = b.call(op="tiers", id="acme/secret")
        if not any(held.values()):
            break
        assert time.monotonic() < deadline, f"b still holds the forgotten adapter: {held}"
        time.sleep(0.05)
    print(f"\nforget on a -> b's copies gone in {(time.time() - before) * 1000:.0f} ms")
    b.send(op="generate", adapter="secret", prompt=prompt)
    assert "AdapterNotFound" in b.next()["error"]


def test_a_database_restart_keeps_both_serving_then_they_resync(
    replicas: tuple[Replica, Replica, str],
    adapters: dict[str, Path],
    postgres: PostgresServer,
) -> None:
    a, b, _ = replicas
    a.call(op="register", adapter="keep", source=str(adapters["r8-attn"]))
    b.call(op="watch", adapter="keep", expect="acme/keep")
    prompt = "Once upon a time"
    before = {r.name: r.call(op="generate", adapter="keep", prompt=prompt)["text"] for r in (a, b)}
    postgres.stop("fast")
    try:
        deadline = time.monotonic() + 30
        while any(r.call(op="status")["listening"] for r in (a, b)):
            assert time.monotonic() < deadline, "the listeners did not notice the restart"
            time.sleep(0.1)
        for r in (a, b):  # the database is down: registered adapters are served
            assert r.call(op="generate", adapter="keep", prompt=prompt)["text"] == before[r.name]
        a.send(op="register", adapter="during", source=str(adapters["r8-attn"]))
        assert "RegistryUnavailable" in a.next()["error"]
    finally:
        postgres.start()
    deadline = time.monotonic() + 60
    while not all(r.call(op="status")["listening"] for r in (a, b)):
        assert time.monotonic() < deadline, "the listeners did not reconnect"
        time.sleep(0.2)
    assert all(r.call(op="status")["reconnects"] >= 1 for r in (a, b))
    a.call(op="register", adapter="after", source=str(adapters["r8-attn"]))
    b.call(op="watch", adapter="after", expect="acme/after")
    assert b.call(op="generate", adapter="after", prompt=prompt)["text"] == before["b"]
    assert b.call(op="resolve", adapter="during")["id"] is None


def test_a_process_killed_mid_registration_leaves_no_half_row(
    replicas: tuple[Replica, Replica, str],
    adapters: dict[str, Path],
    postgres: PostgresServer,
) -> None:
    a, b, schema = replicas
    a.send(op="hang_register", adapter="half", source=str(adapters["r8-attn"]), version="v1")
    assert a.next() == {"hung": True}  # the record is written, the transaction open
    a.kill()
    store = PostgresRegistryStore(postgres.dsn, schema=schema, listen=False)
    try:
        assert "acme/half@v1" not in {i.adapter_id for i in store.records()}
        assert "acme/half" not in json.loads(store.get_setting("aliases") or "{}")
        assert store.audit_rows(adapter="acme/half@v1") == []
    finally:
        store.close()
    # the lock died with the process: the other replica registers the same version
    assert b.call(op="register", adapter="half", source=str(adapters["r8-attn"]), version="v1")
    assert b.call(op="resolve", adapter="half")["id"] == "acme/half@v1"
