"""The signed manifest of an adapter version, signing a directory and verifying one.

The manifest says what the signer vouched for::

    {"format": "lorapool-signature/1",
     "key_id": "ed25519:0123456789abcdef",
     "signed_at": 1796000000,
     "adapter_sha256": "<sha256_of_files: config and weights, each prefixed by its name>",
     "files": {"adapter_config.json": {"sha256": "...", "size": 712},
               "adapter_model.safetensors": {"sha256": "...", "size": 2228432},
               "lorapool.json": {"sha256": "...", "size": 180}},
     "peft_config_sha256": "<sha256 of adapter_config.json as canonical JSON>",
     "base_fingerprint": "<from lorapool.json, or null>",
     "tokenizer_sha256": "<from lorapool.json, or null>"}

``lorapool.json`` (the base-model stamp, ``lorapool stamp``) is covered when it is
present at signing; adding, removing or editing it afterwards is a mismatch. The
signature file :data:`SIGNATURE_FILE` in the adapter directory holds the manifest, the
key id again and the Ed25519 signature (base64) over the manifest's canonical JSON
(sorted keys, no spaces, ASCII): ``{"format", "manifest", "key_id", "signature"}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lorapool.errors import AdapterValidationError, SignatureError
from lorapool.formats import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    adapter_digest,
    read_capped,
    read_sidecar,
    sha256_of_files,
)
from lorapool.signing.keys import Keyring, Policy, check_key_id, key_id_of

__all__ = [
    "FORMAT",
    "SIGNATURE_FILE",
    "SignedManifest",
    "build_manifest",
    "canonical_json",
    "peft_config_digest",
    "read_signature",
    "sign_directory",
    "sign_manifest",
    "verify_directory",
    "verify_files",
]

_SIGNABLE = frozenset({CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE})
"""The only file names a manifest may list: the adapter's own files."""

SIGNATURE_FILE = "lorapool-signature.json"
"""The signed manifest's file in the adapter directory."""
FORMAT = "lorapool-signature/1"
"""The manifest format this module writes and reads."""

_CHUNK = 1 << 20
_HEX64 = frozenset("0123456789abcdef")


