"""Base-model checks: the declared fingerprint, tokenizer hash and base name."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterValidationError
from ..formats import SIDECAR_FILE, BaseModelSpec, SafetensorsHeader, read_sidecar
from .report import ValidationReport

__all__ = ["check_base"]

_METADATA_KEYS = {
    "base_fingerprint": "lorapool.base_fingerprint",
    "tokenizer_sha256": "lorapool.tokenizer_sha256",
}
"""Sidecar field -> the safetensors ``__metadata__`` key declaring the same thing."""


def check_base(
    d: Path, header: SafetensorsHeader, report: ValidationReport, base: BaseModelSpec | None
) -> None:
    """Compare what the adapter declares about its base (sidecar, metadata, config) with ``base``.

    The sidecar overrides the safetensors metadata. A fingerprint or tokenizer
    mismatch is final; a differing ``base_model_name_or_path`` (compared only
    without a declared fingerprint) can be forced.
    """
    declared = {field: header.metadata.get(key) for field, key in _METADATA_KEYS.items()}
    sidecar = d / SIDECAR_FILE
    if sidecar.is_file():
        try:
            fields, problems = read_sidecar(sidecar)
        except AdapterValidationError as exc:
            report.add_error(exc)
            return
        for problem in problems:
            report.add_error(problem)
        declared.update(fields)
    declared_fp, declared_tok = declared["base_fingerprint"], declared["tokenizer_sha256"]
    if base is None:
        if declared_fp or declared_tok:
            report.notes.append("no base model given: fingerprint and tokenizer checks skipped")
        return
    if declared_fp and base.fingerprint and declared_fp != base.fingerprint:
        report.add(
            "base_mismatch",
            f"the adapter declares base fingerprint {declared_fp[:16]}..., {base.name} has "
            f"{base.fingerprint[:16]}...: it was trained for another base model",
        )
    if declared_tok and base.tokenizer_sha256 and declared_tok != base.tokenizer_sha256:
        report.add(
            "tokenizer_mismatch",
            f"the adapter declares tokenizer {declared_tok[:16]}..., {base.name} has "
            f"{base.tokenizer_sha256[:16]}...: it was trained with another tokenizer",
        )
    declared_name = report.config.base_model_name_or_path if report.config else None
    if declared_name and not declared_fp:
        names = {_name_key(n) for n in (base.name, *base.aliases)}
        if _name_key(declared_name) not in names:
            report.add(
                "base_mismatch",
                f"base_model_name_or_path is {declared_name!r} but the base model is "
                f"{base.name!r}; use an adapter trained for it, or --force/force=True if it "
                "is the same model under another name",
                forceable=True,
            )


def _name_key(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()
