"""Strict JSON for untrusted files, and bounded ``repr`` of untrusted values."""

from __future__ import annotations

import json
from typing import Any, TypeGuard

from ..errors import AdapterValidationError


def load_strict(raw: bytes, what: str, reason: str) -> Any:
    """Decode UTF-8 JSON refusing duplicate keys and ``NaN``/``Infinity``.

    Raises :class:`AdapterValidationError` with ``reason``, naming ``what``.
    """
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterValidationError(reason, f"{what} is not valid JSON: {exc}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def short(value: object, width: int = 40) -> str:
    """``repr`` of an untrusted value, bounded (huge ints cannot be printed in full)."""
    if isinstance(value, int) and abs(value) > 10**30:
        return "a very large integer"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= width else text[: width - 3] + "..."
