"""PostgresBuckets (issue 31, item 3) on a real PostgreSQL server: two replicas'
handles see one level per bucket; takes are atomic under concurrency and may leave a
debt, never lose a take; refill runs on the database's clock up to the burst; with the
database stopped, a SharedBucket limits per replica and shares again once it is back."""

from __future__ import annotations

import threading

import pytest

from lorapool.scheduler.shared_limits import PostgresBuckets, SharedBucket

from .postgres_server import PostgresServer, fresh_schema, postgres, wait_for

__all__ = ["postgres"]

pytestmark = pytest.mark.timeout(120)


def test_two_handles_share_each_bucket_and_no_take_is_lost(postgres: PostgresServer) -> None:
    schema = fresh_schema()
    one = PostgresBuckets(postgres.dsn, schema=schema)
    two = PostgresBuckets(postgres.dsn, schema=schema)
    try:
        slow = 1e-9  # per second: no refill within the test
        assert one.level("acme:requests", slow, 10) == 10  # never taken: full
        assert one.take("acme:requests", slow, 10, 4) == pytest.approx(6)
        assert two.level("acme:requests", slow, 10) == pytest.approx(6)
        assert two.level("globex:requests", slow, 10) == 10  # buckets are per key

        def hammer(handle: PostgresBuckets) -> None:
            for _ in range(25):
                handle.take("acme:tokens", slow, 100, 1)

        threads = [threading.Thread(target=hammer, args=(h,)) for h in (one, two, one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert one.level("acme:tokens", slow, 100) == pytest.approx(0, abs=1e-3)
        assert two.take("acme:tokens", slow, 100, 5) == pytest.approx(-5, abs=1e-3)  # a debt
        fast = 1000.0
        two.take("fast", fast, 3, 3)
        wait_for(lambda: one.level("fast", fast, 3) == 3)  # refilled, capped at the burst
    finally:
        one.close()
        two.close()


def test_a_stopped_database_limits_per_replica_then_shares_again(
    postgres: PostgresServer,
) -> None:
    schema = fresh_schema()
    store = PostgresBuckets(postgres.dsn, schema=schema, connect_timeout=1)
    bucket = SharedBucket(store, "acme:requests", rate=1e-9, burst=3, clock=lambda: 0.0)
    try:
        assert bucket.try_take(1) and bucket.tokens == pytest.approx(2)
        postgres.stop("fast")
        assert bucket.wait_time(1) == 0  # the local bucket: 2 left there too
        bucket.try_take(1)
        assert bucket.tokens == pytest.approx(1)  # local
    finally:
        postgres.start()
    store._retry_at = 0.0  # skip the reconnect pause (RETRY_AFTER) the outage set
    assert bucket.tokens == pytest.approx(2)  # shared again: the outage's take stayed local
    store.close()
