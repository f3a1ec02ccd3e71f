"""Signed adapters on the real model: a signed adapter registers and serves; unsigned
(policy required), unknown key, revoked key, a flipped byte, another adapter's manifest,
and a file replaced after registration are refused with their reason while nothing
changes and another tenant's request goes on; keys rotate; the CLI's exit codes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.errors import SignatureError
from lorapool.signing import (
    SIGNATURE_FILE,
    Keyring,
    SignedManifest,
    generate_key,
    sign_directory,
)

from .servers import CREDENTIALS, CountingMotoServer, upload

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

WEIGHTS = "adapter_model.safetensors"
PARAMS = SamplingParams(max_tokens=8, temperature=0.0)


class Keys:
    """The platform's key, a revoked one, acme's own, and a stranger's."""

    def __init__(self) -> None:
        self.platform = generate_key()
        self.old = generate_key()
        self.acme = generate_key()
        self.stranger = generate_key()
        self.ring = Keyring()
        self.ring.add(self.platform.public_key(), key_id="platform-1")
        self.ring.add(self.old.public_key(), key_id="platform-0")
        self.ring.add(self.acme.public_key(), key_id="acme-1", tenant="acme")
        self.ring.revoke("platform-0")


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _flip_tensor_byte(d: Path) -> None:
    """Flip one bit of the last tensor's data (same size, still a valid safetensors file)."""
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-3] ^= 0x01
    (d / WEIGHTS).write_bytes(bytes(data))


def _backend(model_dir: Path) -> Any:
    from lorapool.backends.torch import TorchBackend

    return TorchBackend(model_dir, max_slots=4, max_rank=32, max_batch=4, max_seq_len=256)


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
async def pool(model_dir: Path, keys: Keys) -> AsyncIterator[AdapterPool]:
    async with AdapterPool(
        _backend(model_dir), keyring=keys.ring, signing={"acme": "required"}
    ) as p:
        yield p


async def _long_request(pool: AdapterPool, chunks: list[str]) -> int:
    n = 0
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    async for chunk in pool.generate(
        "Write a long story.", adapter="other/good", tenant="other", params=params
    ):
        chunks.append(chunk.text)
        n += len(chunk.token_ids)
    return n


async def test_signed_adapter_registers_and_serves(
    pool: AdapterPool, keys: Keys, adapters: dict[str, Path], tmp_path: Path
) -> None:
    d = _copy(adapters["r8-attn"], tmp_path / "support")
    sign_directory(d, keys.acme, key_id="acme-1")
    info = await pool.register("support", str(d), tenant="acme")
    assert info.metadata.signer == "acme-1"
    assert info.signature is not None
    manifest = SignedManifest.parse(info.signature, adapter=info.adapter_id)
    assert manifest.adapter_sha256 == info.sha256 and manifest.key_id == "acme-1"
    listed = pool.list_adapters(tenant="acme")
    assert [(a.adapter_id, a.metadata.signer) for a in listed] == [("acme/support", "acme-1")]
    done = await pool.complete("Hello there", adapter="support", tenant="acme", params=PARAMS)
    assert done.served_by == "adapter" and done.usage.completion_tokens > 0
    assert pool.store.on_device("acme/support")
    # the same bytes without a signature answer the same: the signature changes nothing served
    plain = _copy(adapters["r8-attn"], tmp_path / "plain")
    await pool.register("plain", str(plain), tenant="other")  # optional for "other"
    again = await pool.complete("Hello there", adapter="plain", tenant="other", params=PARAMS)
    assert again.text == done.text
    assert pool.list_adapters(tenant="other")[0].signature is None
    assert [e.action for e in pool.audit.entries() if e.action == "signature_refused"] == []


