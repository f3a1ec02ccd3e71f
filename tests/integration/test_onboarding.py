"""Onboarding a tenant's adapter for real: archives from disk, HTTP and S3; the weight-norm
outlier test against the registered population; base-model stamps. Real model, real
PEFT adapters, a real moto S3 server and a real HTTP server on loopback."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.__main__ import main
from lorapool.errors import AdapterValidationError
from lorapool.formats import (
    ADAPTER_FILES,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    BaseModelSpec,
    stamp_adapter,
)
from lorapool.registry import Registry
from lorapool.sources import HttpSource, S3Source

from .servers import CREDENTIALS, CountingMotoServer, FileServer
from .test_sources import put_bytes

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPT = "The three primary colours are"


def make_pool(model_dir: Path, store: TieredStore | None = None, **kw: object) -> AdapterPool:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=3, max_rank=32, max_batch=8, max_seq_len=256)
    return AdapterPool(backend, store=store, **kw)  # type: ignore[arg-type]


def tar_gz(directory: Path, top: str = "adapter") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in ADAPTER_FILES:
            tf.add(directory / name, arcname=f"{top}/{name}")
    return buf.getvalue()


def zipped(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ADAPTER_FILES:
            zf.write(directory / name, arcname=name)
    return buf.getvalue()


def scaled_copy(src: Path, dest: Path, factor: float) -> Path:
    """A copy of ``src`` with every tensor multiplied by ``factor`` (same shapes, other norm)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = {k: v * factor for k, v in load_file(src / WEIGHTS_FILE).items()}
    save_file(tensors, dest / WEIGHTS_FILE)
    return dest


async def test_archives_register_from_disk_http_and_s3_and_reload_from_their_source(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path, s3_server: CountingMotoServer
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "r16.zip").write_bytes(zipped(adapters["r16-all"]))
    local_archive = tmp_path / "r8.tar.gz"
    local_archive.write_bytes(tar_gz(adapters["r8-attn"]))
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=s3_server.endpoint, **CREDENTIALS
    ) as client:
        await client.create_bucket(Bucket="adapters")
    await put_bytes(s3_server, "adapters", "acme/r32.tgz", tar_gz(adapters["r32-attn"], "x"))

    http = FileServer(www)
    http.start()
    store = TieredStore(
        disk_dir=tmp_path / "disk",
        sources={
            "s3": S3Source(endpoint_url=s3_server.endpoint, **CREDENTIALS),
            "http": HttpSource(),
        },
        retry_backoff=0.01,
    )
    try:
        async with make_pool(model_dir, store) as pool:
            uris = {
                "acme/r8": str(local_archive),
                "acme/r16": f"{http.url}/r16.zip",
                "acme/r32": "s3://adapters/acme/r32.tgz",
            }
            dirs = {"acme/r8": "r8-attn", "acme/r16": "r16-all", "acme/r32": "r32-attn"}
            for adapter_id, uri in uris.items():
                info = await pool.register(adapter_id, uri, tenant="acme")
                assert info.source == uri
                assert store.on_disk(adapter_id)
                await pool.register(
                    f"{adapter_id}-dir", str(adapters[dirs[adapter_id]]), tenant="acme"
                )
            base = await pool.complete(PROMPT, tenant="acme", params=GREEDY)
            for adapter_id in uris:
                packed = await pool.complete(
                    PROMPT, adapter=adapter_id, tenant="acme", params=GREEDY
                )
                plain = await pool.complete(
                    PROMPT, adapter=f"{adapter_id}-dir", tenant="acme", params=GREEDY
                )
                assert packed.text == plain.text != base.text, adapter_id

            # Evicted from every tier, each comes back from its archive.
            gets = s3_server.gets("/adapters/acme/r32.tgz")
            for adapter_id in uris:
                await store.unload(adapter_id, tiers=("device", "host", "disk"))
                assert not store.on_disk(adapter_id)
                again = await pool.complete(
                    PROMPT, adapter=adapter_id, tenant="acme", params=GREEDY
                )
                plain = await pool.complete(
                    PROMPT, adapter=f"{adapter_id}-dir", tenant="acme", params=GREEDY
                )
                assert again.text == plain.text
            assert s3_server.gets("/adapters/acme/r32.tgz") == gets + 1
            assert http.gets["/r16.zip"] == 2
            leftovers = [p for p in (tmp_path / "disk" / ".tmp").rglob("*") if p.is_file()]
            assert leftovers == []
    finally:
        http.stop()