def canonical_json(value: Any) -> bytes:
    """The bytes that are signed: JSON with sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def peft_config_digest(config: bytes) -> str:
    """sha256 of ``adapter_config.json`` parsed and written as canonical JSON (what the
    config says, whatever its whitespace and key order). ``ValueError`` if not JSON."""
    try:
        parsed = json.loads(config)
    except RecursionError:
        raise ValueError(f"{CONFIG_FILE} nests too deeply") from None
    return hashlib.sha256(canonical_json(parsed)).hexdigest()


def _file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _read_config(path: Path) -> bytes:
    data = read_capped(path, MAX_CONFIG_BYTES)
    if data is None:
        raise ValueError(f"{path.name} is larger than {MAX_CONFIG_BYTES} bytes")
    return data


def build_manifest(
    directory: str | Path, *, key_id: str, signed_at: int | None = None
) -> dict[str, Any]:
    """The manifest of an adapter directory (see the module's docstring), not yet signed.

    ``OSError`` when a file is missing; ``ValueError`` when the config is not JSON or
    ``lorapool.json`` is malformed.
    """
    d = Path(directory).expanduser()
    names = [CONFIG_FILE, WEIGHTS_FILE] + ([SIDECAR_FILE] if (d / SIDECAR_FILE).exists() else [])
    files: dict[str, dict[str, Any]] = {}
    for name in names:
        sha, size = _file_digest(d / name)
        files[name] = {"sha256": sha, "size": size}
    base: dict[str, str] = {}
    if SIDECAR_FILE in files:
        try:
            base, problems = read_sidecar(d / SIDECAR_FILE)
        except AdapterValidationError as exc:
            raise ValueError(exc.detail) from None
        if problems:
            raise ValueError(problems[0].detail)
    return {
        "format": FORMAT,
        "key_id": check_key_id(key_id),
        "signed_at": int(time.time()) if signed_at is None else signed_at,
        "adapter_sha256": sha256_of_files(d),
        "files": files,
        "peft_config_sha256": peft_config_digest(_read_config(d / CONFIG_FILE)),
        "base_fingerprint": base.get("base_fingerprint"),
        "tokenizer_sha256": base.get("tokenizer_sha256"),
    }


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with its signer's key id and Ed25519 signature.

    :meth:`text` is what the signature file holds and what the registry keeps
    (``AdapterInfo.signature``); :meth:`parse` reads it back, refusing anything
    malformed as ``bad_signature``.
    """

    manifest: Mapping[str, Any]
    signature: bytes

    @property
    def key_id(self) -> str:
        """The signer's key id."""
        return str(self.manifest["key_id"])

    @property
    def adapter_sha256(self) -> str:
        """The adapter's content sha256 as lorapool computes it (config and weights)."""
        return str(self.manifest["adapter_sha256"])

    @property
    def files(self) -> dict[str, tuple[str, int]]:
        """``{file name: (sha256, size)}`` of every signed file."""
        files = cast("Mapping[str, Mapping[str, Any]]", self.manifest["files"])
        return {name: (str(f["sha256"]), int(f["size"])) for name, f in files.items()}

    @property
    def base_fingerprint(self) -> str | None:
        """The base model's fingerprint the adapter was stamped with (``None``: unstamped)."""
        value = self.manifest.get("base_fingerprint")
        return None if value is None else str(value)

    @property
    def tokenizer_sha256(self) -> str | None:
        """The tokenizer hash the adapter was stamped with (``None``: none)."""
        value = self.manifest.get("tokenizer_sha256")
        return None if value is None else str(value)

    def text(self) -> str:
        """The signature file's content (canonical JSON)."""
        return canonical_json(
            {
                "format": FORMAT,
                "manifest": dict(self.manifest),
                "key_id": self.key_id,
                "signature": base64.b64encode(self.signature).decode(),
            }
        ).decode()

    @classmethod
    def parse(cls, text: str | bytes, *, adapter: str) -> SignedManifest:
        """Read a signature file's content; ``SignatureError`` (``bad_signature``) naming
        what is malformed. Says nothing of whether the signature verifies (:meth:`verify`)."""

        def bad(detail: str) -> SignatureError:
            return SignatureError(adapter, "bad_signature", f"{SIGNATURE_FILE}: {detail}")

        try:
            envelope = json.loads(text)
        except (ValueError, RecursionError):
            raise bad("not JSON") from None
        if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} signature")
        manifest, key_id, sig = (envelope.get(k) for k in ("manifest", "key_id", "signature"))
        if not isinstance(manifest, dict) or not isinstance(sig, str):
            raise bad("no manifest or no signature")
        if manifest.get("format") != FORMAT or manifest.get("key_id") != key_id:
            raise bad("the manifest's format or key id differs from the envelope's")
        try:
            check_key_id(str(key_id))
            signature = base64.b64decode(sig, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise bad(str(exc)) from None
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(f, dict) and _is_sha(f.get("sha256")) and _is_size(f.get("size"))
            for f in files.values()
        ):
            raise bad("files must map names to {sha256, size}")
        unknown = sorted(set(files) - _SIGNABLE)
        if unknown or not {CONFIG_FILE, WEIGHTS_FILE} <= set(files):
            # Only an adapter's own files: a name is joined to the adapter directory when
            # verifying, so "../x" or "/dev/zero" would read outside it.
            raise bad(
                f"files must name {CONFIG_FILE}, {WEIGHTS_FILE} and optionally "
                f"{SIDECAR_FILE}, nothing else (got {unknown or sorted(files)})"
            )
        if not _is_sha(manifest.get("adapter_sha256")) or not _is_sha(
            manifest.get("peft_config_sha256")
        ):
            raise bad("adapter_sha256 and peft_config_sha256 must be sha256 hex digests")
        for name in ("base_fingerprint", "tokenizer_sha256"):
            if not isinstance(manifest.get(name), (str, type(None))):
                raise bad(f"{name} must be a string or null")
        return cls(manifest, signature)

    def verify(self, keyring: Keyring, *, tenant: str, adapter: str) -> None:
        """Check the signature under the keyring's key for ``tenant`` (``unknown_key``,
        ``revoked_key``, ``bad_signature``). Says nothing of the files (:func:`verify_files`)."""
        key = keyring.public_key(self.key_id, tenant=tenant, adapter=adapter)
        try:
            key.verify(self.signature, canonical_json(dict(self.manifest)))
        except InvalidSignature:
            raise SignatureError(
                adapter,
                "bad_signature",
                f"the manifest does not verify under key {self.key_id!r}",
            ) from None


