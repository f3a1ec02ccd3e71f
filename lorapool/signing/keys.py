"""Ed25519 keys, the keyring that says which keys a tenant's adapters may be signed with,
and the per-tenant policy (``required`` / ``optional``).

A key's id defaults to its fingerprint (:func:`key_id_of`: ``ed25519:`` and 16 hex digits
of the sha256 of the raw public key), so a signer and a keyring that name no id agree. A
keyring file is JSON::

    {"keys": [{"key_id": "platform-2026", "public_key": "-----BEGIN PUBLIC KEY-----..."},
              {"key_id": "acme-1", "public_key_file": "acme-1.pub", "tenant": "acme"}],
     "revoked": ["platform-2025"]}

``public_key`` is PEM text or the raw 32-byte key in base64; ``public_key_file`` is a PEM
file, relative to the keyring file. A key without ``tenant`` is a platform key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lorapool.errors import SignatureError

__all__ = [
    "Keyring",
    "Policy",
    "SigningPolicy",
    "check_key_id",
    "generate_key",
    "key_id_of",
    "load_private_key",
    "load_public_key",
    "write_key_pair",
]

Policy = Literal["required", "optional"]
"""A tenant's signing policy: ``required`` refuses unsigned adapters, ``optional`` accepts
them. A signature that is present is verified under either, and refused when bad."""

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_MAX_KEY_FILE = 64 * 1024


def check_key_id(key_id: str) -> str:
    """``key_id`` if it is a usable key id (1-128 of letters, digits and ``._:@-``);
    ``ValueError`` otherwise."""
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise ValueError(
            f"bad key id {key_id!r}: use 1-128 letters, digits and . _ : @ - "
            "(starting with a letter or digit)"
        )
    return key_id


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The key's default id: ``ed25519:`` and the first 16 hex digits of the sha256 of
    its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def write_key_pair(
    out_dir: str | Path, *, key_id: str | None = None, key: Ed25519PrivateKey | None = None
) -> tuple[Path, Path, str]:
    """Write a key pair into ``out_dir``: ``<name>.key`` (PKCS#8 PEM, mode 0600) and
    ``<name>.pub`` (SubjectPublicKeyInfo PEM); ``<name>`` is the key id with ``:``
    made ``-``. Returns the private file, the public file and the key id.

    ``key_id`` defaults to :func:`key_id_of` the public key; a signer using another id
    must name it when signing. Refuses (``FileExistsError``) to overwrite a key.
    """
    key = generate_key() if key is None else key
    key_id = key_id_of(key.public_key()) if key_id is None else check_key_id(key_id)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stem = key_id.replace(":", "-")
    private_path, public_path = out / f"{stem}.key", out / f"{stem}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; keys are never overwritten")
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, key_id


def _read_key_file(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise ValueError(f"{path} is larger than {_MAX_KEY_FILE} bytes; not a key file")
    return data


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8, as :func:`write_key_pair`
    writes it). ``ValueError`` when it is not one; ``OSError`` when it cannot be read."""
    path = Path(path).expanduser()
    key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(data: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text or its raw 32 bytes in base64.

    ``ValueError`` when it is neither.
    """
    raw = data.encode() if isinstance(data, str) else data
    if raw.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(raw)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"a {type(key).__name__} is not an Ed25519 public key")
        return key
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        raise ValueError("not a PEM public key, nor a base64 raw Ed25519 key") from None
    if len(decoded) != 32:
        raise ValueError(f"a raw Ed25519 public key is 32 bytes, not {len(decoded)}")
    return Ed25519PublicKey.from_public_bytes(decoded)


@dataclass(frozen=True)
class _Key:
    key_id: str
    public_key: Ed25519PublicKey
    tenant: str | None


class Keyring:
    """The public keys adapters may be signed with, and the revoked key ids.

    A platform key (``tenant=None``) may sign any tenant's adapters; a tenant's key only
    that tenant's (another tenant's adapter signed with it is ``unknown_key``). Any
    number of keys are active at once, which is how keys rotate: add the new key, sign
    new versions with it, revoke the old id once nothing signed with it should load. A
    revoked id is refused (``revoked_key``) even while its key is still in the keyring.
    Changes apply to the next verification, including the next load of an adapter that
    registered before (the pool verifies again whenever it reads an adapter's bytes).
    Safe to change from any thread.
    """

    def __init__(
        self,
        keys: Iterable[tuple[Ed25519PublicKey, str | None, str | None]] = (),
        *,
        revoked: Iterable[str] = (),
    ) -> None:
        self._keys: dict[str, _Key] = {}
        self._revoked: set[str] = set(revoked)
        self._revoked_keys: set[bytes] = set()  # raw keys revoked under any of their ids
        self._lock = threading.Lock()
        for public_key, key_id, tenant in keys:
            self.add(public_key, key_id=key_id, tenant=tenant)

    def add(
        self,
        public_key: Ed25519PublicKey | str | bytes,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
    ) -> str:
        """Trust ``public_key`` (an object, PEM text or base64 raw bytes) under ``key_id``
        (default: :func:`key_id_of`) for ``tenant``'s adapters (``None``: every tenant's).

        Returns the key id. ``ValueError`` when the id is taken by another key.
        """
        if not isinstance(public_key, Ed25519PublicKey):
            public_key = load_public_key(public_key)
        key_id = key_id_of(public_key) if key_id is None else check_key_id(key_id)
        entry = _Key(key_id, public_key, tenant)
        with self._lock:
            old = self._keys.get(key_id)
            if old is not None and (
                _raw(old.public_key) != _raw(public_key) or old.tenant != tenant
            ):
                raise ValueError(f"key id {key_id!r} already names another key")
            self._keys[key_id] = entry
        return key_id

    def revoke(self, key_id: str) -> None:
        """Refuse ``key_id`` from now on (it need not be in the keyring), and the key it
        names under any other id it is trusted by: revoking a key must not leave it usable
        under a second name."""
        with self._lock:
            self._revoked.add(key_id)
            entry = self._keys.get(key_id)
            if entry is not None:
                self._revoked_keys.add(_raw(entry.public_key))

    def remove(self, key_id: str) -> None:
        """Forget ``key_id``'s key (a signature by it is then ``unknown_key``)."""
        with self._lock:
            self._keys.pop(key_id, None)

    @property
    def revoked(self) -> frozenset[str]:
        """The revoked key ids."""
        with self._lock:
            return frozenset(self._revoked)

    def key_ids(self, tenant: str | None = None) -> list[str]:
        """The active (not revoked) key ids that may sign ``tenant``'s adapters (``None``:
        the platform keys only)."""
        with self._lock:
            return sorted(
                k.key_id
                for k in self._keys.values()
                if k.key_id not in self._revoked
                and _raw(k.public_key) not in self._revoked_raw()
                and k.tenant in (None, tenant)
            )

    def _revoked_raw(self) -> set[bytes]:
        """The raw keys revoked under any id (call with the lock held): an id revoked
        before its key was added counts too."""
        named = {_raw(self._keys[i].public_key) for i in self._revoked if i in self._keys}
        return self._revoked_keys | named

    def __contains__(self, key_id: object) -> bool:
        with self._lock:
            return key_id in self._keys

    def public_key(self, key_id: str, *, tenant: str, adapter: str) -> Ed25519PublicKey:
        """The key that verifies ``tenant``'s adapter signed under ``key_id``.

        Raises :class:`SignatureError` ``revoked_key`` for a revoked id, ``unknown_key``
        for an id the keyring does not hold or that belongs to another tenant.
        """
        with self._lock:
            entry = self._keys.get(key_id)
            revoked = key_id in self._revoked or (
                entry is not None and _raw(entry.public_key) in self._revoked_raw()
            )
        if revoked:
            raise SignatureError(adapter, "revoked_key", f"key {key_id!r} is revoked")
        if entry is None or entry.tenant not in (None, tenant):
            whose = f" for tenant {tenant!r}" if tenant else ""
            raise SignatureError(
                adapter, "unknown_key", f"the keyring holds no key {key_id!r}{whose}"
            )
        return entry.public_key

    def extend(self, other: Keyring) -> None:
        """Trust ``other``'s keys too and refuse its revoked ids (``ValueError`` when an
        id names two different keys)."""
        with other._lock:
            keys, revoked = list(other._keys.values()), set(other._revoked)
            revoked_raw = other._revoked_raw()
        for key in keys:
            self.add(key.public_key, key_id=key.key_id, tenant=key.tenant)
        with self._lock:
            self._revoked |= revoked
            self._revoked_keys |= revoked_raw

    # -- files -----------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> Keyring:
        """A keyring from a parsed keyring file (see the module's docstring).

        ``public_key_file`` paths are relative to ``base_dir``. ``ValueError`` names
        the entry that is malformed.
        """
        unknown = set(data) - {"keys", "revoked"}
        if unknown:
            raise ValueError(f"unknown keyring fields {sorted(unknown)}; use keys, revoked")
        revoked = data.get("revoked", [])
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise ValueError("keyring: revoked must be a list of key ids")
        ring = cls(revoked=revoked)
        keys = data.get("keys", [])
        if not isinstance(keys, list):
            raise ValueError("keyring: keys must be a list")
        for n, entry in enumerate(keys):
            if not isinstance(entry, Mapping):
                raise ValueError(f"keyring: keys[{n}] must be an object")
            extra = set(entry) - {"key_id", "public_key", "public_key_file", "tenant"}
            if extra:
                raise ValueError(f"keyring: keys[{n}] has unknown fields {sorted(extra)}")
            pem, file = entry.get("public_key"), entry.get("public_key_file")
            if (pem is None) == (file is None):
                raise ValueError(f"keyring: keys[{n}] needs one of public_key, public_key_file")
            try:
                if file is not None:
                    path = Path(str(file)).expanduser()
                    if base_dir is not None and not path.is_absolute():
                        path = base_dir / path
                    key = load_public_key(_read_key_file(path))
                else:
                    key = load_public_key(str(pem))
                tenant = entry.get("tenant")
                if tenant is not None and not isinstance(tenant, str):
                    raise ValueError("tenant must be a string")
                key_id = entry.get("key_id")
                ring.add(key, key_id=None if key_id is None else str(key_id), tenant=tenant)
            except (OSError, ValueError) as exc:
                raise ValueError(f"keyring: keys[{n}]: {exc}") from None
        return ring

    @classmethod
    def load(cls, path: str | Path, *, key_id: str | None = None) -> Keyring:
        """A keyring from a keyring file, or from one public key file (PEM), trusted as a
        platform key under ``key_id`` (default: its fingerprint).

        ``ValueError`` when the file is neither; ``OSError`` when it cannot be read.
        """
        path = Path(path).expanduser()
        data = _read_key_file(path)
        if data.lstrip().startswith(b"-----BEGIN"):
            ring = cls()
            ring.add(load_public_key(data), key_id=key_id)
            return ring
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            raise ValueError(f"{path} is neither a PEM public key nor a JSON keyring") from None
        if not isinstance(parsed, Mapping):
            raise ValueError(f"{path}: a keyring file is a JSON object")
        return cls.from_mapping(cast("Mapping[str, Any]", parsed), base_dir=path.parent)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class SigningPolicy:
    """Whose adapters must be signed: ``default`` for every tenant, ``tenants`` for some.

    ``SigningPolicy()`` is ``optional`` for everyone; ``SigningPolicy("required",
    {"sandbox": "optional"})`` requires signatures except from ``sandbox``.
    """

    default: Policy = "optional"
    tenants: dict[str, Policy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for who, policy in [("default", self.default), *self.tenants.items()]:
            if policy not in ("required", "optional"):
                raise ValueError(
                    f"signing policy of {who!r} is {policy!r}; use 'required' or 'optional'"
                )

    def for_tenant(self, tenant: str) -> Policy:
        """The policy that applies to ``tenant``."""
        return self.tenants.get(tenant, self.default)

    def set(self, tenant: str, policy: Policy) -> None:
        """Set ``tenant``'s policy (applies to its next registration and load)."""
        if policy not in ("required", "optional"):
            raise ValueError(f"signing policy {policy!r}; use 'required' or 'optional'")
        self.tenants[tenant] = policy

    @classmethod
    def of(cls, value: SigningPolicy | Mapping[str, Policy] | Policy | None) -> SigningPolicy:
        """A policy from a policy, ``{tenant: policy}`` (the others optional), one policy
        for everyone, or ``None`` (optional for everyone)."""
        if isinstance(value, SigningPolicy):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(value)
        return cls(tenants=dict(value))
