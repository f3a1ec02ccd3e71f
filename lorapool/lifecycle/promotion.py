"""What an eval-gated promotion decides before it moves an alias: the baseline it compares
with, the traffic split it sets, and what it returns (:class:`Promotion`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lorapool.errors import InvalidRequest
from lorapool.lifecycle.gate import GateReport

__all__ = ["Promotion", "baseline_of", "promotion_split"]


@dataclass(frozen=True)
class Promotion:
    """A promotion carried out (``AdapterPool.promote``).

    ``adapter``: the promoted version's id (``tenant/name@v``); ``baseline``: the version
    the alias served before (its id; ``None`` when it served none other); ``traffic``:
    the alias's split now; ``canary``: the candidate's share in percent when it went to a
    canary (watched, :mod:`lorapool.lifecycle.canary`), else ``None``; ``report``: the
    gate's report (``None`` without a gate); ``promoted_at``: Unix seconds.
    """

    adapter: str
    baseline: str | None
    traffic: Mapping[str, float]
    canary: float | None
    report: GateReport | None
    promoted_at: float


def baseline_of(traffic: Mapping[str, float], candidate: str) -> str | None:
    """The version an alias serves now other than ``candidate``: the one with the most
    traffic (ties: the later name), or ``None`` when only the candidate carries any."""
    others = [(w, v) for v, w in traffic.items() if v != candidate and w > 0]
    return max(others)[1] if others else None


def promotion_split(baseline: str | None, candidate: str, canary: float | None) -> dict[str, float]:
    """The traffic split a promotion sets: all to ``candidate``, or ``canary`` percent to
    it and the rest to ``baseline``."""
    if canary is None:
        return {candidate: 100.0}
    if not (isinstance(canary, int | float) and math.isfinite(canary) and 0 < canary < 100):
        raise InvalidRequest(
            f"canary is the candidate's share in percent, 0 < canary < 100: {canary!r}"
        )
    if baseline is None:
        raise InvalidRequest("a canary needs a version serving the rest of the traffic")
    return {baseline: 100.0 - float(canary), candidate: float(canary)}
