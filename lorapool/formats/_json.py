"""Strict JSON for untrusted files, and bounded ``repr`` of untrusted values.

Every JSON document the readers parse goes through :func:`load_json` (or
:func:`load_strict`), which bounds its nesting depth on the raw bytes before
decoding, so a document like ``[[[[...]]]]`` nested 100,000 deep is refused with
a typed error instead of raising ``RecursionError`` from the decoder.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, TypeGuard

from ..errors import AdapterValidationError
from .limits import MAX_JSON_DEPTH

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
"""A complete JSON string literal (escapes included); brackets inside one do not nest."""
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [1 if b in b"[{" else -1 for b in range(256)]


def json_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of a JSON document nest (0 for a scalar).

    Counts brackets outside string literals, in C loops over the bytes (no
    recursion, no decoding). For malformed JSON the count is approximate,
    which is harmless: the decoder refuses such a document anyway.
    """
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not skeleton:
        return 0
    return max(accumulate(map(_STEP.__getitem__, skeleton)))


def load_json(
    raw: bytes, what: str, reason: str, *, strict: bool = True, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Decode UTF-8 JSON nested at most ``max_depth`` deep.

    With ``strict`` (the default) duplicate keys and ``NaN``/``Infinity`` are
    refused too. Raises :class:`AdapterValidationError` with ``reason``,
    naming ``what``, and nothing else.
    """
    depth = json_depth(raw)
    if depth > max_depth:
        raise AdapterValidationError(
            reason,
            f"{what} is not valid JSON: it nests {depth} levels deep, more than the "
            f"{max_depth} allowed",
        )
    try:
        text = raw.decode("utf-8")
        if strict:
            return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterValidationError(reason, f"{what} is not valid JSON: {exc}") from None


def load_strict(raw: bytes, what: str, reason: str) -> Any:
    """Decode UTF-8 JSON refusing duplicate keys, ``NaN``/``Infinity`` and deep nesting.

    Raises :class:`AdapterValidationError` with ``reason``, naming ``what``.
    """
    return load_json(raw, what, reason)


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
