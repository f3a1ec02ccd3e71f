"""Checking and storing :class:`~lorapool.types.AdapterMetadata`.

:func:`check_metadata` refuses values the registry must not keep (a sha256 that is not
64 hex digits, a negative retention, a score that is not a finite number, ...) with
:class:`~lorapool.errors.InvalidRequest`, naming the field; it returns the metadata in
its stored form (hex digits lower case, ``compliance`` a tuple, scores floats).
:func:`metadata_json` and :func:`metadata_from_json` are the stored form's JSON, the
one every registry store keeps.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from lorapool.errors import InvalidRequest
from lorapool.types import AdapterMetadata

__all__ = ["check_metadata", "metadata_from_json", "metadata_json"]

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_MAX_TEXT = 500
_MAX_SCORES = 256
_MAX_FLAGS = 64
_FIELDS = frozenset(f.name for f in fields(AdapterMetadata))


def _text(name: str, value: object, *, limit: int = _MAX_TEXT) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidRequest(
            f"metadata.{name} must be a non-empty string of at most {limit} characters, "
            f"got {value!r:.80}"
        )
    if any(ord(c) < 32 for c in value):
        raise InvalidRequest(f"metadata.{name} must not hold control characters")
    return value


def _sha256(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.match(value):
        raise InvalidRequest(f"metadata.{name} must be a sha256 (64 hex digits), got {value!r:.80}")
    return value.lower()


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"metadata.{name} must be a finite number, got {value!r:.80}")
    return float(value)


def _time(name: str, value: object) -> float | None:
    if value is None:
        return None
    seconds = _number(name, value)
    if seconds < 0:
        raise InvalidRequest(f"metadata.{name} must be Unix seconds (>= 0), got {value!r}")
    return seconds


def _flag(value: object) -> str:
    flag = _text("compliance flag", value, limit=100)
    if flag is None:
        raise InvalidRequest("metadata.compliance flags must be strings, got None")
    return flag


def check_metadata(metadata: object) -> AdapterMetadata:
    """``metadata`` checked and in its stored form; :class:`InvalidRequest` naming the field.

    Checks: the sha256s are 64 hex digits; times are finite, non-negative Unix seconds;
    ``eval_scores`` maps non-empty names to finite numbers; ``retention_days`` is an
    integer >= 0; texts (``baseline_version``, ``gate``, ``signer``, each compliance flag)
    are non-empty, at most 500 characters, without control characters.
    """
    if not isinstance(metadata, AdapterMetadata):
        raise InvalidRequest(
            f"metadata must be a lorapool.AdapterMetadata, got {type(metadata).__name__}"
        )
    scores = metadata.eval_scores
    if not isinstance(scores, Mapping):
        raise InvalidRequest("metadata.eval_scores must map scorer names to numbers")
    if len(scores) > _MAX_SCORES:
        raise InvalidRequest(f"metadata.eval_scores holds more than {_MAX_SCORES} scores")
    checked_scores: dict[str, float] = {}
    for key, value in scores.items():
        _text("eval_scores key", key, limit=200)
        checked_scores[key] = _number(f"eval_scores[{key!r}]", value)
    retention = metadata.retention_days
    if retention is not None and (
        isinstance(retention, bool) or not isinstance(retention, int) or retention < 0
    ):
        raise InvalidRequest(
            f"metadata.retention_days must be a whole number of days >= 0, got {retention!r:.80}"
        )
    flags = metadata.compliance
    if isinstance(flags, (str, bytes)) or not isinstance(flags, (tuple, list)):
        raise InvalidRequest("metadata.compliance must be a tuple of flags, e.g. ('gdpr',)")
    if len(flags) > _MAX_FLAGS:
        raise InvalidRequest(f"metadata.compliance holds more than {_MAX_FLAGS} flags")
    checked_flags = tuple(_flag(f) for f in flags)
    return AdapterMetadata(
        training_data_sha256=_sha256("training_data_sha256", metadata.training_data_sha256),
        training_config_sha256=_sha256("training_config_sha256", metadata.training_config_sha256),
        trained_at=_time("trained_at", metadata.trained_at),
        promoted_at=_time("promoted_at", metadata.promoted_at),
        eval_scores=checked_scores,
        baseline_version=_text("baseline_version", metadata.baseline_version),
        gate=_text("gate", metadata.gate),
        signer=_text("signer", metadata.signer),
        retention_days=retention,
        compliance=checked_flags,
    )


def metadata_json(metadata: AdapterMetadata) -> str:
    """The stored form as JSON text (keys sorted)."""
    body = asdict(metadata)
    body["eval_scores"] = dict(metadata.eval_scores)
    body["compliance"] = list(metadata.compliance)
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def metadata_from_json(text: str | None) -> AdapterMetadata:
    """The metadata a store kept (``None``: a record written before metadata was kept).

    Keys this version does not know (written by a newer one) are left out.
    """
    if not text:
        return AdapterMetadata()
    raw: dict[str, Any] = json.loads(text)
    known = {k: v for k, v in raw.items() if k in _FIELDS}
    if "compliance" in known:
        known["compliance"] = tuple(known["compliance"])
    return AdapterMetadata(**known)
