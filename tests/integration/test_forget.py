"""Forget (issue 29): the real model on TorchBackend, real PEFT adapters, a real moto S3.

Proves: after ``pool.forget`` no file named by the adapter's sha256 is left under the disk
tier, no host, device or prefix-cache entry is left, the SQLite registry (opened again)
holds no row of it, requests get ``AdapterNotFound``, and another tenant's adapter with the
same bytes keeps serving from its disk copy; in-flight requests drain or are cancelled
(``AdapterForgotten``, billed for what they produced); ``delete_source`` deletes S3 objects
and local files and refuses an HTTP source before changing anything.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.errors import AdapterForgotten, AdapterNotFound, SourceNotDeletable
from lorapool.pool import REGISTRY_FILE
from lorapool.registry import Registry

from .servers import CREDENTIALS, CountingMotoServer, FileServer, upload

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
# Long enough for several prefix-cache blocks (16 tokens each by default).
LONG = " ".join(f"Item {i}: a line of the shipping manifest for the harbour." for i in range(12))


async def _pool(model_dir: Path, tmp_path: Path, s3: CountingMotoServer | None) -> AdapterPool:
    from lorapool.backends.torch import TorchBackend
    from lorapool.sources import S3Source

    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=4, max_seq_len=384)
    sources = {} if s3 is None else {"s3": S3Source(endpoint_url=s3.endpoint, **CREDENTIALS)}
    store = TieredStore(host_bytes="256MiB", disk_dir=tmp_path / "disk", sources=sources)
    return AdapterPool(backend, store=store)


def _named(root: Path, sha: str) -> list[Path]:
    """Every file or directory under ``root`` whose name holds ``sha``."""
    return [p for p in root.rglob("*") if sha in p.name]


async def _s3_keys(s3: CountingMotoServer, bucket: str) -> set[str]:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=s3.endpoint, **CREDENTIALS) as client:
        listed = await client.list_objects_v2(Bucket=bucket)
        return {o["Key"] for o in listed.get("Contents", [])}


@pytest.fixture
async def s3_adapters(
    s3_server: CountingMotoServer, adapters: dict[str, Path]
) -> AsyncIterator[CountingMotoServer]:
    """acme's two versions and globex's copy of acme's first (the same bytes) in a bucket."""
    await upload(s3_server, "adapters", "acme-v1", adapters["r8-attn"])
    await upload(s3_server, "adapters", "acme-v2", adapters["r16-all"])
    await upload(s3_server, "adapters", "globex-twin", adapters["r8-attn"])
    yield s3_server


