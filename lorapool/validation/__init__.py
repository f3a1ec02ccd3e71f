"""Validating an untrusted PEFT LoRA adapter before it is registered.

The files are read by :mod:`lorapool.formats` (defensively, without torch:
only safetensors, the header before any data, strict JSON, capped sizes, safe
archive extraction); this package holds the checks over what was read:

* every tensor name must map to a LoRA-able linear of a layer the base model
  has, with the base layer's in/out features and the declared rank, A and B in
  pairs, in F32/F16/BF16 (:mod:`.tensors`);
* the base model's fingerprint and tokenizer hash, and its name, are compared
  with what the adapter declares (:mod:`.base`);
* the values are scanned one tensor at a time (numpy, optional) for NaN/Inf
  and for abnormal Frobenius norms (:mod:`.values`).

:func:`validate_adapter` collects every problem into a :class:`ValidationReport`
(the ``lorapool validate`` command prints them all); :meth:`ValidationReport.raise_if_refused`
raises the first refusal as :class:`lorapool.errors.AdapterValidationError` with
a stable ``reason`` code (:data:`REASONS`). The readers' names are re-exported
here for the callers that import them from this package.
"""

from ..formats import (
    ARCHIVE_SUFFIXES,
    SIDECAR_FILE,
    BaseModelSpec,
    SafetensorsHeader,
    TensorInfo,
    ValidationLimits,
    base_fingerprint,
    check_archive_members,
    check_member_name,
    extract_archive,
    parse_adapter_config,
    parse_safetensors_header,
    read_safetensors_header_bytes,
    read_safetensors_header_file,
    stamp_adapter,
    tokenizer_hash,
)
from .report import REASONS, Problem, ValidationReport
from .tensors import ALLOWED_DTYPES
from .validate import validate_adapter
from .values import is_norm_outlier

__all__ = [
    "ALLOWED_DTYPES",
    "ARCHIVE_SUFFIXES",
    "REASONS",
    "SIDECAR_FILE",
    "BaseModelSpec",
    "Problem",
    "SafetensorsHeader",
    "TensorInfo",
    "ValidationLimits",
    "ValidationReport",
    "base_fingerprint",
    "check_archive_members",
    "check_member_name",
    "extract_archive",
    "is_norm_outlier",
    "parse_adapter_config",
    "parse_safetensors_header",
    "read_safetensors_header_bytes",
    "read_safetensors_header_file",
    "stamp_adapter",
    "tokenizer_hash",
    "validate_adapter",
]
