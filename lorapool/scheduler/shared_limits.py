"""Rate limits that hold across replicas: each tenant's token buckets kept in a database.

By default a tenant's rate limits (``TierPolicy.requests_per_s``, ``tokens_per_min``)
are per process: N replicas behind a load balancer let a tenant through at N times
its rate. :func:`share_rate_limits` makes a :class:`~lorapool.scheduler.FairScheduler`
keep each tenant's buckets in a :class:`BucketStore` shared by every replica instead::

    scheduler = FairScheduler(tenants=...)
    share_rate_limits(scheduler, PostgresBuckets("postgresql://db/lorapool"))

(the example server: ``rate_limits = "shared"`` beside a ``postgresql://`` registry).

:class:`PostgresBuckets` keeps one row per bucket (``tenant:requests``,
``tenant:tokens``) in the registry's schema, refilled with the database's clock (the
replicas' clocks need not agree). The cost: admission asks the database twice per
bucket (read the level, then take), a round trip each, on the event loop's thread; a
request with both limits costs four round trips (a few milliseconds on a LAN). The
rate holds exactly over time: a take that races another replica's may leave a bucket
below zero, and the debt delays that tenant's next requests. The burst can be
exceeded by the requests admitted during one round trip on each replica.

When the database cannot be reached, each bucket falls back to its per-replica
level (admission keeps working; the limit is per replica again until it is back) and
a warning is logged once per outage. Redis:
:class:`~lorapool.scheduler.redis_limits.RedisBuckets` (the example server:
``rate_limits = "redis://..."``); another store implements the two methods of
:class:`BucketStore`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from lorapool.ratelimit import TokenBucket
from lorapool.scheduler.fair import FairScheduler
from lorapool.scheduler.vtc import TenantState

__all__ = ["BucketStore", "PostgresBuckets", "SharedBucket", "share_rate_limits"]

log = logging.getLogger("lorapool.scheduler.shared_limits")


class BucketStore(Protocol):
    """Token buckets kept where every replica sees them, keyed by name.

    A bucket absent from the store is full. Both calls may raise any exception when
    the store cannot be reached; :class:`SharedBucket` then uses its local level.
    """

    def level(self, key: str, rate: float, burst: float) -> float:
        """Tokens in bucket ``key`` now (refilled at ``rate`` per second, at most ``burst``)."""
        ...

    def take(self, key: str, rate: float, burst: float, amount: float) -> float:
        """Refill, then take ``amount`` (the level may go below zero); the level after."""
        ...


class SharedBucket(TokenBucket):
    """A :class:`~lorapool.ratelimit.TokenBucket` whose level lives in a :class:`BucketStore`.

    The local bucket (the per-replica limit) stands in while the store is unreachable.
    """

    def __init__(
        self,
        store: BucketStore,
        key: str,
        rate: float,
        burst: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(rate, burst, clock)
        self.store = store
        self.key = key
        self._down = False

    def _shared(self, what: Callable[[], float]) -> float | None:
        try:
            value = what()
        except Exception as exc:  # any failure of the store: limit per replica
            if not self._down:
                log.warning(
                    "shared rate limit %s unreachable (%s: %s): limiting per replica meanwhile",
                    self.key,
                    type(exc).__name__,
                    exc,
                )
            self._down = True
            return None
        if self._down:
            log.info("shared rate limit %s reachable again", self.key)
        self._down = False
        return value

    @property
    def tokens(self) -> float:
        """Tokens available now, over every replica."""
        level = self._shared(lambda: self.store.level(self.key, self.rate, self.burst))
        return super().tokens if level is None else level

    def wait_time(self, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens are there for the tenant over every replica."""
        if amount > self.burst:
            return float("inf")
        return max(0.0, (amount - self.tokens) / self.rate)

    def try_take(self, amount: float = 1.0) -> bool:
        """Take ``amount`` (call after :meth:`wait_time` said they are there). The local
        bucket is charged too, so a fallback starts from a level that counts recent use."""
        super().try_take(amount)
        self._shared(lambda: self.store.take(self.key, self.rate, self.burst, amount))
        return True


