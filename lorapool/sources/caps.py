"""How many bytes a fetched file may have, enforced while it is read.

The store knows the caps that apply to the file it asks for (the per-adapter
cap of :class:`~lorapool.formats.ValidationLimits`, the disk tier's
``disk_bytes``, the size registered for the adapter) and sets them with
:func:`limit_fetch` around :meth:`Source.fetch <lorapool.abc.Source.fetch>`; a
source reads its cap with :func:`fetch_limit` and stops reading once a file
goes past it, so an oversized body is never written out in full. Outside a
store the per-adapter cap applies. The store checks every fetched file's size
afterwards too, so a third-party source that ignores the cap is refused all
the same (after the fact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from lorapool.errors import AdapterValidationError
from lorapool.formats import ValidationLimits

__all__ = ["DEFAULT_LIMIT", "FetchLimit", "fetch_limit", "limit_fetch"]


@dataclass(frozen=True)
class FetchLimit:
    """At most ``max_bytes`` for one file; ``cap`` names the cap in refusals."""

    max_bytes: int
    cap: str
    """What the cap is, for the message: ``"disk_bytes (16777216 bytes)"``."""

    def exceeded(self, size: int) -> bool:
        """Whether ``size`` bytes are over the limit."""
        return size > self.max_bytes

    def refuse(self, label: str) -> AdapterValidationError:
        """The ``too_large`` refusal of file ``label``, naming the cap."""
        return AdapterValidationError(
            "too_large",
            f"{label} is larger than the {self.max_bytes} bytes {self.cap} allows; "
            "refused while reading, nothing was kept",
        )


_TOTAL = ValidationLimits.max_total_bytes
DEFAULT_LIMIT = FetchLimit(
    _TOTAL, f"the per-adapter cap (ValidationLimits.max_total_bytes, {_TOTAL} bytes)"
)
"""The cap a source reads under when no store set one."""

_LIMIT: ContextVar[FetchLimit] = ContextVar("lorapool_fetch_limit", default=DEFAULT_LIMIT)


def fetch_limit() -> FetchLimit:
    """The limit on the file being fetched now (:data:`DEFAULT_LIMIT` unless a store set one)."""
    return _LIMIT.get()


@contextlib.contextmanager
def limit_fetch(limit: FetchLimit) -> Iterator[None]:
    """Fetch under ``limit`` inside the block (this task and the threads it starts)."""
    token = _LIMIT.set(limit)
    try:
        yield
    finally:
        _LIMIT.reset(token)
