"""RedisBuckets (issue 31, item 3, the Redis choice) on a real redis-server started here:
two replicas' handles see one level per bucket; takes are atomic under concurrency and may
leave a debt, never lose a take; refill runs on the Redis server's clock up to the burst;
idle buckets expire once full again; with Redis stopped, a SharedBucket limits per replica
and shares again once it is back; two pools' schedulers on one Redis let a tenant with a
burst of 3 through 3 times in all; the example server's config names Redis.

Needs Debian's ``redis-server`` (``scripts/setup-redis.sh``): skipped without it, except in
CI (``CI`` set), where that is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorapool import AdapterPool
from lorapool.errors import RateLimited
from lorapool.sampling import SamplingParams
from lorapool.scheduler import FairScheduler, TenantConfig, TierPolicy
from lorapool.scheduler.shared_limits import SharedBucket, share_rate_limits
from lorapool.server.config import ServerConfig
from lorapool.testing import MockBackend

from .postgres_server import wait_for
from .serving import free_port

redis = pytest.importorskip("redis")

from lorapool.scheduler.redis_limits import RedisBuckets  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class RedisServer:
    """One redis-server on loopback, without persistence; :meth:`stop` / :meth:`start`
    restart it on the same port (empty: nothing is saved)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server not found: run scripts/setup-redis.sh"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.binary = binary
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lorapool-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or start again) and wait until it answers PING."""
        log = open(self.root / "log", "ab")  # noqa: SIM115 (the server's, closed with it)
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), *options, "--dir", str(self.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            wait_for(up, timeout=20, step=0.02)
        finally:
            client.close()

    def log(self) -> str:
        """The server's output so far."""
        return (self.root / "log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the module's tests, stopped and removed after them (even on failure)."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def _ns() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def test_two_handles_share_each_bucket_and_no_take_is_lost(redis_server: RedisServer) -> None:
    ns = _ns()
    one = RedisBuckets(redis_server.url, namespace=ns)
    two = RedisBuckets(redis_server.url, namespace=ns)
    other = RedisBuckets(redis_server.url, namespace=_ns())
    try:
        slow = 1e-9  # per second: no refill within the test
        assert one.level("acme:requests", slow, 10) == 10  # never taken: full
        assert one.take("acme:requests", slow, 10, 4) == pytest.approx(6)
        assert two.level("acme:requests", slow, 10) == pytest.approx(6)
        assert two.level("globex:requests", slow, 10) == 10  # buckets are per key
        assert other.level("acme:requests", slow, 10) == 10  # and per namespace

        def hammer(handle: RedisBuckets) -> None:
            for _ in range(25):
                handle.take("acme:tokens", slow, 100, 1)

        threads = [threading.Thread(target=hammer, args=(h,)) for h in (one, two, one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert one.level("acme:tokens", slow, 100) == pytest.approx(0, abs=1e-3)
        assert two.take("acme:tokens", slow, 100, 5) == pytest.approx(-5, abs=1e-3)  # a debt
        assert one.level("acme:tokens", slow, 100) == pytest.approx(-5, abs=1e-3)
        client = redis.Redis.from_url(redis_server.url)
        assert sorted(client.keys(f"{ns}:*")) == [
            f"{ns}:bucket:acme:requests".encode(),
            f"{ns}:bucket:acme:tokens".encode(),
        ]
        client.close()
    finally:
        for handle in (one, two, other):
            handle.close()


def test_refill_runs_on_the_server_clock_up_to_the_burst(redis_server: RedisServer) -> None:
    store = RedisBuckets(redis_server.url, namespace=_ns())
    client = redis.Redis.from_url(redis_server.url)
    try:
        fast = 1000.0
        assert store.take("fast", fast, 3, 3) == pytest.approx(0, abs=1e-9)
        wait_for(lambda: store.level("fast", fast, 3) == 3)  # refilled, capped at the burst
        seconds, micros = client.time()
        now = seconds + micros / 1e6
        # Emptied 10 s ago by the server's clock, at 0.1 per second: 1 token now.
        client.hset(store.key("slow"), mapping={"tokens": 0, "stamp": now - 10})
        assert store.level("slow", 0.1, 5) == pytest.approx(1.0, abs=0.05)
        assert store.take("slow", 0.1, 5, 1) == pytest.approx(0.0, abs=0.05)
        # An hour of refill at 1 per second: capped at the burst (5), by both scripts.
        client.hset(store.key("capped"), mapping={"tokens": 2, "stamp": now - 3600})
        assert store.level("capped", 1.0, 5) == 5
        assert store.take("capped", 1.0, 5, 1) == pytest.approx(4, abs=1e-3)
        # A stamp ahead of the server's clock (it stepped back): no refill, no negative one.
        client.hset(store.key("ahead"), mapping={"tokens": 2, "stamp": now + 3600})
        assert store.level("ahead", 10.0, 5) == pytest.approx(2)
        assert store.take("ahead", 10.0, 5, 1) == pytest.approx(1)
    finally:
        store.close()
        client.close()


def test_idle_buckets_expire_once_full_again(redis_server: RedisServer) -> None:
    store = RedisBuckets(redis_server.url, namespace=_ns())
    capped = RedisBuckets(redis_server.url, namespace=_ns(), max_idle=0.2)
    client = redis.Redis.from_url(redis_server.url)
    try:
        store.take("fast", 1000.0, 3, 3)  # full again after 3 ms
        assert 0 < client.pttl(store.key("fast")) <= 4
        wait_for(lambda: not client.exists(store.key("fast")))
        assert store.level("fast", 1000.0, 3) == 3
        store.take("hour", 1.0, 3600, 1800)  # full again after 30 minutes
        assert 1_799_000 <= client.pttl(store.key("hour")) <= 1_800_001
        store.take("never", 1e-9, 10, 10)  # full again after centuries: kept max_idle
        assert 29 * 24 * 3600_000 < client.pttl(store.key("never")) <= 30 * 24 * 3600_000
        capped.take("never", 1e-9, 10, 10)
        assert capped.level("never", 1e-9, 10) == pytest.approx(0)
        wait_for(lambda: not client.exists(capped.key("never")))
        assert capped.level("never", 1e-9, 10) == 10  # forgotten: full
    finally:
        for c in (store, capped, client):
            c.close()


def test_bad_arguments_are_refused(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisBuckets("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="namespace"):
        RedisBuckets(redis_server.url, namespace="a b")
    store = RedisBuckets(redis_server.url, namespace=_ns())
    try:
        with pytest.raises(ValueError, match="rate"):
            store.level("k", 0, 3)
        with pytest.raises(ValueError, match="amount"):
            store.take("k", 1, 3, -1)
    finally:
        store.close()
    with pytest.raises(redis.exceptions.ConnectionError):
        RedisBuckets(f"redis://127.0.0.1:{free_port()}/0", timeout=1)  # nobody there


def test_a_stopped_server_limits_per_replica_then_shares_again(
    redis_server: RedisServer,
) -> None:
    ns = _ns()
    store = RedisBuckets(redis_server.url, namespace=ns, timeout=1, retry_after=0)
    paused = RedisBuckets(redis_server.url, namespace=ns, timeout=1, retry_after=3600)
    other = RedisBuckets(redis_server.url, namespace=ns, timeout=1)
    bucket = SharedBucket(store, "acme:requests", rate=1e-9, burst=3, clock=lambda: 0.0)
    try:
        assert bucket.try_take(1) and bucket.tokens == pytest.approx(2)
        assert paused.level("acme:requests", 1e-9, 3) == pytest.approx(2)
        redis_server.stop()
        assert bucket.wait_time(1) == 0  # the local bucket: 2 left there too
        bucket.try_take(1)
        assert bucket.tokens == pytest.approx(1)  # local
        with pytest.raises(redis.exceptions.ConnectionError):
            paused.level("acme:requests", 1e-9, 3)
    finally:
        redis_server.start()  # empty: nothing was saved
    try:
        # Shared again (the scripts are loaded again on their first call): another
        # replica's take is this bucket's level.
        assert other.take("acme:requests", 1e-9, 3, 2) == pytest.approx(1)
        assert bucket.tokens == pytest.approx(1)
        assert bucket.wait_time(2) > 1e6
        with pytest.raises(ConnectionError, match="a moment ago"):  # paused after the loss
            paused.level("acme:requests", 1e-9, 3)
    finally:
        for handle in (store, paused, other):
            handle.close()


def _scheduler(url: str, prefix: str) -> FairScheduler:
    policy = TierPolicy(requests_per_s=0.001, request_burst=3)
    scheduler = FairScheduler(
        tenants=TenantConfig(
            tiers={"limited": policy, "free": TierPolicy()},
            tenant_tiers={"globex": "limited"},
            default_tier="free",
        )
    )
    share_rate_limits(scheduler, RedisBuckets(url), prefix=prefix)
    return scheduler


async def _served(pools: list[AdapterPool], n: int, tenant: str = "globex") -> int:
    ok = 0
    for i in range(n):
        try:
            await pools[i % len(pools)].complete(
                "x", tenant=tenant, params=SamplingParams(max_tokens=1)
            )
            ok += 1
        except RateLimited as exc:
            assert exc.retry_after > 0
    return ok


async def test_two_replicas_share_one_burst_through_redis(redis_server: RedisServer) -> None:
    prefix = f"{_ns()}:"
    async with (
        AdapterPool(MockBackend(), scheduler=_scheduler(redis_server.url, prefix)) as one,
        AdapterPool(MockBackend(), scheduler=_scheduler(redis_server.url, prefix)) as two,
    ):
        assert await _served([one, two], 8) == 3  # per replica it would be 6
        assert await _served([one, two], 4, tenant="acme") == 4  # no limit
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.keys(f"lorapool:bucket:{prefix}*") == [
            f"lorapool:bucket:{prefix}globex:requests".encode()
        ]
    finally:
        client.close()


def test_the_example_server_config_names_redis(redis_server: RedisServer) -> None:
    tiers = {"limited": TierPolicy(requests_per_s=0.001, request_burst=3)}
    config = ServerConfig(
        rate_limits=redis_server.url, tiers=tiers, tenant_tiers={"globex": "limited"}
    )
    state = config.build_shared_scheduler()._admission.new_tenant("globex")
    assert isinstance(state.requests, SharedBucket)
    assert isinstance(state.requests.store, RedisBuckets)
    assert state.requests.store.url == redis_server.url
    state.requests.store.close()
    assert ServerConfig(rate_limits="rediss://cache.example:6380/1").rate_limits.startswith(
        "rediss://"
    )
    plain = ServerConfig(tiers=tiers, tenant_tiers={"globex": "limited"})
    local = plain.build_shared_scheduler()._admission.new_tenant("globex")
    assert not isinstance(local.requests, SharedBucket)  # "replica", the default
    with pytest.raises(ValueError, match="'memcached://x'"):
        ServerConfig(rate_limits="memcached://x")
    with pytest.raises(ValueError, match="rate_limits must be"):
        ServerConfig(rate_limits="redis:/cache")
    with pytest.raises(ValueError, match="needs a postgresql:// registry"):
        ServerConfig(rate_limits="shared")