async def test_unsafe_archive_is_refused_with_its_reason_and_nothing_changes(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        for name in ADAPTER_FILES:
            tf.add(adapters["r8-attn"] / name, arcname=f"../{name}")
    linked = tmp_path / "linked.tar"
    with tarfile.open(linked, "w") as tf:
        tf.add(adapters["r8-attn"] / ADAPTER_FILES[0], arcname=ADAPTER_FILES[0])
        link = tarfile.TarInfo(WEIGHTS_FILE)
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    async with make_pool(model_dir, TieredStore(disk_dir=tmp_path / "disk")) as pool:
        await pool.register("acme/good", str(adapters["r8-attn"]), tenant="acme")
        for path, reason in ((evil, "unsafe_path"), (linked, "symlink")):
            with pytest.raises(AdapterValidationError) as err:
                await pool.register("acme/bad", str(path), tenant="acme")
            assert err.value.reason == reason
            assert [a.adapter_id for a in pool.list_adapters(tenant="acme")] == ["acme/good"]
        assert not (tmp_path / ADAPTER_FILES[0]).exists()
        copies = [p for p in (tmp_path / "disk").iterdir() if p.is_dir() and p.name != ".tmp"]
        assert copies == []  # no adapter copy kept (the registry's file is there)
        assert [p for p in (tmp_path / "disk" / ".tmp").rglob("*")] == []


async def test_norm_outlier_among_comparable_registered_adapters_is_refused(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    db = tmp_path / "registry.sqlite"
    population = [
        scaled_copy(adapters["r8-attn"], tmp_path / f"p{i}", 0.8 + 0.06 * i) for i in range(8)
    ]
    async with make_pool(model_dir, registry=db) as pool:
        for i, path in enumerate(population):
            info = await pool.register(f"t{i}/support", str(path), tenant=f"t{i}")
            assert info.norm is not None and info.norm > 0
        # Seven comparable adapters are too few for the outlier test: accepted.
        loud = scaled_copy(adapters["r8-attn"], tmp_path / "loud", 30.0)
        await pool.unregister("t7/support", tenant="t7")
        assert (await pool.register("early/loud", str(loud), tenant="early")).norm
        await pool.unregister("early/loud", tenant="early")
        await pool.register("t7/support", str(population[7]), tenant="t7")

        # Eight: thirty times the population's norm is refused, and nothing changes.
        before = [a.adapter_id for a in pool.list_adapters(tenant="t0")]
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("evil/loud", str(loud), tenant="evil")
        assert err.value.reason == "norm_anomaly"
        assert "outlier" in str(err.value)
        assert pool.list_adapters(tenant="evil") == []
        assert [a.adapter_id for a in pool.list_adapters(tenant="t0")] == before

        # Another shape is not compared with this population.
        other = scaled_copy(adapters["r16-all"], tmp_path / "other", 30.0)
        await pool.register("evil/other-shape", str(other), tenant="evil")
        # A quiet one inside the spread is fine, and force accepts the loud one.
        await pool.register("t8/support", str(population[3]), tenant="t8")
        assert (await pool.register("evil/loud", str(loud), tenant="evil", force=True)).norm

    # The norms are durable: the reopened registry still refuses the outlier.
    registry = Registry.open(db)
    try:
        norms = {i.adapter_id: i.norm for i in registry.visible(None)}
        assert all(n is not None for n in norms.values())
    finally:
        registry.close()
    async with make_pool(model_dir, registry=db) as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("evil/loud2", str(loud), tenant="evil")
        assert err.value.reason == "norm_anomaly"


async def test_stamped_adapter_registers_on_its_base_and_is_refused_on_another(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good"
    shutil.copytree(adapters["r8-attn"], good)
    assert main(["stamp", str(good), "--base", str(model_dir)]) == 0
    assert str(good / SIDECAR_FILE) in capsys.readouterr().out
    stamp = json.loads((good / SIDECAR_FILE).read_text())
    real = BaseModelSpec.from_dir(model_dir)
    assert stamp["base_fingerprint"] == real.fingerprint
    assert stamp["tokenizer_sha256"] == real.tokenizer_sha256

    # Twins of the base with identical module names and shapes: one with another RoPE
    # base (another model), one with another tokenizer.
    twin_dir, tok_dir = tmp_path / "twin", tmp_path / "tok"
    shutil.copytree(model_dir, twin_dir)
    shutil.copytree(model_dir, tok_dir)
    cfg = json.loads((twin_dir / "config.json").read_text())
    if "rope_parameters" in cfg:
        cfg["rope_parameters"]["rope_theta"] *= 2
    else:
        cfg["rope_theta"] = float(cfg.get("rope_theta", 10000.0)) * 2
    (twin_dir / "config.json").write_text(json.dumps(cfg))
    tokenizer = json.loads((tok_dir / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [
        *tokenizer.get("added_tokens", []),
        {"id": 99999, "content": "<x>"},
    ]
    (tok_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    foreign, retok = tmp_path / "foreign", tmp_path / "retok"
    shutil.copytree(adapters["r8-attn"], foreign)
    shutil.copytree(adapters["r8-attn"], retok)
    stamp_adapter(foreign, BaseModelSpec.from_dir(twin_dir))
    stamp_adapter(retok, BaseModelSpec.from_dir(tok_dir))

    async with make_pool(model_dir) as pool:
        await pool.register("acme/good", str(good), tenant="acme")
        for path, reason in ((foreign, "base_mismatch"), (retok, "tokenizer_mismatch")):
            with pytest.raises(AdapterValidationError) as err:
                await pool.register("acme/foreign", str(path), tenant="acme")
            assert err.value.reason == reason
            assert [a.adapter_id for a in pool.list_adapters(tenant="acme")] == ["acme/good"]
    assert main(["validate", str(foreign), "--base", str(model_dir)]) == 1
    assert "[base_mismatch]" in capsys.readouterr().out