async def test_forget_removes_every_copy_and_spares_a_shared_one(
    model_dir: Path, tmp_path: Path, s3_adapters: CountingMotoServer
) -> None:
    pool = await _pool(model_dir, tmp_path, s3_adapters)
    disk = tmp_path / "disk"
    async with pool:
        assert pool.backend.capabilities.prefix_cache
        v1 = await pool.register("bot", "s3://adapters/acme-v1", tenant="acme", version="v1")
        v2 = await pool.register("bot", "s3://adapters/acme-v2", tenant="acme", version="v2")
        twin = await pool.register("twin", "s3://adapters/globex-twin", tenant="globex")
        assert twin.sha256 == v1.sha256 != v2.sha256
        before = await pool.complete(LONG, adapter="twin", tenant="globex", params=GREEDY)
        for adapter in ("bot@v1", "bot"):  # v1 and v2 (the alias's traffic) both used, v2 last
            await pool.complete(LONG, adapter=adapter, tenant="acme", params=GREEDY)
            again = await pool.complete(LONG, adapter=adapter, tenant="acme", params=GREEDY)
            assert again.usage.cached_tokens > 0  # its blocks are in the prefix cache
        engine = pool.backend._require_engine()  # type: ignore[attr-defined]
        assert {v1.sha256, v2.sha256} <= engine.prefix.index.contents()
        assert _named(disk, v1.sha256) and _named(disk, v2.sha256)
        assert pool.store.on_host(v2.adapter_id) and pool.store.on_device(v2.adapter_id)

        report = await pool.forget("bot", tenant="acme")

        assert report.registry == ("acme/bot", "acme/bot@v1", "acme/bot@v2")
        (purge,) = report.purges
        assert purge.disk_kept == (v1.sha256,)  # globex's twin has those bytes
        assert [Path(p).name for p in purge.disk_paths] == [v2.sha256]
        assert "device" in purge.tiers[v2.adapter_id] and "host" in purge.tiers[v2.adapter_id]
        # No file of the forgotten-only content under the disk tier; the shared one stays.
        assert _named(disk, v2.sha256) == []
        assert _named(disk, v1.sha256)
        # No host, device or prefix-cache entry.
        for info in (v1, v2):
            assert not pool.store.on_host(info.adapter_id)
            assert not pool.store.on_device(info.adapter_id)
            assert info.sha256 not in engine.prefix.index.contents()
        # The registry file, opened again, holds no row of it.
        reopened = Registry.open(disk / REGISTRY_FILE)
        try:
            assert "acme/bot" not in reopened and "acme/bot@v1" not in reopened
            assert [i.adapter_id for i in reopened.visible(None)] == ["globex/twin"]
        finally:
            reopened.close()
        with sqlite3.connect(disk / REGISTRY_FILE) as db:
            rows = db.execute("SELECT adapter_id FROM adapters").fetchall()
            aliases = db.execute("SELECT value FROM settings WHERE key = 'aliases'").fetchone()
        assert rows == [("globex/twin",)]
        assert "acme/bot" not in json.loads(aliases[0] if aliases else "{}")
        # Every request for it: AdapterNotFound.
        for adapter in ("bot", "bot@v1", "bot@v2", "acme/bot"):
            with pytest.raises(AdapterNotFound):
                await pool.complete("hi", adapter=adapter, tenant="acme", params=GREEDY)
        # The other tenant's adapter with the same bytes serves as before.
        after = await pool.complete(LONG, adapter="twin", tenant="globex", params=GREEDY)
        assert after.text == before.text
        (entry,) = pool.audit.entries(action="forget")
        assert entry.tenant == "acme" and entry.detail["registry"] == list(report.registry)

        # Blocks computed with v2 are gone, not merely unreachable: the same tenant with
        # the same bytes under the same name again misses the cache.
        again_v2 = await pool.register("bot", "s3://adapters/acme-v2", tenant="acme", version="v2")
        assert again_v2.sha256 == v2.sha256
        fresh = await pool.complete(LONG, adapter="bot", tenant="acme", params=GREEDY)
        assert fresh.usage.cached_tokens == 0


async def _read(stream: Any, n: int) -> int:
    """Read ``n`` chunks of ``stream``; the tokens they carried."""
    tokens = 0
    for _ in range(n):
        chunk = await stream.__anext__()
        tokens += len(chunk.token_ids)
    return tokens


async def test_in_flight_requests_drain_or_are_cancelled(
    model_dir: Path, tmp_path: Path, adapters: dict[str, Path]
) -> None:
    pool = await _pool(model_dir, tmp_path, None)
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    async with pool:
        await pool.register("slow", str(adapters["r8-attn"]), tenant="acme")
        await pool.register("quick", str(adapters["r16-all"]), tenant="acme")

        # drain: the request runs to its end; the forget returns after it.
        stream = pool.generate("Tell me a story.", adapter="slow", tenant="acme", params=long)
        got = await _read(stream, 2)
        forgetting = asyncio.create_task(pool.forget("slow", tenant="acme"))
        got += await _read(stream, 1)
        assert not forgetting.done()  # the request still holds it
        with pytest.raises(AdapterNotFound):  # new requests are refused meanwhile
            await pool.complete("hi", adapter="slow", tenant="acme", params=GREEDY)
        async for chunk in stream:
            got += len(chunk.token_ids)
        assert got == 60
        drained = await asyncio.wait_for(forgetting, 300)
        assert drained.drained == 1 and drained.cancelled == 0
        assert pool.usage("acme").completed == 1

        # cancel: the request ends with AdapterForgotten, billed for what it produced.
        stream = pool.generate("Tell me a story.", adapter="quick", tenant="acme", params=long)
        got = await _read(stream, 3)
        forgetting = asyncio.create_task(pool.forget("quick", tenant="acme", in_flight="cancel"))
        with pytest.raises(AdapterForgotten) as caught:
            async for chunk in stream:
                got += len(chunk.token_ids)
        cancelled = await asyncio.wait_for(forgetting, 300)
        assert cancelled.cancelled == 1 and cancelled.drained == 0
        assert 3 <= got < 60 and caught.value.produced == got
        usage = pool.usage("acme")
        assert usage.failed == 1 and usage.completion_tokens == 60 + got
        assert not pool.store.on_device("acme/quick") and pool.store.in_use == 0