async def test_each_bad_signature_is_refused_and_nothing_changes(
    pool: AdapterPool, keys: Keys, adapters: dict[str, Path], tmp_path: Path
) -> None:
    await pool.register("good", str(adapters["r8-attn"]), tenant="other")
    other = _copy(adapters["r16-all"], tmp_path / "other-adapter")
    sign_directory(other, keys.platform, key_id="platform-1")

    def unsigned(d: Path) -> None:
        pass

    def unknown(d: Path) -> None:
        sign_directory(d, keys.stranger, key_id="stranger-1")

    def revoked(d: Path) -> None:
        sign_directory(d, keys.old, key_id="platform-0")

    def flipped(d: Path) -> None:
        sign_directory(d, keys.platform, key_id="platform-1")
        _flip_tensor_byte(d)

    def borrowed(d: Path) -> None:
        shutil.copy(other / SIGNATURE_FILE, d / SIGNATURE_FILE)

    def other_tenants_key(d: Path) -> None:  # acme's key on globex's adapter
        sign_directory(d, keys.acme, key_id="acme-1")

    cases = [
        ("unsigned", unsigned, "acme", "missing"),
        ("unknown-key", unknown, "acme", "unknown_key"),
        ("revoked-key", revoked, "acme", "revoked_key"),
        ("flipped-byte", flipped, "acme", "manifest_mismatch"),
        ("other-manifest", borrowed, "acme", "manifest_mismatch"),
        # under "optional" a present but bad signature is refused all the same
        ("optional-flipped", flipped, "globex", "manifest_mismatch"),
        ("optional-foreign-key", other_tenants_key, "globex", "unknown_key"),
    ]
    chunks: list[str] = []
    running = asyncio.create_task(_long_request(pool, chunks))
    while not chunks:
        await asyncio.sleep(0.01)
    registered = {a.adapter_id for a in pool.registry.visible(None)}
    resident = dict(pool.store.resident)
    for name, mutate, tenant, reason in cases:
        d = _copy(adapters["r8-attn"], tmp_path / name)
        mutate(d)
        with pytest.raises(SignatureError) as err:
            await pool.register(name, str(d), tenant=tenant)
        assert err.value.reason == reason, (name, str(err.value))
        assert err.value.adapter == f"{tenant}/{name}"
        assert {a.adapter_id for a in pool.registry.visible(None)} == registered, name
        assert pool.list_adapters(tenant=tenant) == []
        assert pool.store.resident == resident
        last = pool.audit.entries()[-1]
        assert (last.action, last.tenant, last.adapter) == (
            "signature_refused",
            tenant,
            f"{tenant}/{name}",
        )
        assert last.detail["reason"] == reason and last.detail["at"] == "register"
    assert not running.done(), "make the other tenant's request longer"
    assert await running == 64
    # what was refused leaves no copy behind: the staging area is empty
    assert pool.store.disk_dir is not None
    assert list((pool.store.disk_dir / ".tmp").iterdir()) == []


async def test_file_replaced_after_registration_is_refused_at_the_next_load(
    pool: AdapterPool, keys: Keys, adapters: dict[str, Path], tmp_path: Path
) -> None:
    await pool.register("good", str(adapters["r32-attn"]), tenant="other")
    d = _copy(adapters["r8-attn"], tmp_path / "support")
    sign_directory(d, keys.platform, key_id="platform-1")
    await pool.register("support", str(d), tenant="acme")
    first = await pool.complete("Hi", adapter="support", tenant="acme", params=PARAMS)
    assert first.served_by == "adapter"
    # replaced on disk by a file of the same size whose tensors differ
    _flip_tensor_byte(d)
    # still resident: what was verified keeps serving until the bytes are read again
    await pool.unload("support", tenant="acme")
    assert not pool.store.on_host("acme/support") and not pool.store.on_device("acme/support")
    registered = [(a.adapter_id, a.sha256) for a in pool.registry.visible(None)]
    resident = dict(pool.store.resident)
    chunks: list[str] = []
    running = asyncio.create_task(_long_request(pool, chunks))
    with pytest.raises(SignatureError) as err:
        await pool.complete("Hi", adapter="support", tenant="acme", params=PARAMS)
    assert err.value.reason == "manifest_mismatch", str(err.value)
    assert WEIGHTS in err.value.detail
    assert await running == 64  # the other tenant's request went on
    assert [(a.adapter_id, a.sha256) for a in pool.registry.visible(None)] == registered
    assert {k: v for k, v in pool.store.resident.items() if k != "other/good"} == {
        k: v for k, v in resident.items() if k != "other/good"
    }
    assert not pool.store.on_host("acme/support") and not pool.store.on_device("acme/support")
    last = [e for e in pool.audit.entries() if e.action == "signature_refused"][-1]
    assert last.detail["at"] == "load" and last.detail["reason"] == "manifest_mismatch"
    # a file of another size is caught the same way
    (d / WEIGHTS).write_bytes((adapters["r16-all"] / WEIGHTS).read_bytes())
    with pytest.raises(SignatureError) as err:
        await pool.complete("Hi", adapter="support", tenant="acme", params=PARAMS)
    assert err.value.reason == "manifest_mismatch"
    # put back, it serves again: the refusal changed nothing
    shutil.copy(adapters["r8-attn"] / WEIGHTS, d / WEIGHTS)
    again = await pool.complete("Hi", adapter="support", tenant="acme", params=PARAMS)
    assert again.text == first.text


async def test_rotation_two_active_keys_then_one_revoked(
    pool: AdapterPool, keys: Keys, adapters: dict[str, Path], tmp_path: Path
) -> None:
    new = generate_key()
    keys.ring.add(new.public_key(), key_id="platform-2")
    a = _copy(adapters["r8-attn"], tmp_path / "a")
    b = _copy(adapters["r32-attn"], tmp_path / "b")
    sign_directory(a, keys.platform, key_id="platform-1")
    sign_directory(b, new, key_id="platform-2")
    await pool.register("a", str(a), tenant="acme")
    await pool.register("b", str(b), tenant="acme")
    for name in ("a", "b"):
        done = await pool.complete("Hi", adapter=name, tenant="acme", params=PARAMS)
        assert done.served_by == "adapter"
    keys.ring.revoke("platform-1")
    # resident copies were verified; the next read of the bytes applies the keyring of now
    for name in ("a", "b"):
        await pool.unload(name, tenant="acme")
    with pytest.raises(SignatureError) as err:
        await pool.complete("Hi", adapter="a", tenant="acme", params=PARAMS)
    assert err.value.reason == "revoked_key" and "platform-1" in err.value.detail
    done = await pool.complete("Hi", adapter="b", tenant="acme", params=PARAMS)
    assert done.served_by == "adapter"
    c = _copy(adapters["r16-all"], tmp_path / "c")
    sign_directory(c, keys.platform, key_id="platform-1")
    with pytest.raises(SignatureError) as err:
        await pool.register("c", str(c), tenant="acme")
    assert err.value.reason == "revoked_key"
    # a prefetch of the refused adapter fails quietly; the adapter stays registered
    assert await pool.prefetch("a", tenant="acme", tier="host", wait=True) is None
    assert "acme/a" in {i.adapter_id for i in pool.list_adapters(tenant="acme")}


