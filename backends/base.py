"""The Backend seam (defined with every other seam in :mod:`lorapool.abc`).

A backend owns device memory and the forward pass. It does not decide what to
evict or whom to serve: the store tells it which adapter goes into which slot,
the scheduler decides which request it gets next.
"""

from __future__ import annotations

from lorapool.abc import Backend

__all__ = ["Backend"]