async def test_delete_source(
    model_dir: Path, tmp_path: Path, adapters: dict[str, Path], s3_adapters: CountingMotoServer
) -> None:
    local = tmp_path / "local-adapter"
    shutil.copytree(adapters["r32-attn"], local)
    www = tmp_path / "www"
    shutil.copytree(adapters["r16-qv-rslora"], www / "web")
    http = FileServer(www)
    http.start()
    pool = await _pool(model_dir, tmp_path, s3_adapters)
    try:
        async with pool:
            await pool.register("s3", "s3://adapters/acme-v2", tenant="acme")
            await pool.register("local", str(local), tenant="acme")
            await pool.register("web", f"{http.url}/web", tenant="acme")

            # HTTP cannot be deleted: refused before anything changes.
            with pytest.raises(SourceNotDeletable):
                await pool.forget("web", tenant="acme", delete_source=True)
            assert (await pool.complete("hi", adapter="web", tenant="acme", params=GREEDY)).text
            assert (www / "web" / "adapter_model.safetensors").is_file()

            s3_report = await pool.forget("s3", tenant="acme", delete_source=True)
            assert s3_report.source == (
                "s3://adapters/acme-v2/adapter_config.json",
                "s3://adapters/acme-v2/adapter_model.safetensors",
            )
            keys = await _s3_keys(s3_adapters, "adapters")
            assert not any(k.startswith("acme-v2/") for k in keys)
            assert any(k.startswith("globex-twin/") for k in keys)  # others untouched

            local_report = await pool.forget("local", tenant="acme", delete_source=True)
            assert not local.exists()
            assert str(local / "adapter_model.safetensors") in local_report.source
            assert [i.adapter_id for i in pool.list_adapters(tenant="acme")] == ["acme/web"]
    finally:
        http.stop()


async def test_forgetting_a_whole_tenant_drops_its_base_model_prefix_blocks(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Right to be forgotten covers the tenant's prompts too: the KV blocks its requests
    left in the prefix cache on the base model go with ``forget(tenant=...)``; another
    tenant's blocks of the same prompt stay."""
    async with await _pool(model_dir, tmp_path, None) as pool:
        await pool.register("bot", str(adapters["r8-attn"]), tenant="acme")
        for tenant in ("acme", "globex"):
            for _ in range(2):
                done = await pool.complete(LONG, tenant=tenant, params=GREEDY)
            assert done.usage.cached_tokens > 0, tenant  # the base model's blocks, its own
        report = await pool.forget(tenant="acme")
        assert report.registry == ("acme/bot",)
        assert "prefix cache: the tenant's blocks" in report.purges[0].engine
        first = await pool.complete(LONG, tenant="acme", params=GREEDY)
        assert first.usage.cached_tokens == 0  # nothing of acme's earlier prompts is left
        kept = await pool.complete(LONG, tenant="globex", params=GREEDY)
        assert kept.usage.cached_tokens > 0  # globex's blocks of the same prompt are kept
        with pytest.raises(AdapterNotFound):
            await pool.complete("hi", adapter="bot", tenant="acme", params=GREEDY)
