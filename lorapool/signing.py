"""Signed adapter manifests: Ed25519 signatures over each file's sha256, the PEFT config
and the base model, verified at registration and whenever the bytes are read again
(issue 29). SCAFFOLDING: filled in by the signing work of this issue.
"""
