"""The canary watch: a version taking part of an alias's traffic, compared with the stable
version over a sliding window of their requests, rolled back by itself when it misbehaves.

For each watched alias (:class:`Canary`) the watch keeps, per version, the last
``window`` finished requests (and, with ``window_seconds``, only the recent ones): whether
each failed and its time to first token; and the quality scores fed back for them
(``pool.feedback(request_id, score)``). After each new observation it judges
(:meth:`Canary.judge`), once both sides have enough samples:

* **errors**: the candidate's error rate exceeds the stable version's by more than
  ``max_error_rate_increase`` (with too few stable samples, the stable rate counts as 0);
* **latency**: the candidate's TTFT p99 exceeds ``max_ttft_p99_ratio`` times the
  stable version's (and, when set, ``max_ttft_p99_s`` outright);
* **quality**: the candidate's mean feedback is below the stable version's by more than
  ``max_quality_drop``, or below ``min_quality``.

Past any of them the verdict is a rollback; with ``promote_after`` set, a candidate that
has served that many requests without one is promoted to all of the traffic. The watch
itself changes nothing: its owner (``AdapterPool``) acts on the verdict (moves the
traffic, writes the audit entry) and the watch counts the rollbacks it carried out
(:attr:`CanaryWatch.rollbacks`, the server's ``lorapool_canary_rollbacks_total``).

Only requests that ended as the version's doing count: ``finished`` and ``handed_off``
are successes, ``error`` a failure; refused, expired and cancelled requests (the caller
left, a queue was full) are not the version's and are not counted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from lorapool.errors import InvalidRequest

__all__ = [
    "Canary",
    "CanaryPolicy",
    "CanaryWatch",
    "Finished",
    "Verdict",
    "p99",
]

log = logging.getLogger(__name__)

_OK = frozenset({"finished", "handed_off"})
_FAILED = frozenset({"error"})


@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary is judged, and what rolls it back.

    ``window``: the last requests kept per version; ``window_seconds``: and only those
    younger than this (``None``: no age limit). ``min_samples``: requests each side needs
    before errors and latency are judged; ``min_feedback``: feedback scores before
    quality is. Thresholds set to ``None`` are not checked. ``promote_after``: move all
    traffic to the candidate after this many of its requests with no rollback (``None``:
    never; the canary stays until someone moves it).
    """

    window: int = 200
    window_seconds: float | None = None
    min_samples: int = 20
    max_error_rate_increase: float | None = 0.05
    max_ttft_p99_ratio: float | None = 2.0
    max_ttft_p99_s: float | None = None
    min_feedback: int = 10
    max_quality_drop: float | None = 0.1
    min_quality: float | None = None
    promote_after: int | None = None

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_samples < 1 or self.min_feedback < 1:
            raise InvalidRequest("canary window, min_samples and min_feedback must be >= 1")
        if self.min_samples > self.window or self.min_feedback > self.window:
            raise InvalidRequest("canary min_samples and min_feedback cannot exceed the window")
        for name in ("window_seconds", "max_error_rate_increase", "max_ttft_p99_ratio"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InvalidRequest(f"canary {name} must be a finite number >= 0")
        if self.promote_after is not None and self.promote_after < 1:
            raise InvalidRequest("canary promote_after must be >= 1 (or None)")


class Finished(Protocol):
    """What the watch needs of a finished request (``lorapool.request.UsageRecord``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def adapter(self) -> str | None: ...
    @property
    def outcome(self) -> str: ...
    @property
    def ttft(self) -> float | None: ...


@dataclass(frozen=True)
class Verdict:
    """What the watch decided about a canary: ``rollback`` (with why) or ``promote``.

    ``numbers``: both sides' error rates, TTFT p99s, mean feedback and sample counts
    at the moment of the verdict (JSON values, for the audit entry)."""

    action: Literal["rollback", "promote"]
    reason: str
    numbers: Mapping[str, float | int | None]


def p99(values: list[float]) -> float:
    """The 99th percentile by nearest rank (of a non-empty list)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class _Side:
    """One version's recent requests and feedback."""

    requests: deque[tuple[float, bool, float | None]] = field(default_factory=deque)
    """(when, failed, ttft)."""
    feedback: deque[tuple[float, float]] = field(default_factory=deque)
    served: int = 0
    """Requests counted since the canary began (not only those in the window)."""

    def trim(self, policy: CanaryPolicy, now: float) -> None:
        while len(self.requests) > policy.window:
            self.requests.popleft()
        while len(self.feedback) > policy.window:
            self.feedback.popleft()
        if policy.window_seconds is not None:
            oldest = now - policy.window_seconds
            while self.requests and self.requests[0][0] < oldest:
                self.requests.popleft()
            while self.feedback and self.feedback[0][0] < oldest:
                self.feedback.popleft()

    @property
    def samples(self) -> int:
        return len(self.requests)

    @property
    def error_rate(self) -> float | None:
        if not self.requests:
            return None
        return sum(1 for _, failed, _ in self.requests if failed) / len(self.requests)

    @property
    def ttft_p99(self) -> float | None:
        ttfts = [t for _, failed, t in self.requests if t is not None and not failed]
        return p99(ttfts) if ttfts else None

    @property
    def quality(self) -> float | None:
        if not self.feedback:
            return None
        return sum(s for _, s in self.feedback) / len(self.feedback)


class Canary:
    """One alias in canary: ``stable`` and ``candidate`` (version ids, ``name@v``) and
    their windows. :meth:`record`, :meth:`score` feed it; :meth:`judge` decides."""

    def __init__(
        self,
        alias: str,
        *,
        tenant: str,
        stable: str,
        candidate: str,
        policy: CanaryPolicy,
        started_at: float,
    ) -> None:
        self.alias = alias
        self.tenant = tenant
        self.stable = stable
        self.candidate = candidate
        self.policy = policy
        self.started_at = started_at
        self.sides = {stable: _Side(), candidate: _Side()}

    def record(self, version: str, *, failed: bool, ttft: float | None, now: float) -> None:
        """Count one finished request of ``version``."""
        side = self.sides[version]
        side.requests.append((now, failed, ttft))
        side.served += 1
        side.trim(self.policy, now)

    def score(self, version: str, score: float, *, now: float) -> None:
        """Count one feedback score for a request of ``version``."""
        side = self.sides[version]
        side.feedback.append((now, score))
        side.trim(self.policy, now)

    def numbers(self, now: float) -> dict[str, float | int | None]:
        """Both sides' window now: samples, error rate, TTFT p99, mean feedback."""
        out: dict[str, float | int | None] = {}
        for role, version in (("stable", self.stable), ("candidate", self.candidate)):
            side = self.sides[version]
            side.trim(self.policy, now)
            out[f"{role}_samples"] = side.samples
            out[f"{role}_error_rate"] = side.error_rate
            out[f"{role}_ttft_p99_s"] = side.ttft_p99
            out[f"{role}_feedback"] = len(side.feedback)
            out[f"{role}_quality"] = side.quality
        return out

    def judge(self, now: float) -> Verdict | None:
        """Roll back, promote, or (``None``) keep watching."""
        p = self.policy
        n = self.numbers(now)
        cand, stable = self.sides[self.candidate], self.sides[self.stable]
        reasons: list[str] = []
        if cand.samples >= p.min_samples:
            rate = cand.error_rate or 0.0
            base = (stable.error_rate or 0.0) if stable.samples >= p.min_samples else 0.0
            if p.max_error_rate_increase is not None and rate - base > p.max_error_rate_increase:
                reasons.append(
                    f"error rate {rate:.3f} against the stable version's {base:.3f} "
                    f"(more than {p.max_error_rate_increase:g} higher)"
                )
            cand_p99 = cand.ttft_p99
            if cand_p99 is not None:
                stable_p99 = stable.ttft_p99 if stable.samples >= p.min_samples else None
                if (
                    p.max_ttft_p99_ratio is not None
                    and stable_p99 is not None
                    and cand_p99 > stable_p99 * p.max_ttft_p99_ratio
                ):
                    reasons.append(
                        f"TTFT p99 {cand_p99:.3f} s against the stable version's "
                        f"{stable_p99:.3f} s (more than {p.max_ttft_p99_ratio:g}x)"
                    )
                if p.max_ttft_p99_s is not None and cand_p99 > p.max_ttft_p99_s:
                    reasons.append(f"TTFT p99 {cand_p99:.3f} s over {p.max_ttft_p99_s:g} s")
        if len(cand.feedback) >= p.min_feedback:
            quality = cand.quality or 0.0
            if p.min_quality is not None and quality < p.min_quality:
                reasons.append(f"mean feedback {quality:.3f} below {p.min_quality:g}")
            if p.max_quality_drop is not None and len(stable.feedback) >= p.min_feedback:
                base_quality = stable.quality or 0.0
                if base_quality - quality > p.max_quality_drop:
                    reasons.append(
                        f"mean feedback {quality:.3f} against the stable version's "
                        f"{base_quality:.3f} (more than {p.max_quality_drop:g} lower)"
                    )
        if reasons:
            return Verdict("rollback", "; ".join(reasons), n)
        if p.promote_after is not None and cand.served >= p.promote_after:
            return Verdict("promote", f"{cand.served} requests in canary without a rollback", n)
        return None


OnVerdict = Callable[[Canary, Verdict], bool]
"""Carries a verdict out (moves the alias's traffic, audits it); returns whether it did
(``False``: the alias is no longer in this canary, e.g. someone moved its traffic)."""


class CanaryWatch:
    """The canaries of a pool, fed by its finished requests and its feedback.

    ``on_verdict`` acts on a verdict; the canary is no longer watched once it has acted
    (or declined: the alias moved on). ``clock``: seconds, monotonic (a fake in tests).
    ``remember``: how many recent canary requests' ids are kept for feedback.
    """

    def __init__(
        self,
        on_verdict: OnVerdict,
        *,
        clock: Callable[[], float] = time.monotonic,
        remember: int = 10_000,
    ) -> None:
        self._on_verdict = on_verdict
        self._clock = clock
        self._remember = remember
        self._canaries: dict[str, Canary] = {}
        self._by_version: dict[str, Canary] = {}
        self._requests: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """request id -> (tenant, version id), for feedback."""
        self._lock = threading.Lock()
        self.rollbacks: dict[str, int] = {}
        """Automatic rollbacks carried out, by alias (full id)."""
        self.promotions: dict[str, int] = {}
        """Automatic promotions after a clean window, by alias."""

    @property
    def canaries(self) -> dict[str, Canary]:
        """The canaries watched now, by alias."""
        with self._lock:
            return dict(self._canaries)

    def watch(
        self, alias: str, *, tenant: str, stable: str, candidate: str, policy: CanaryPolicy
    ) -> Canary:
        """Watch ``candidate`` against ``stable`` (version ids of ``alias``), replacing any
        canary of the alias watched before."""
        if stable == candidate:
            raise InvalidRequest("a canary needs two different versions")
        canary = Canary(
            alias,
            tenant=tenant,
            stable=stable,
            candidate=candidate,
            policy=policy,
            started_at=self._clock(),
        )
        with self._lock:
            self._drop(alias)
            self._canaries[alias] = canary
            self._by_version[stable] = canary
            self._by_version[candidate] = canary
        return canary

    def stop(self, alias: str) -> Canary | None:
        """Stop watching the alias's canary (returns it, or ``None`` if none)."""
        with self._lock:
            return self._drop(alias)

    def _drop(self, alias: str) -> Canary | None:
        canary = self._canaries.pop(alias, None)
        if canary is not None:
            for version in (canary.stable, canary.candidate):
                if self._by_version.get(version) is canary:
                    del self._by_version[version]
        return canary

    def observe(self, record: Finished) -> None:
        """Count a finished request (the pool's ledger calls this for every request)."""
        if record.adapter is None:
            return
        with self._lock:
            canary = self._by_version.get(record.adapter)
            if canary is None:
                return
            self._requests[record.request_id] = (record.tenant, record.adapter)
            while len(self._requests) > self._remember:
                self._requests.popitem(last=False)
            if record.outcome not in _OK and record.outcome not in _FAILED:
                return
            now = self._clock()
            canary.record(
                record.adapter,
                failed=record.outcome in _FAILED,
                ttft=record.ttft,
                now=now,
            )
            verdict = canary.judge(now)
        if verdict is not None:
            self._act(canary, verdict)

    def feedback(self, request_id: str, score: float, *, tenant: str | None = None) -> bool:
        """Count a quality score for a canary's request, once; ``False`` when the request
        is not one of a watched canary's recent requests (or not ``tenant``'s), or was
        scored already (a repeated score would weigh one answer many times)."""
        with self._lock:
            known = self._requests.get(request_id)
            if known is None or (tenant is not None and known[0] != tenant):
                return False
            del self._requests[request_id]
            canary = self._by_version.get(known[1])
            if canary is None:
                return False
            now = self._clock()
            canary.score(known[1], score, now=now)
            verdict = canary.judge(now)
        if verdict is not None:
            self._act(canary, verdict)
        return True

    def _act(self, canary: Canary, verdict: Verdict) -> None:
        """Have the owner carry the verdict out; stop watching once it has (or declined).
        A failure (the registry unreachable) is logged and the canary stays watched: the
        next request judges it again."""
        with self._lock:
            if self._canaries.get(canary.alias) is not canary:
                return  # another request's verdict already ended it
            self._drop(canary.alias)
        try:
            acted = self._on_verdict(canary, verdict)
        except Exception:
            log.exception("canary %s: could not %s", canary.alias, verdict.action)
            with self._lock:
                if canary.alias not in self._canaries:
                    self._canaries[canary.alias] = canary
                    self._by_version[canary.stable] = canary
                    self._by_version[canary.candidate] = canary
            return
        if acted:
            with self._lock:
                counts = self.rollbacks if verdict.action == "rollback" else self.promotions
                counts[canary.alias] = counts.get(canary.alias, 0) + 1
