"""Rate limits that hold across replicas, kept in Redis: :class:`RedisBuckets`.

The other choice beside :class:`~lorapool.scheduler.shared_limits.PostgresBuckets`, with
the same semantics (a :class:`~lorapool.scheduler.shared_limits.BucketStore`)::

    scheduler = FairScheduler(tenants=...)
    share_rate_limits(scheduler, RedisBuckets("redis://cache:6379/0"))

(the example server: ``rate_limits = "redis://cache:6379/0"``).

Each bucket is one Redis hash, ``<namespace>:bucket:<key>`` (fields ``tokens`` and
``stamp``), refilled with the Redis server's clock (``TIME``; the replicas' clocks need
not agree). A take is one Lua script (sent once, then called by its SHA with
``EVALSHA``), so the refill and the take are atomic against every other replica's; a
level is another script, read only. A bucket's key expires when the bucket would be full
again, so idle tenants leave nothing behind (a bucket absent is full). The cost: one
round trip per call, two per bucket at admission (the level, then the take), on the event
loop's thread; a request with both limits costs four (well under a millisecond each on a
LAN). As with the database, a take racing another replica's may leave a debt (a level
below zero) that delays the tenant's next requests, and the burst can be exceeded by the
requests admitted during one round trip on each replica.

When Redis cannot be reached, each call raises (the
:class:`~lorapool.scheduler.shared_limits.SharedBucket` then limits per replica) and, for
``retry_after`` seconds after a lost connection, raises at once rather than waiting for a
connect timeout on every request. Needs Redis >= 5 (effects replication of scripts);
redis-py (the ``redis`` extra) is imported here.
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["RedisBuckets", "is_redis_url"]

MAX_IDLE_S = 30 * 24 * 3600.0
"""The longest a bucket's key is kept after its last take (a bucket whose refill to
full would take longer is forgotten, hence full, after this)."""

# KEYS[1]: the bucket; ARGV: rate, burst. The level now, refilled up to the burst.
_LEVEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
if not b[1] then
  return string.format('%.17g', burst)
end
local level = tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate
return string.format('%.17g', math.min(burst, level))
"""

# KEYS[1]: the bucket; ARGV: rate, burst, amount, the longest expiry (ms). Refill, take
# (the level may go below zero), store, expire when full again; the level after.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local level, stamp = burst, now
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
if b[1] then
  local last = tonumber(b[2])
  level = math.min(burst, tonumber(b[1]) + math.max(0, now - last) * rate)
  stamp = math.max(last, now)
end
level = level - amount
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', level),
  'stamp', string.format('%.17g', stamp))
local ttl = math.ceil((burst - level) / rate * 1000) + 1
redis.call('PEXPIRE', KEYS[1], math.min(ttl, tonumber(ARGV[4])))
return string.format('%.17g', level)
"""


def is_redis_url(value: str) -> bool:
    """Whether ``value`` names a Redis server (``redis://`` or ``rediss://``, TLS)."""
    return value.startswith(("redis://", "rediss://"))


def _check(rate: float, burst: float, amount: float = 0.0) -> None:
    if not (math.isfinite(rate) and rate > 0 and math.isfinite(burst) and burst > 0):
        raise ValueError(f"rate ({rate}) and burst ({burst}) must be finite and > 0")
    if not (math.isfinite(amount) and amount >= 0):
        raise ValueError(f"amount ({amount}) must be finite and >= 0")


class RedisBuckets:
    """:class:`~lorapool.scheduler.shared_limits.BucketStore` in Redis: one hash per
    bucket under ``<namespace>:bucket:``, each refill and take one atomic Lua script on
    the server's clock.

    ``url``: ``redis://[user:password@]host[:port][/db]`` or ``rediss://`` (TLS). The
    server is pinged here, so a wrong URL fails at once. ``namespace`` separates
    deployments sharing one Redis database. ``timeout``: seconds for each connect and
    reply. ``retry_after``: seconds during which calls fail at once after a lost
    connection. ``max_idle``: the longest a bucket is kept (:data:`MAX_IDLE_S`).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "lorapool",
        timeout: float = 2.0,
        retry_after: float = 5.0,
        max_idle: float = MAX_IDLE_S,
    ) -> None:
        if not is_redis_url(url):
            raise ValueError(f"{url!r} is not a redis:// or rediss:// URL")
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"namespace {namespace!r} must be non-empty, without spaces")
        if not (timeout > 0 and retry_after >= 0 and max_idle > 0):
            raise ValueError("timeout and max_idle must be > 0, retry_after >= 0")
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.namespace = namespace
        self.retry_after = retry_after
        self._max_idle_ms = math.ceil(max_idle * 1000)
        self._lost: tuple[type[Exception], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        )
        self._retry_at = 0.0
        # No retries inside redis-py: a call fails fast and SharedBucket falls back.
        self._client: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._level = self._client.register_script(_LEVEL)
        self._take = self._client.register_script(_TAKE)
        self._client.ping()

    def key(self, key: str) -> str:
        """The Redis key holding bucket ``key``."""
        return f"{self.namespace}:bucket:{key}"

    def _run(self, script: Any, key: str, args: list[float | int]) -> float:
        if time.monotonic() < self._retry_at:
            raise ConnectionError("the rate-limit Redis was lost a moment ago")
        try:
            reply = script(keys=[self.key(key)], args=args)
        except self._lost:
            self._retry_at = time.monotonic() + self.retry_after
            raise
        return float(reply)

    def level(self, key: str, rate: float, burst: float) -> float:
        """Tokens in the bucket now (a bucket never taken from, or idle until full, is full)."""
        _check(rate, burst)
        return self._run(self._level, key, [rate, burst])

    def take(self, key: str, rate: float, burst: float, amount: float) -> float:
        """Refill and take in one script; the level after (may be below zero)."""
        _check(rate, burst, amount)
        return self._run(self._take, key, [rate, burst, amount, self._max_idle_ms])

    def close(self) -> None:
        """Close the connections. Idempotent."""
        self._client.close()