def _is_sha(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sign_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> SignedManifest:
    """Sign a manifest (:func:`build_manifest`) with ``key``."""
    return SignedManifest(dict(manifest), key.sign(canonical_json(dict(manifest))))


def sign_directory(
    directory: str | Path,
    key: Ed25519PrivateKey,
    *,
    key_id: str | None = None,
    write: bool = True,
) -> SignedManifest:
    """Sign an adapter directory with ``key`` under ``key_id`` (default: the key's
    fingerprint, :func:`~lorapool.signing.key_id_of`); with ``write``, write
    :data:`SIGNATURE_FILE` into it (replacing an earlier signature)."""
    d = Path(directory).expanduser()
    key_id = key_id_of(key.public_key()) if key_id is None else key_id
    signed = sign_manifest(build_manifest(d, key_id=key_id), key)
    if write:
        tmp = d / f".{SIGNATURE_FILE}.tmp"
        tmp.write_text(signed.text() + "\n")
        tmp.replace(d / SIGNATURE_FILE)
    return signed


def read_signature(directory: str | Path, *, adapter: str) -> SignedManifest | None:
    """The signature file of an adapter directory, parsed (``None`` when there is none).

    Read under the config cap; a larger or malformed file is ``bad_signature``.
    """
    path = Path(directory).expanduser() / SIGNATURE_FILE
    if not path.exists():
        return None
    try:
        data = read_capped(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise SignatureError(
            adapter, "bad_signature", f"cannot read {SIGNATURE_FILE}: {exc}"
        ) from None
    if data is None:
        raise SignatureError(
            adapter, "bad_signature", f"{SIGNATURE_FILE} is larger than {MAX_CONFIG_BYTES} bytes"
        )
    return SignedManifest.parse(data, adapter=adapter)


def _unsigned(adapter: str, policy: Policy, tenant: str) -> None:
    if policy == "required":
        raise SignatureError(
            adapter, "missing", f"tenant {tenant!r} requires signed adapters; no {SIGNATURE_FILE}"
        )


def _mismatch(adapter: str, detail: str) -> SignatureError:
    return SignatureError(adapter, "manifest_mismatch", detail)


def verify_directory(
    directory: str | Path,
    keyring: Keyring,
    *,
    tenant: str,
    adapter: str,
    policy: Policy = "required",
    adapter_sha256: str | None = None,
) -> SignedManifest | None:
    """Verify an adapter directory's signature and every signed file.

    Returns the verified manifest, or ``None`` for an unsigned adapter under ``optional``.
    Raises :class:`SignatureError`: ``missing`` (unsigned, ``required``), ``unknown_key``,
    ``revoked_key``, ``bad_signature``, or ``manifest_mismatch`` (a signed file differs or
    is gone, ``lorapool.json`` appeared, the config's digest or the stamp's base model
    differ, or the content sha256 is not ``adapter_sha256`` when given).
    """
    d = Path(directory).expanduser()
    signed = read_signature(d, adapter=adapter)
    if signed is None:
        _unsigned(adapter, policy, tenant)
        return None
    signed.verify(keyring, tenant=tenant, adapter=adapter)
    files = signed.files
    _check_covered(signed, adapter, sidecar_present=(d / SIDECAR_FILE).exists())
    for name, (sha, size) in sorted(files.items()):
        try:
            got_sha, got_size = _file_digest(d / name)
        except OSError as exc:
            raise _mismatch(adapter, f"{name} was signed but cannot be read: {exc}") from None
        if (got_sha, got_size) != (sha, size):
            raise _mismatch(adapter, f"{name} differs from the signed manifest")
    try:
        config = _read_config(d / CONFIG_FILE)
        base: dict[str, str] = {}
        if SIDECAR_FILE in files:
            base, _ = read_sidecar(d / SIDECAR_FILE)
    except (OSError, ValueError, AdapterValidationError) as exc:
        raise _mismatch(adapter, str(exc)) from None
    _check_contents(signed, adapter, config, sha256_of_files(d), adapter_sha256)
    if SIDECAR_FILE in files and (
        base.get("base_fingerprint") != signed.base_fingerprint
        or base.get("tokenizer_sha256") != signed.tokenizer_sha256
    ):
        raise _mismatch(adapter, f"the base model {SIDECAR_FILE} declares is not the signed one")
    return signed


def _check_covered(signed: SignedManifest, adapter: str, *, sidecar_present: bool) -> None:
    files = signed.files
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise _mismatch(adapter, f"the manifest does not cover {name}")
    if sidecar_present and SIDECAR_FILE not in files:
        raise _mismatch(adapter, f"{SIDECAR_FILE} was added after signing")
    if SIDECAR_FILE not in files and (signed.base_fingerprint or signed.tokenizer_sha256):
        raise _mismatch(adapter, f"the manifest declares a base model without {SIDECAR_FILE}")


def _check_contents(
    signed: SignedManifest,
    adapter: str,
    config: bytes,
    content_sha256: str,
    adapter_sha256: str | None,
) -> None:
    try:
        config_digest = peft_config_digest(config)
    except ValueError as exc:
        raise _mismatch(adapter, str(exc)) from None
    if config_digest != signed.manifest["peft_config_sha256"]:
        raise _mismatch(adapter, "the PEFT config differs from the signed one")
    if content_sha256 != signed.adapter_sha256:
        raise _mismatch(adapter, "the adapter's content sha256 differs from the signed one")
    if adapter_sha256 is not None and adapter_sha256 != signed.adapter_sha256:
        raise _mismatch(
            adapter,
            f"the manifest signs content {signed.adapter_sha256[:12]}…, "
            f"the adapter is {adapter_sha256[:12]}…",
        )


def verify_files(
    signed: SignedManifest | str | None,
    files: Mapping[str, bytes],
    keyring: Keyring,
    *,
    tenant: str,
    adapter: str,
    policy: Policy = "required",
    adapter_sha256: str | None = None,
    content_sha256: str | None = None,
) -> SignedManifest | None:
    """Verify a stored manifest (or its text, ``AdapterInfo.signature``) against the bytes
    of an adapter's files as they were read (``{name: bytes}``: the config and the
    weights, as the store reads them to load the adapter).

    The keyring and ``policy`` are applied now: a key revoked since the manifest was
    stored refuses it. Each file given must be signed and match; the config's digest and
    the content sha256 (when both files are given) must match the manifest, and the
    content sha256 must be ``adapter_sha256`` when given. Returns the manifest, or
    ``None`` for an unsigned adapter under ``optional``; raises :class:`SignatureError`.

    ``content_sha256``: the content digest of ``files`` when the caller has computed it
    (the store does on every read). It must then be the signed ``adapter_sha256``, which
    vouches for both files' bytes, so they are not hashed again file by file.
    """
    if signed is None:
        _unsigned(adapter, policy, tenant)
        return None
    if isinstance(signed, str):
        signed = SignedManifest.parse(signed, adapter=adapter)
    signed.verify(keyring, tenant=tenant, adapter=adapter)
    if content_sha256 is not None and CONFIG_FILE in files:
        _check_contents(signed, adapter, files[CONFIG_FILE], content_sha256, adapter_sha256)
        return signed
    signed_files = signed.files
    for name, data in sorted(files.items()):
        if name not in signed_files:
            raise _mismatch(adapter, f"{name} is not in the signed manifest")
        if (hashlib.sha256(data).hexdigest(), len(data)) != signed_files[name]:
            raise _mismatch(adapter, f"{name} differs from the signed manifest")
    if CONFIG_FILE in files and WEIGHTS_FILE in files:
        content = adapter_digest(
            {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: files[WEIGHTS_FILE]}
        )
        _check_contents(signed, adapter, files[CONFIG_FILE], content, adapter_sha256)
    return signed