def share_rate_limits(scheduler: FairScheduler, store: BucketStore, *, prefix: str = "") -> None:
    """Make ``scheduler`` keep every tenant's rate-limit buckets in ``store``.

    Call it before the scheduler admits its first request. ``prefix`` separates the
    buckets of deployments sharing one store. Tenants without limits are unaffected.
    """
    admission = scheduler._admission
    local = admission.new_tenant
    clock = admission._clock

    def new_tenant(name: str) -> TenantState:
        state = local(name)
        if state.requests is not None:
            b = state.requests
            state.requests = SharedBucket(store, f"{prefix}{name}:requests", b.rate, b.burst, clock)
        if state.tokens is not None:
            b = state.tokens
            state.tokens = SharedBucket(store, f"{prefix}{name}:tokens", b.rate, b.burst, clock)
        return state

    admission.new_tenant = new_tenant  # type: ignore[method-assign]


_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")

_NOW = "extract(epoch from clock_timestamp())"

RETRY_AFTER = 5.0
"""Seconds between attempts to reach the rate-limit database after losing it."""


class PostgresBuckets:
    """:class:`BucketStore` in PostgreSQL: the table ``rate_buckets`` of ``schema``
    (created if missing; by default the registry's schema), one row per bucket, each
    refill and take one atomic statement on the database's clock.

    ``dsn``: a ``postgresql://`` URL. psycopg 3 (the ``postgres`` extra) is imported here.
    """

    def __init__(self, dsn: str, *, schema: str = "lorapool", connect_timeout: float = 2.0):
        if not _NAME.match(schema):
            raise ValueError(f"schema {schema!r} must be a plain lower-case SQL identifier")
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._db: Any = None
        self._retry_at = 0.0
        with self._lock:
            conn = self._conn()
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"lorapool:{schema}",))
            try:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {schema}.rate_buckets ("
                    "key TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL, "
                    "stamp DOUBLE PRECISION NOT NULL)"
                )
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"lorapool:{schema}",))

    def _conn(self) -> Any:
        """The connection, opened again after a loss, at most once per :data:`RETRY_AFTER`
        seconds (so an outage costs admission one connect timeout per period, not one
        per request)."""
        if self._db is not None and (self._db.closed or self._db.broken):
            self._db = None
            self._retry_at = time.monotonic() + RETRY_AFTER
        if self._db is None:
            if time.monotonic() < self._retry_at:
                raise ConnectionError("the rate-limit database was lost a moment ago")
            import psycopg

            try:
                self._db = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=max(1, round(self.connect_timeout)),
                    application_name="lorapool-ratelimit",
                )
            except psycopg.Error:
                self._retry_at = time.monotonic() + RETRY_AFTER
                raise
        return self._db

    def level(self, key: str, rate: float, burst: float) -> float:
        """Tokens in the bucket now (a bucket never taken from is full)."""
        with self._lock:
            row = (
                self._conn()
                .execute(
                    f"SELECT least(%s, tokens + greatest(0, {_NOW} - stamp) * %s) "
                    f"FROM {self.schema}.rate_buckets WHERE key = %s",
                    (burst, rate, key),
                )
                .fetchone()
            )
        return float(burst) if row is None else float(row[0])

    def take(self, key: str, rate: float, burst: float, amount: float) -> float:
        """Refill and take in one statement; the level after (may be below zero)."""
        s = self.schema
        with self._lock:
            row = (
                self._conn()
                .execute(
                    f"INSERT INTO {s}.rate_buckets AS b (key, tokens, stamp) "
                    f"VALUES (%(key)s, %(burst)s - %(amount)s, {_NOW}) "
                    "ON CONFLICT (key) DO UPDATE SET "
                    "tokens = least(%(burst)s, b.tokens + "
                    "greatest(0, excluded.stamp - b.stamp) * %(rate)s) - %(amount)s, "
                    "stamp = greatest(b.stamp, excluded.stamp) RETURNING tokens",
                    {"key": key, "burst": burst, "amount": amount, "rate": rate},
                )
                .fetchone()
            )
        return float(row[0]) if row is not None else 0.0

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
