"""Signed adapter manifests (issue 29): Ed25519 signatures over each file's sha256, the
PEFT config and the base model, verified at registration and whenever the bytes are read
again.

* :mod:`.keys`: key pairs (:func:`write_key_pair`, :func:`load_private_key`), the
  :class:`Keyring` (platform and per-tenant keys, several active for rotation, revoked
  ids) and the per-tenant :class:`SigningPolicy` (``required`` / ``optional``);
* :mod:`.manifest`: the manifest and its file :data:`SIGNATURE_FILE`
  (:func:`sign_directory`), and verifying a directory (:func:`verify_directory`) or a
  stored manifest against the bytes read (:func:`verify_files`).

Every refusal is a :class:`lorapool.errors.SignatureError` with its reason.
"""

from lorapool.signing.keys import (
    Keyring,
    Policy,
    SigningPolicy,
    check_key_id,
    generate_key,
    key_id_of,
    load_private_key,
    load_public_key,
    write_key_pair,
)
from lorapool.signing.manifest import (
    FORMAT,
    SIGNATURE_FILE,
    SignedManifest,
    build_manifest,
    canonical_json,
    peft_config_digest,
    read_signature,
    sign_directory,
    sign_manifest,
    verify_directory,
    verify_files,
)

__all__ = [
    "FORMAT",
    "SIGNATURE_FILE",
    "Keyring",
    "Policy",
    "SignedManifest",
    "SigningPolicy",
    "build_manifest",
    "canonical_json",
    "check_key_id",
    "generate_key",
    "key_id_of",
    "load_private_key",
    "load_public_key",
    "peft_config_digest",
    "read_signature",
    "sign_directory",
    "sign_manifest",
    "verify_directory",
    "verify_files",
    "write_key_pair",
]
