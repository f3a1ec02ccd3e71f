"""One pool replica as a process, for the PostgreSQL multi-replica tests.

``python tests/integration/pg_replica.py DSN SCHEMA MODEL_DIR DISK_DIR``: an
:class:`~lorapool.AdapterPool` on the real TorchBackend whose registry is a
:class:`~lorapool.registry.postgres.PostgresRegistryStore`. It reads one JSON command a
line on stdin and answers one JSON line on stdout (``{"ok": ...}`` or ``{"error": ...}``):

``register`` / ``unregister`` / ``rollback`` / ``generate``: the pool's calls.
``watch``: poll this process's own registry view (memory: no query) every millisecond
until ``adapter`` resolves to ``expect`` (``null``: not found); answers the wall time it
saw it (``time.time()``, comparable across processes on one machine).
``hang_register``: start registering a version and stop inside the transaction, after
the record is written and before the alias and the commit: prints ``{"hung": true}``
and sleeps (the test kills the process there).
``status``: whether the listener is connected, and its reconnect count.
``forget``: the pool's forget. ``tiers``: where this process holds an adapter id.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lorapool import AdapterPool
from lorapool.backends.torch import TorchBackend
from lorapool.errors import AdapterNotFound, LorapoolError
from lorapool.registry import Registry
from lorapool.registry.postgres import PostgresRegistryStore
from lorapool.sampling import SamplingParams
from lorapool.store import TieredStore


class HangingStore(PostgresRegistryStore):
    """Stops inside a change's transaction when :attr:`hang` is set."""

    hang = False

    def set_setting(self, key: str, value: str | None) -> None:
        if self.hang:
            print(json.dumps({"hung": True}), flush=True)
            threading.Event().wait()  # until killed
        super().set_setting(key, value)


def _resolved(pool: AdapterPool, adapter: str, tenant: str) -> str | None:
    try:
        return pool.registry.resolve(adapter, tenant, request_id="watch").adapter_id
    except AdapterNotFound:
        return None


async def handle(pool: AdapterPool, store: HangingStore, cmd: dict[str, Any]) -> Any:
    op = cmd["op"]
    tenant = cmd.get("tenant", "acme")
    if op == "register":
        info = await pool.register(
            cmd["adapter"], cmd["source"], tenant=tenant, version=cmd.get("version")
        )
        return {"id": info.adapter_id, "at": time.time()}
    if op == "unregister":
        await pool.unregister(cmd["adapter"], tenant=tenant)
        return {"at": time.time()}
    if op == "rollback":
        split = pool.rollback(cmd["adapter"], tenant=tenant)
        return {"split": split, "at": time.time()}
    if op == "generate":
        done = await pool.complete(
            cmd["prompt"],
            adapter=cmd.get("adapter"),
            tenant=tenant,
            params=SamplingParams(max_tokens=cmd.get("max_tokens", 8), temperature=0),
        )
        return {"text": done.text, "adapter_id": done.adapter_id, "served_by": done.served_by}
    if op == "watch":
        deadline = time.monotonic() + cmd.get("timeout", 10)
        while _resolved(pool, cmd["adapter"], tenant) != cmd["expect"]:
            if time.monotonic() > deadline:
                return {"seen_at": None, "now": _resolved(pool, cmd["adapter"], tenant)}
            await asyncio.sleep(0.001)
        return {"seen_at": time.time()}
    if op == "resolve":
        return {"id": _resolved(pool, cmd["adapter"], tenant)}
    if op == "hang_register":
        store.hang = True
        await pool.register(cmd["adapter"], cmd["source"], tenant=tenant, version=cmd["version"])
        return {}
    if op == "status":
        return {"listening": store.listening, "reconnects": store.reconnects}
    if op == "forget":
        report = await pool.forget(cmd["adapter"], tenant=tenant)
        return {"registry": list(report.registry), "at": time.time()}
    if op == "tiers":  # where this process holds the adapter id: device, host, disk
        held = pool.store
        key = cmd["id"]
        return {
            "device": held.on_device(key),
            "host": held.on_host(key),
            "disk": held.on_disk(key),
            "known": any(i.adapter_id == key for i in held.held()),
        }
    raise ValueError(f"unknown op {op!r}")


async def main(dsn: str, schema: str, model_dir: str, disk_dir: str) -> None:
    store = HangingStore(dsn, schema=schema)
    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=4, max_seq_len=256)
    pool = AdapterPool(
        backend, store=TieredStore(disk_dir=Path(disk_dir)), registry=Registry(store)
    )
    async with pool:
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            try:
                answer: dict[str, Any] = {"ok": await handle(pool, store, cmd)}
            except (LorapoolError, ValueError) as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