async def test_signed_adapter_from_s3_is_verified_again_when_fetched_from_the_source(
    model_dir: Path,
    keys: Keys,
    adapters: dict[str, Path],
    tmp_path: Path,
    s3_server: CountingMotoServer,
) -> None:
    from lorapool.sources import S3Source

    d = _copy(adapters["r8-attn"], tmp_path / "remote")
    sign_directory(d, keys.platform, key_id="platform-1")
    await upload(s3_server, "adapters", "acme/remote", d)
    await _put(s3_server, f"acme/remote/{SIGNATURE_FILE}", (d / SIGNATURE_FILE).read_bytes())
    store = TieredStore(
        disk_dir=tmp_path / "disk",
        sources={"s3": S3Source(endpoint_url=s3_server.endpoint, **CREDENTIALS)},
    )
    async with AdapterPool(
        _backend(model_dir), store=store, keyring=keys.ring, signing="required"
    ) as pool:
        info = await pool.register("remote", "s3://adapters/acme/remote", tenant="acme")
        assert s3_server.gets(f"/adapters/acme/remote/{SIGNATURE_FILE}") == 1
        assert info.metadata.signer == "platform-1"
        done = await pool.complete("Hi", adapter="remote", tenant="acme", params=PARAMS)
        assert done.served_by == "adapter"
        # dropped from every tier: the next request fetches it from S3 and verifies it again
        await pool.store.unload("acme/remote", tiers=("device", "host", "disk"))
        keys.ring.revoke("platform-1")
        before = s3_server.gets(f"/adapters/acme/remote/{WEIGHTS}")
        with pytest.raises(SignatureError) as err:
            await pool.complete("Hi", adapter="remote", tenant="acme", params=PARAMS)
        assert err.value.reason == "revoked_key"
        assert s3_server.gets(f"/adapters/acme/remote/{WEIGHTS}") == before + 1
        assert [i.adapter_id for i in pool.list_adapters(tenant="acme")] == ["acme/remote"]


async def _put(server: CountingMotoServer, key: str, body: bytes) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=server.endpoint, **CREDENTIALS
    ) as client:
        await client.put_object(Bucket="adapters", Key=key, Body=body)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorapool", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_keygen_sign_verify(adapters: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(adapters["r8-attn"], tmp_path / "a")
    keys = tmp_path / "keys"
    made = _cli("keygen", "--out", str(keys), "--key-id", "platform-1")
    assert made.returncode == 0, made.stderr
    assert (keys / "platform-1.key").is_file() and (keys / "platform-1.pub").is_file()
    pub = str(keys / "platform-1.pub")
    unsigned = _cli("verify", str(d), "--keyring", pub, "--key-id", "platform-1")
    assert unsigned.returncode == 1 and "missing" in unsigned.stdout
    signed = _cli("sign", str(d), "--key", str(keys / "platform-1.key"), "--key-id", "platform-1")
    assert signed.returncode == 0, signed.stderr
    assert (d / SIGNATURE_FILE).is_file()
    ok = _cli("verify", str(d), "--keyring", pub, "--key-id", "platform-1")
    assert ok.returncode == 0 and "VERIFIED" in ok.stdout and "platform-1" in ok.stdout
    keyring = tmp_path / "keyring.json"
    keyring.write_text(
        '{"keys": [{"key_id": "platform-1", "public_key_file": "keys/platform-1.pub"}],'
        ' "revoked": []}'
    )
    assert _cli("verify", str(d), "--keyring", str(keyring)).returncode == 0
    keyring.write_text(keyring.read_text().replace('"revoked": []', '"revoked": ["platform-1"]'))
    revoked = _cli("verify", str(d), "--keyring", str(keyring))
    assert revoked.returncode == 1 and "revoked_key" in revoked.stdout
    _flip_tensor_byte(d)
    flipped = _cli("verify", str(d), "--keyring", pub, "--key-id", "platform-1")
    assert flipped.returncode == 1 and "manifest_mismatch" in flipped.stdout
    assert _cli("verify", str(d), "--keyring", str(tmp_path / "nope.pub")).returncode == 2
    assert _cli("sign", str(tmp_path / "nodir"), "--key", pub).returncode == 2
