"""Remote sources end to end: a real moto S3 server and a real HTTP server on loopback,
the real aiobotocore and httpx clients, the real model serving the fetched adapters."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.errors import LoadError, NotAPeftAdapter, SourceNotFound
from lorapool.formats import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE
from lorapool.pool import REGISTRY_FILE
from lorapool.sources import HttpSource, S3Source

from .servers import CREDENTIALS, CountingMotoServer, FileServer, upload

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPT = "The three primary colours are"


async def put_bytes(server: CountingMotoServer, bucket: str, key: str, body: bytes) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=server.endpoint, **CREDENTIALS
    ) as client:
        await client.put_object(Bucket=bucket, Key=key, Body=body)


def make_pool(model_dir: Path, store: TieredStore) -> AdapterPool:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=3, max_rank=32, max_batch=8, max_seq_len=256)
    return AdapterPool(backend, store=store)


@pytest.fixture
async def s3_pool(
    model_dir: Path, tmp_path: Path, s3_server: CountingMotoServer
) -> AsyncIterator[AdapterPool]:
    store = TieredStore(
        host_bytes="64MiB",
        disk_dir=tmp_path / "disk",
        sources={"s3": S3Source(endpoint_url=s3_server.endpoint, **CREDENTIALS)},
        retry_backoff=0.01,
    )
    async with make_pool(model_dir, store) as pool:
        yield pool


def visible_files(disk: Path) -> list[str]:
    """Adapter files in the disk tier (not its staging area, not the registry's file)."""
    return sorted(
        str(p.relative_to(disk))
        for p in disk.rglob("*")
        if p.is_file() and ".tmp" not in p.parts and not p.name.startswith(REGISTRY_FILE)
    )


async def test_s3_register_then_serve_from_host_disk_and_s3(
    s3_pool: AdapterPool, s3_server: CountingMotoServer, adapters: dict[str, Path]
) -> None:
    pool, store = s3_pool, s3_pool.store
    await upload(s3_server, "adapters", "acme/support", adapters["r8-attn"])
    info = await pool.register("acme/support", "s3://adapters/acme/support", tenant="acme")
    await pool.register("local/same", str(adapters["r8-attn"]), tenant="acme")
    assert s3_server.gets("/adapters/acme/support/") == 3  # one GET per file, at registration,
    assert s3_server.gets("/adapters/acme/support/lorapool.json") == 1  # + the optional sidecar
    assert info.source == "s3://adapters/acme/support"
    assert store.on_disk("acme/support") and not store.on_host("acme/support")

    expected = await pool.complete(PROMPT, adapter="local/same", tenant="acme", params=GREEDY)
    base = await pool.complete(PROMPT, tenant="acme", params=GREEDY)
    first = await pool.complete(PROMPT, adapter="acme/support", tenant="acme", params=GREEDY)
    assert first.text == expected.text != base.text
    assert s3_server.gets("/adapters/acme/support/") == 3  # served from the disk copy

    await pool.unload("acme/support", tenant="acme")  # device + host; the disk copy stays
    assert not store.on_device("acme/support") and not store.on_host("acme/support")
    host_loads = store.stats.host_loads
    again = await pool.complete(PROMPT, adapter="acme/support", tenant="acme", params=GREEDY)
    assert again.text == expected.text
    assert store.stats.host_loads == host_loads + 1
    assert s3_server.gets("/adapters/acme/support/") == 3

    await store.unload("acme/support", tiers=("device", "host", "disk"))
    assert not store.on_disk("acme/support")
    third = await pool.complete(PROMPT, adapter="acme/support", tenant="acme", params=GREEDY)
    assert third.text == expected.text
    assert s3_server.gets("/adapters/acme/support/") == 5  # the two files fetched again
    assert store.stats.disk_fetches == 1
    assert store.stats.source_fetches == {"s3": 1}
    assert store.stats.misses["disk"] >= 1 and store.stats.hits["disk"] >= 1


async def test_fifty_concurrent_cold_requests_cause_one_get_per_object(
    s3_pool: AdapterPool, s3_server: CountingMotoServer, adapters: dict[str, Path]
) -> None:
    import asyncio

    pool, store = s3_pool, s3_pool.store
    await upload(s3_server, "adapters", "cold", adapters["r16-all"])
    await pool.register("t/cold", "s3://adapters/cold", tenant="t")
    await store.unload("t/cold", tiers=("device", "host", "disk"))
    s3_server.requests.clear()

    params = SamplingParams(max_tokens=1, temperature=0.0)
    results = await asyncio.gather(
        *(
            pool.complete(f"Hello {i}", adapter="t/cold", tenant="t", params=params)
            for i in range(50)
        )
    )
    assert len(results) == 50 and all(r.usage.completion_tokens == 1 for r in results)
    for name in ADAPTER_FILES:
        assert s3_server.requests[("GET", f"/adapters/cold/{name}")] == 1, s3_server.requests
    assert store.stats.disk_fetches == 1 and store.stats.device_loads == 1
    assert store.refs("t/cold") == 0


async def test_corrupted_object_is_refused_and_nothing_is_cached(
    s3_pool: AdapterPool, s3_server: CountingMotoServer, adapters: dict[str, Path], tmp_path: Path
) -> None:
    pool, store = s3_pool, s3_pool.store
    await upload(s3_server, "adapters", "victim", adapters["r8-attn"])
    await upload(s3_server, "adapters", "bystander", adapters["r32-attn"])
    await pool.register("t/victim", "s3://adapters/victim", tenant="t")
    await pool.register("t/bystander", "s3://adapters/bystander", tenant="t")
    await store.unload("t/victim", tiers=("device", "host", "disk"))
    before = visible_files(tmp_path / "disk")

    weights = bytearray((adapters["r8-attn"] / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0xFF  # one flipped bit in a tensor: same shape, different content
    await put_bytes(s3_server, "adapters", f"victim/{WEIGHTS_FILE}", bytes(weights))

    with pytest.raises(LoadError) as err:
        await pool.complete(PROMPT, adapter="t/victim", tenant="t", params=GREEDY)
    assert err.value.tier == "source" and "sha256 mismatch" in str(err.value)
    assert store.stats.integrity_failures == 1
    assert not store.on_disk("t/victim") and not store.on_host("t/victim")
    assert not store.on_device("t/victim")
    assert visible_files(tmp_path / "disk") == before
    assert list((tmp_path / "disk" / ".tmp").iterdir()) == []
    assert store.refs("t/victim") == 0
    # Other tenants' adapters are untouched.
    ok = await pool.complete(PROMPT, adapter="t/bystander", tenant="t", params=GREEDY)
    assert ok.finish_reason == "length"


async def test_stopped_server_serves_from_disk_and_fails_only_what_exists_nowhere_else(
    s3_pool: AdapterPool, s3_server: CountingMotoServer, adapters: dict[str, Path]
) -> None:
    pool, store = s3_pool, s3_pool.store
    await upload(s3_server, "adapters", "on-disk", adapters["r8-attn"])
    await upload(s3_server, "adapters", "gone", adapters["r16-all"])
    await pool.register("t/on-disk", "s3://adapters/on-disk", tenant="t")
    await pool.register("t/gone", "s3://adapters/gone", tenant="t")
    await pool.register("t/local", str(adapters["r32-attn"]), tenant="t")
    await store.unload("t/gone", tiers=("device", "host", "disk"))
    resident_before = store.resident

    s3_server.stop()
    served = await pool.complete(PROMPT, adapter="t/on-disk", tenant="t", params=GREEDY)
    assert served.finish_reason == "length"
    with pytest.raises(LoadError) as err:
        await pool.complete(PROMPT, adapter="t/gone", tenant="t", params=GREEDY)
    assert err.value.tier == "source"
    assert "transient" in str(err.value)
    assert store.stats.fetch_retries == store.retries  # retried, then gave up
    assert not store.on_device("t/gone") and store.refs("t/gone") == 0
    assert set(resident_before) <= set(store.resident) | {"t/on-disk"}
    local = await pool.complete(PROMPT, adapter="t/local", tenant="t", params=GREEDY)
    assert local.finish_reason == "length"


async def test_s3_registration_errors_leave_everything_as_it_was(
    s3_pool: AdapterPool, s3_server: CountingMotoServer, adapters: dict[str, Path], tmp_path: Path
) -> None:
    pool = s3_pool
    await upload(s3_server, "adapters", "ok", adapters["r8-attn"])
    await put_bytes(s3_server, "adapters", "half/adapter_config.json", b'{"r": 8}')
    with pytest.raises(SourceNotFound, match="s3://adapters/missing"):
        await pool.register("t/missing", "s3://adapters/missing", tenant="t")
    with pytest.raises(NotAPeftAdapter, match=r"adapter_model\.safetensors"):
        await pool.register("t/half", "s3://adapters/half", tenant="t")
    assert pool.list_adapters(tenant="t") == []
    assert visible_files(tmp_path / "disk") == []
    assert list((tmp_path / "disk" / ".tmp").iterdir()) == []


async def test_disk_tier_and_registry_survive_a_restart(
    model_dir: Path, tmp_path: Path, s3_server: CountingMotoServer, adapters: dict[str, Path]
) -> None:
    await upload(s3_server, "adapters", "kept", adapters["r8-attn"])

    def store() -> TieredStore:
        return TieredStore(
            disk_dir=tmp_path / "disk",
            sources={"s3": S3Source(endpoint_url=s3_server.endpoint, **CREDENTIALS)},
        )

    async with make_pool(model_dir, store()) as pool:
        registered = await pool.register("t/kept", "s3://adapters/kept", tenant="t")
        first = await pool.complete(PROMPT, adapter="t/kept", tenant="t", params=GREEDY)
    gets = s3_server.gets("/adapters/kept/")
    assert (tmp_path / "disk" / "registry.sqlite").is_file()  # the default registry
    async with make_pool(model_dir, store()) as pool:
        [info] = pool.list_adapters(tenant="t")  # registered in the first run
        assert info == registered
        again = await pool.complete(PROMPT, adapter="t/kept", tenant="t", params=GREEDY)
        assert pool.store.on_disk("t/kept")
        assert pool.store.stats.disk_fetches == 0  # the copy from the first run
    assert again.text == first.text
    assert s3_server.gets("/adapters/kept/") == gets  # nothing fetched after the restart


async def test_a_disk_copy_missing_a_file_is_dropped_and_fetched_again(
    s3_pool: AdapterPool, s3_server: CountingMotoServer, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from aiobotocore.session import get_session

    pool, store = s3_pool, s3_pool.store
    disk = tmp_path / "disk"
    await upload(s3_server, "adapters", "mended", adapters["r8-attn"])
    await upload(s3_server, "adapters", "lost", adapters["r16-all"])
    mended = await pool.register("t/mended", "s3://adapters/mended", tenant="t")
    lost = await pool.register("t/lost", "s3://adapters/lost", tenant="t")
    expected = await pool.complete(PROMPT, adapter="t/mended", tenant="t", params=GREEDY)
    await store.unload("t/mended")  # device and host; the disk copy stays

    (disk / mended.sha256 / WEIGHTS_FILE).unlink()  # the disk copy is incomplete
    gets = s3_server.gets("/adapters/mended/")
    for _ in range(2):
        again = await pool.complete(PROMPT, adapter="t/mended", tenant="t", params=GREEDY)
        assert again.text == expected.text
        await store.unload("t/mended")
    assert s3_server.gets("/adapters/mended/") == gets + 2  # fetched again, once
    assert store.on_disk("t/mended") and (disk / mended.sha256 / WEIGHTS_FILE).is_file()

    # Incomplete, and the source has lost it too: a LoadError that says so.
    (disk / lost.sha256 / CONFIG_FILE).unlink()
    async with get_session().create_client(
        "s3", endpoint_url=s3_server.endpoint, **CREDENTIALS
    ) as client:
        for name in ADAPTER_FILES:
            await client.delete_object(Bucket="adapters", Key=f"lost/{name}")
    with pytest.raises(LoadError) as err:
        await pool.complete(PROMPT, adapter="t/lost", tenant="t", params=GREEDY)
    assert err.value.tier == "source" and "no longer exists" in str(err.value)
    assert not store.on_disk("t/lost") and store.refs("t/lost") == 0
    assert not (disk / lost.sha256).exists()


# -- HTTP --------------------------------------------------------------------------------


@pytest.fixture
def file_server(tmp_path: Path, adapters: dict[str, Path]) -> Iterator[FileServer]:
    root = tmp_path / "www"
    for name in ("r8-attn", "r16-all"):
        shutil.copytree(adapters[name], root / "adapters" / name)
    server = FileServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_http_source_serves_the_adapter_with_retries(
    model_dir: Path, tmp_path: Path, file_server: FileServer, adapters: dict[str, Path]
) -> None:
    store = TieredStore(
        disk_dir=tmp_path / "disk", sources={"http": HttpSource()}, retry_backoff=0.01
    )
    url = f"{file_server.url}/adapters/r16-all"
    async with make_pool(model_dir, store) as pool:
        file_server.fail_next[f"/adapters/r16-all/{WEIGHTS_FILE}"] = 2  # two 503s, then OK
        await pool.register("web/r16", url, tenant="web")
        assert store.stats.fetch_retries == 2
        await pool.register("web/local", str(adapters["r16-all"]), tenant="web")
        remote = await pool.complete(PROMPT, adapter="web/r16", tenant="web", params=GREEDY)
        local = await pool.complete(PROMPT, adapter="web/local", tenant="web", params=GREEDY)
        assert remote.text == local.text

        await store.unload("web/r16", tiers=("device", "host", "disk"))
        before = sum(file_server.gets.values())
        again = await pool.complete(PROMPT, adapter="web/r16", tenant="web", params=GREEDY)
        assert again.text == local.text
        assert sum(file_server.gets.values()) == before + 2

        with pytest.raises(SourceNotFound):
            await pool.register("web/nope", f"{file_server.url}/adapters/nope", tenant="web")
        assert [a.adapter_id for a in pool.list_adapters(tenant="web")] == ["web/local", "web/r16"]
