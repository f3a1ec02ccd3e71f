"""Signed adapter manifests: keys, the keyring, the policy, signing and verifying a
directory or a stored manifest against bytes. Every refusal names its reason."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lorapool.__main__ import main
from lorapool.errors import SignatureError
from lorapool.formats import SIDECAR_FILE, sha256_of_files
from lorapool.signing import (
    SIGNATURE_FILE,
    Keyring,
    SignedManifest,
    SigningPolicy,
    generate_key,
    key_id_of,
    load_private_key,
    peft_config_digest,
    read_signature,
    sign_directory,
    sign_manifest,
    verify_directory,
    verify_files,
    write_key_pair,
)

CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


def _adapter(root: Path, name: str = "a", weights: bytes = b"\x01" * 4096) -> Path:
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(CONFIG, indent=2))
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def _refused(reason: str, call: object, *args: object, **kwargs: object) -> SignatureError:
    with pytest.raises(SignatureError) as err:
        call(*args, **kwargs)  # type: ignore[operator]
    assert err.value.reason == reason, str(err.value)
    return err.value


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return generate_key()


@pytest.fixture
def ring(key: Ed25519PrivateKey) -> Keyring:
    ring = Keyring()
    ring.add(key.public_key(), key_id="platform-1")
    return ring


def test_signed_directory_verifies_and_the_manifest_says_what_was_signed(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    signed = sign_directory(d, key, key_id="platform-1")
    assert (d / SIGNATURE_FILE).is_file()
    got = verify_directory(d, ring, tenant="acme", adapter="acme/a")
    assert got is not None and got.key_id == "platform-1"
    assert got.adapter_sha256 == sha256_of_files(d)
    weights = (d / "adapter_model.safetensors").read_bytes()
    assert got.files["adapter_model.safetensors"][1] == len(weights)
    assert set(got.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert got.base_fingerprint is None and got.tokenizer_sha256 is None
    assert got.text() == signed.text() == (d / SIGNATURE_FILE).read_text().strip()
    # the config digest is of what the config says, not of its whitespace
    compact = json.dumps(CONFIG, separators=(",", ":")).encode()
    assert got.manifest["peft_config_sha256"] == peft_config_digest(compact)


def test_stamped_adapter_signs_its_base_model_and_the_stamp_cannot_change(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    stamp = {"base_model": "m", "base_fingerprint": "f" * 64, "tokenizer_sha256": "t" * 64}
    (d / SIDECAR_FILE).write_text(json.dumps(stamp))
    sign_directory(d, key, key_id="platform-1")
    signed = verify_directory(d, ring, tenant="acme", adapter="a")
    assert signed is not None
    assert signed.base_fingerprint == "f" * 64 and signed.tokenizer_sha256 == "t" * 64
    assert SIDECAR_FILE in signed.files
    (d / SIDECAR_FILE).write_text(json.dumps({**stamp, "base_fingerprint": "e" * 64}))
    _refused("manifest_mismatch", verify_directory, d, ring, tenant="acme", adapter="a")
    (d / SIDECAR_FILE).unlink()
    _refused("manifest_mismatch", verify_directory, d, ring, tenant="acme", adapter="a")
    # a stamp added after signing changes the declared base: refused too
    e = _adapter(tmp_path, "e")
    sign_directory(e, key, key_id="platform-1")
    (e / SIDECAR_FILE).write_text(json.dumps(stamp))
    err = _refused("manifest_mismatch", verify_directory, e, ring, tenant="acme", adapter="e")
    assert "added after signing" in err.detail


def test_unsigned_is_missing_under_required_and_accepted_under_optional(
    tmp_path: Path, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    err = _refused("missing", verify_directory, d, ring, tenant="acme", adapter="acme/a")
    assert err.adapter == "acme/a" and "acme" in err.detail
    assert verify_directory(d, ring, tenant="acme", adapter="a", policy="optional") is None
    assert verify_files(None, {}, ring, tenant="acme", adapter="a", policy="optional") is None
    _refused("missing", verify_files, None, {}, ring, tenant="acme", adapter="a")


def test_present_but_bad_signatures_are_refused_under_optional_too(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    sign_directory(d, generate_key(), key_id="stranger")
    _refused("unknown_key", verify_directory, d, ring, tenant="t", adapter="a", policy="optional")
    # the manifest edited after signing: the signature no longer verifies
    sign_directory(d, key, key_id="platform-1")
    envelope = json.loads((d / SIGNATURE_FILE).read_text())
    envelope["manifest"]["files"]["adapter_model.safetensors"]["size"] += 1
    (d / SIGNATURE_FILE).write_text(json.dumps(envelope))
    _refused("bad_signature", verify_directory, d, ring, tenant="t", adapter="a", policy="optional")
    # signed by a key that claims the id of a trusted one
    sign_directory(d, generate_key(), key_id="platform-1")
    _refused("bad_signature", verify_directory, d, ring, tenant="t", adapter="a")


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json",
        b"[" * 100_000,
        b"{}",
        json.dumps({"format": "lorapool-signature/1", "manifest": {}, "signature": "x"}).encode(),
        b" " * (1024 * 1024 + 1),
    ],
    ids=["not-json", "deep", "empty", "no-fields", "oversized"],
)
def test_malformed_signature_files_are_bad_signatures(
    tmp_path: Path, ring: Keyring, garbage: bytes
) -> None:
    d = _adapter(tmp_path)
    (d / SIGNATURE_FILE).write_bytes(garbage)
    _refused("bad_signature", verify_directory, d, ring, tenant="t", adapter="a")


def test_envelope_key_id_must_be_the_signed_one(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    sign_directory(d, key, key_id="platform-1")
    envelope = json.loads((d / SIGNATURE_FILE).read_text())
    envelope["key_id"] = "other"
    (d / SIGNATURE_FILE).write_text(json.dumps(envelope))
    _refused("bad_signature", verify_directory, d, ring, tenant="t", adapter="a")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/dev/zero", "extra.bin"])
def test_a_signed_manifest_naming_other_files_is_refused_before_anything_is_read(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring, name: str
) -> None:
    """A tenant's own key may sign any manifest: one listing a path outside the adapter
    (or a device that never ends) must be refused unread, not hashed."""
    d = _adapter(tmp_path)
    signed = sign_directory(d, key, key_id="platform-1", write=False)
    manifest = json.loads(json.dumps(dict(signed.manifest)))
    manifest["files"][name] = {"sha256": "0" * 64, "size": 1}
    forged = sign_manifest(manifest, key)
    (d / SIGNATURE_FILE).write_text(forged.text())
    error = _refused("bad_signature", verify_directory, d, ring, tenant="t", adapter="a")
    assert name in str(error)


def test_flipped_byte_edited_config_and_another_adapters_manifest_are_mismatches(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    sign_directory(d, key, key_id="platform-1")
    weights = bytearray((d / "adapter_model.safetensors").read_bytes())
    weights[100] ^= 0x01
    (d / "adapter_model.safetensors").write_bytes(bytes(weights))
    err = _refused("manifest_mismatch", verify_directory, d, ring, tenant="t", adapter="a")
    assert "adapter_model.safetensors" in err.detail

    c = _adapter(tmp_path, "c")
    sign_directory(c, key, key_id="platform-1")
    (c / "adapter_config.json").write_text(json.dumps({**CONFIG, "r": 16}))
    err = _refused("manifest_mismatch", verify_directory, c, ring, tenant="t", adapter="c")
    assert "adapter_config.json" in err.detail

    other = _adapter(tmp_path, "other", weights=b"\x02" * 4096)
    sign_directory(other, key, key_id="platform-1")
    mine = _adapter(tmp_path, "mine")
    shutil.copy(other / SIGNATURE_FILE, mine / SIGNATURE_FILE)
    _refused("manifest_mismatch", verify_directory, mine, ring, tenant="t", adapter="mine")
    # and a signed file that is gone
    os.unlink(other / "adapter_model.safetensors")
    _refused("manifest_mismatch", verify_directory, other, ring, tenant="t", adapter="o")


def test_the_content_sha256_must_be_the_registered_one(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    sign_directory(d, key, key_id="platform-1")
    ok = verify_directory(d, ring, tenant="t", adapter="a", adapter_sha256=sha256_of_files(d))
    assert ok is not None
    _refused(
        "manifest_mismatch",
        verify_directory,
        d,
        ring,
        tenant="t",
        adapter="a",
        adapter_sha256="0" * 64,
    )


def test_stored_manifest_against_bytes_under_the_keyring_of_now(
    tmp_path: Path, key: Ed25519PrivateKey, ring: Keyring
) -> None:
    d = _adapter(tmp_path)
    text = sign_directory(d, key, key_id="platform-1").text()
    files = {n: (d / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    sha = sha256_of_files(d)
    got = verify_files(text, files, ring, tenant="t", adapter="a", adapter_sha256=sha)
    assert got is not None and got.key_id == "platform-1"
    flipped = dict(files)
    flipped["adapter_model.safetensors"] = b"\x00" + files["adapter_model.safetensors"][1:]
    _refused("manifest_mismatch", verify_files, text, flipped, ring, tenant="t", adapter="a")
    truncated = {**files, "adapter_model.safetensors": files["adapter_model.safetensors"][:10]}
    _refused("manifest_mismatch", verify_files, text, truncated, ring, tenant="t", adapter="a")
    _refused(
        "manifest_mismatch", verify_files, text, {"extra.bin": b""}, ring, tenant="t", adapter="a"
    )
    # The store already hashed the files to their content digest: that digest must be the
    # signed one (the weights are not hashed again), and a wrong one is refused.
    checked = verify_files(text, files, ring, tenant="t", adapter="a", content_sha256=sha)
    assert checked is not None
    _refused(
        "manifest_mismatch",
        verify_files,
        text,
        files,
        ring,
        tenant="t",
        adapter="a",
        content_sha256="0" * 64,
    )
    ring.revoke("platform-1")
    _refused("revoked_key", verify_files, text, files, ring, tenant="t", adapter="a")
    _refused(
        "revoked_key", verify_files, text, files, ring, tenant="t", adapter="a", content_sha256=sha
    )


def test_tenant_keys_sign_only_their_tenants_adapters(tmp_path: Path) -> None:
    acme_key, platform_key = generate_key(), generate_key()
    ring = Keyring()
    ring.add(acme_key.public_key(), key_id="acme-1", tenant="acme")
    ring.add(platform_key.public_key(), key_id="platform-1")
    d = _adapter(tmp_path)
    sign_directory(d, acme_key, key_id="acme-1")
    assert verify_directory(d, ring, tenant="acme", adapter="a") is not None
    _refused("unknown_key", verify_directory, d, ring, tenant="globex", adapter="a")
    sign_directory(d, platform_key, key_id="platform-1")
    for tenant in ("acme", "globex"):
        assert verify_directory(d, ring, tenant=tenant, adapter="a") is not None
    assert ring.key_ids("acme") == ["acme-1", "platform-1"]
    assert ring.key_ids() == ["platform-1"]


def test_a_revoked_key_is_refused_under_every_id_it_is_trusted_by(tmp_path: Path) -> None:
    """One key trusted as "platform-1" and by its fingerprint: revoking either name must
    stop both, whichever came first (revoked ids given before the key was added too)."""
    key = generate_key()
    d = _adapter(tmp_path)
    sign_directory(d, key)  # signed under its fingerprint id
    ring = Keyring()
    ring.add(key.public_key(), key_id="platform-1")
    ring.add(key.public_key())  # the fingerprint id
    assert verify_directory(d, ring, tenant="t", adapter="a") is not None
    ring.revoke("platform-1")
    _refused("revoked_key", verify_directory, d, ring, tenant="t", adapter="a")
    assert ring.key_ids() == []
    early = Keyring(revoked=["platform-1"])
    early.add(key.public_key(), key_id="platform-1")
    early.add(key.public_key())
    _refused("revoked_key", verify_directory, d, early, tenant="t", adapter="a")
    merged = Keyring()
    merged.extend(ring)
    _refused("revoked_key", verify_directory, d, merged, tenant="t", adapter="a")


def test_rotation_two_active_keys_then_one_revoked(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    ring = Keyring()
    ring.add(old.public_key(), key_id="k-2025")
    ring.add(new.public_key(), key_id="k-2026")
    a, b = _adapter(tmp_path, "a"), _adapter(tmp_path, "b")
    sign_directory(a, old, key_id="k-2025")
    sign_directory(b, new, key_id="k-2026")
    assert verify_directory(a, ring, tenant="t", adapter="a") is not None
    assert verify_directory(b, ring, tenant="t", adapter="b") is not None
    ring.revoke("k-2025")
    assert "k-2025" in ring and "k-2025" in ring.revoked  # known, and refused all the same
    err = _refused("revoked_key", verify_directory, a, ring, tenant="t", adapter="a")
    assert "k-2025" in err.detail
    assert verify_directory(b, ring, tenant="t", adapter="b") is not None
    ring.remove("k-2026")
    _refused("unknown_key", verify_directory, b, ring, tenant="t", adapter="b")


def test_key_files_round_trip_and_are_never_overwritten(tmp_path: Path) -> None:
    private, public, key_id = write_key_pair(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert key_id == key_id_of(key.public_key()) and key_id.startswith("ed25519:")
    assert private.name == key_id.replace(":", "-") + ".key"
    with pytest.raises(FileExistsError):
        write_key_pair(tmp_path / "keys", key_id=key_id, key=key)
    ring = Keyring.load(public)
    assert ring.key_ids() == [key_id]
    assert Keyring.load(public, key_id="named").key_ids() == ["named"]
    with pytest.raises(ValueError):
        load_private_key(public)
    with pytest.raises(ValueError, match="bad key id"):
        write_key_pair(tmp_path / "other", key_id="no spaces please")


def test_keyring_file(tmp_path: Path) -> None:
    a, b = generate_key(), generate_key()
    _, b_pub, _ = write_key_pair(tmp_path, key_id="acme-1", key=b)
    raw = a.public_key().public_bytes_raw()
    data = {
        "keys": [
            {"key_id": "platform-1", "public_key": base64.b64encode(raw).decode()},
            {"key_id": "acme-1", "public_key_file": b_pub.name, "tenant": "acme"},
        ],
        "revoked": ["platform-0"],
    }
    path = tmp_path / "keyring.json"
    path.write_text(json.dumps(data))
    ring = Keyring.load(path)
    assert ring.key_ids("acme") == ["acme-1", "platform-1"]
    assert ring.revoked == frozenset({"platform-0"})
    bad: Any
    for bad in (
        {"keys": [{"key_id": "x"}]},
        {"keys": [{"public_key": "bm90IGEga2V5"}]},
        {"keys": [], "trusted": []},
        {"revoked": "platform-0"},
        {"keys": [{"public_key_file": "missing.pub"}]},
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            Keyring.load(path)
    ring = Keyring()
    ring.add(a.public_key(), key_id="k")
    with pytest.raises(ValueError, match="already names another key"):
        ring.add(b.public_key(), key_id="k")


def test_signing_policy() -> None:
    policy = SigningPolicy.of({"acme": "required"})
    assert policy.for_tenant("acme") == "required" and policy.for_tenant("other") == "optional"
    assert SigningPolicy.of("required").for_tenant("x") == "required"
    assert SigningPolicy.of(None).for_tenant("x") == "optional"
    policy.set("other", "required")
    assert policy.for_tenant("other") == "required"
    with pytest.raises(ValueError):
        SigningPolicy("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        policy.set("x", "never")  # type: ignore[arg-type]


def test_parse_refuses_what_it_cannot_read(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    d = _adapter(tmp_path)
    assert read_signature(d, adapter="a") is None
    text = sign_directory(d, key, write=False).text()
    assert not (d / SIGNATURE_FILE).exists()
    assert SignedManifest.parse(text, adapter="a").text() == text
    broken = json.loads(text)
    broken["manifest"]["adapter_sha256"] = "xyz"
    with pytest.raises(SignatureError) as err:
        SignedManifest.parse(json.dumps(broken), adapter="a")
    assert err.value.reason == "bad_signature"


def test_cli_keygen_sign_verify_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _adapter(tmp_path)
    assert main(["keygen", "--out", str(tmp_path / "keys"), "--key-id", "p1"]) == 0
    assert main(["verify", str(d), "--keyring", str(tmp_path / "keys/p1.pub")]) == 1
    assert "missing" in capsys.readouterr().out
    assert main(["sign", str(d), "--key", str(tmp_path / "keys/p1.key"), "--key-id", "p1"]) == 0
    pub = str(tmp_path / "keys/p1.pub")
    assert main(["verify", str(d), "--keyring", pub, "--key-id", "p1"]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    assert main(["verify", str(d), "--keyring", pub]) == 1  # its fingerprint is another id
    assert "unknown_key" in capsys.readouterr().out
    assert main(["verify", str(d), "--keyring", str(tmp_path / "nope.pub")]) == 2
    assert main(["sign", str(tmp_path / "nodir"), "--key", str(tmp_path / "keys/p1.key")]) == 2
    assert main(["sign", str(d), "--key", pub]) == 2  # a public key cannot sign


def test_server_signing_config(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    from lorapool.server.config import ServerConfig, SigningConfig

    a, b = generate_key(), generate_key()
    _, a_pub, a_id = write_key_pair(tmp_path, key=a)
    ring_file = tmp_path / "keyring.json"
    b_pem = (
        write_key_pair(tmp_path / "b", key_id="acme-1", key=b)[1].read_text().replace("\n", "\\n")
    )
    ring_file.write_text(
        '{"keys": [{"key_id": "acme-1", "tenant": "acme", "public_key": "' + b_pem + '"}]}'
    )
    config = ServerConfig(
        signing={  # type: ignore[arg-type]
            "keyrings": [str(a_pub), str(ring_file)],
            "revoked": ["platform-0"],
            "tenants": {"acme": "required"},
        }
    )
    ring = config.signing.build_keyring()
    assert ring is not None
    assert ring.key_ids("acme") == sorted([a_id, "acme-1"])
    assert ring.revoked == frozenset({"platform-0"})
    policy = config.signing.build_policy()
    assert policy.for_tenant("acme") == "required" and policy.for_tenant("x") == "optional"
    assert SigningConfig().build_keyring() is None
    with pytest.raises(ValueError, match="needs keyrings"):
        SigningConfig(default="required")
    with pytest.raises(ValueError, match="keyring"):
        SigningConfig(keyrings=[str(tmp_path / "missing.json")])
