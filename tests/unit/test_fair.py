"""FairScheduler on a manual clock: VTC shares, idle lift, buckets, shedding, affinity."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, FairScheduler, SamplingParams, TierPolicy
from lorapool.errors import (
    ColdStartRejected,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RateLimited,
)
from lorapool.scheduler import (
    AdmissionConfig,
    FairnessConfig,
    HandoffConfig,
    PlacesConfig,
    TenantConfig,
    Ticket,
)
from lorapool.testing import ManualClock, MockBackend

from .test_store import make_adapters

PROMPT, OUTPUT = 10, 20
IN_COST, OUT_COST = 1.0, 2.0
U = IN_COST * PROMPT + OUT_COST * OUTPUT  # the most service one request gets
_ids = itertools.count()


def ticket(tenant: str, adapter: str | None = None, **kw: object) -> Ticket:
    fields: dict[str, object] = {"prompt_tokens": PROMPT, "max_tokens": OUTPUT, **kw}
    return Ticket(f"r{next(_ids)}", tenant, adapter, **fields)  # type: ignore[arg-type]


class Harness:
    """Drives a scheduler like a pool with a fixed-rate engine: one request at a time."""

    def __init__(self, scheduler: FairScheduler, *, max_inflight: int = 1) -> None:
        self.s = scheduler
        self.resident: set[str] = set()
        self.slots = 2
        self.inflight: Counter[str] = Counter()
        scheduler.bind(
            max_inflight=max_inflight, can_dispatch=self._can, on_device=self.resident.__contains__
        )
        self.tasks: list[tuple[Ticket, asyncio.Task[None]]] = []
        self.served: Counter[str] = Counter()
        self.order: list[str] = []

    def _can(self, adapter: str | None, inflight: Mapping[str, int]) -> bool:
        return adapter is None or adapter in inflight or len(inflight) < self.slots

    async def submit(self, t: Ticket) -> asyncio.Task[None]:
        task = asyncio.create_task(self.s.acquire(t))
        self.tasks.append((t, task))
        await asyncio.sleep(0)
        return task

    async def serve(self, n: int) -> None:
        """Finish ``n`` dispatched requests in dispatch order, charging their output."""
        for _ in range(n):
            await asyncio.sleep(0)
            running = [t for t, task in self.tasks if t.dispatched and task.done()]
            assert running, "nothing is dispatched"
            t = running[0]
            self.s.charge(t, output_tokens=OUTPUT)
            self.served[t.tenant] += U
            self.order.append(t.tenant)
            self.s.release(t)
            self.tasks = [(x, k) for x, k in self.tasks if x is not t]

    async def close(self) -> None:
        for _, task in self.tasks:
            task.cancel()
        await asyncio.gather(*(k for _, k in self.tasks), return_exceptions=True)


def vtc(**fields: Any) -> FairnessConfig:
    """The counters' settings: these fields, and the test's costs."""
    return FairnessConfig(input_cost=IN_COST, output_cost=OUT_COST, **fields)


def fair(
    *,
    clock: ManualClock | None = None,
    tenants: TenantConfig | None = None,
    admission: AdmissionConfig | None = None,
    fairness: FairnessConfig | None = None,
    places: PlacesConfig | None = None,
    handoff: HandoffConfig | None = None,
) -> FairScheduler:
    """A FairScheduler on a manual clock, charging the test's costs (``vtc()``)."""
    return FairScheduler(
        tenants=tenants,
        admission=admission,
        fairness=fairness or vtc(),
        places=places,
        handoff=handoff,
        clock=clock or ManualClock(),
    )


async def test_backlogged_tenants_get_service_in_their_weight_ratio() -> None:
    h = Harness(fair(tenants=TenantConfig(tenant_weights={"a": 3.0, "b": 1.0})))
    for _ in range(300):
        await h.submit(ticket("a"))
        await h.submit(ticket("b"))
    for served in range(1, 201):
        await h.serve(1)
        # The bound (VTC, Sheng et al. '24): weighted service differs by at most 2U.
        assert abs(h.served["a"] / 3 - h.served["b"] / 1) <= 2 * U, (served, h.served)
    assert h.served["a"] / h.served["b"] == pytest.approx(3.0, rel=0.05)
    await h.close()


async def test_a_tenant_idle_for_an_hour_cannot_monopolise() -> None:
    clock = ManualClock()
    # max_wait out of the way: an hour of manual time would make busy's queue "starve".
    h = Harness(fair(clock=clock, fairness=vtc(max_wait=1e9)))
    for _ in range(100):
        await h.submit(ticket("busy"))
    await h.serve(50)  # busy's counter grows; idle's stays at 0
    clock.advance(3600)
    for _ in range(100):
        await h.submit(ticket("idle"))
    await h.serve(40)
    recent = Counter(h.order[-40:])
    # Lifted to busy's counter on return: the two alternate, within the 2U bound.
    assert recent["busy"] >= 18 and recent["idle"] >= 18, recent
    await h.close()


async def test_token_buckets_allow_the_burst_then_refuse_with_retry_after() -> None:
    clock = ManualClock()
    policy = TierPolicy(requests_per_s=2.0, request_burst=5, tokens_per_min=600, token_burst=150)
    h = Harness(fair(clock=clock, tenants=TenantConfig(tiers={"std": policy})), max_inflight=100)
    for _ in range(3):  # 3 x (10 + 20) = 90 tokens
        await h.submit(ticket("t"))
    with pytest.raises(RateLimited) as err:  # 4th: 120 > 150 - 90 left... 60 tokens left
        await h.s.acquire(ticket("t", max_tokens=OUTPUT * 3))  # needs 70
    assert err.value.retry_after == pytest.approx(10 / 10.0)  # 10 missing at 10 tokens/s
    await h.submit(ticket("t"))
    await h.submit(ticket("t"))  # 5 requests: the request burst is spent, tokens too
    with pytest.raises(RateLimited) as err:
        await h.s.acquire(ticket("t", prompt_tokens=0, max_tokens=1))
    assert err.value.retry_after == pytest.approx(0.5)  # one request token at 2/s
    clock.advance(0.5)
    await h.submit(ticket("t", prompt_tokens=0, max_tokens=1))
    assert all(task.done() and not task.exception() for _, task in h.tasks)
    with pytest.raises(InvalidRequest, match="token burst"):
        await h.s.acquire(ticket("t", max_tokens=1000))
    await h.close()


async def test_the_lowest_tier_is_shed_first() -> None:
    s = fair(
        tenants=TenantConfig(
            tiers={"gold": TierPolicy(), "free": TierPolicy()}, tenant_tiers={"g": "gold"}
        ),
        admission=AdmissionConfig(max_queue=3),
    )
    h = Harness(s)
    await h.submit(ticket("blocker"))  # dispatched, holds the only place
    free = [await h.submit(ticket(f"f{i}")) for i in range(3)]
    assert s.queued == 3
    gold = await h.submit(ticket("g"))
    await asyncio.sleep(0)
    assert isinstance(free[-1].exception(), Overloaded)  # the newest free request went
    assert not gold.done() and s.queued == 3 and s.shed == 1
    with pytest.raises(Overloaded) as err:  # a free request finds no lower tier to shed
        await s.acquire(ticket("f9"))
    assert err.value.retry_after > 0
    await h.serve(3)  # equal counters: arrival order among f0, f1 and g
    await asyncio.sleep(0)
    assert gold.done() and not gold.exception()
    assert not any(task.exception() for task in free[:2])
    await h.close()


async def test_per_tier_queue_cap() -> None:
    h = Harness(fair(tenants=TenantConfig(tiers={"free": TierPolicy(max_queue=2)})))
    await h.submit(ticket("x"))
    await h.submit(ticket("a"))
    await h.submit(ticket("b"))
    with pytest.raises(Overloaded, match="'free' tier's queue is full"):
        await h.s.acquire(ticket("c"))
    await h.close()


async def test_deadline_and_cancellation_leave_the_queue_uncharged() -> None:
    s = fair()
    h = Harness(s)
    await h.submit(ticket("x"))
    with pytest.raises(DeadlineExceeded):
        await s.acquire(ticket("late", timeout=0.02))
    assert s.queued == 0 and s.counter("late") == 0.0
    waiting = await h.submit(ticket("gone"))
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert s.queued == 0 and s.counter("gone") == 0.0
    with pytest.raises(DeadlineExceeded):
        await s.acquire(ticket("x", timeout=0))
    await h.close()


async def test_affinity_prefers_resident_adapters_within_the_slack() -> None:
    h = Harness(fair(fairness=vtc(affinity_slack=1000.0)), max_inflight=1)
    h.resident.add("warm")
    await h.submit(ticket("blocker"))
    await h.submit(ticket("cold-tenant", "cold"))
    await h.submit(ticket("warm-tenant", "warm"))
    await h.serve(1)
    await h.serve(1)
    assert h.order[1] == "warm-tenant" and h.s.affinity_picks == 1
    await h.close()


async def test_starvation_bound_overrides_affinity_and_counters() -> None:
    clock = ManualClock()
    h = Harness(fair(clock=clock, fairness=vtc(affinity_slack=1e9, max_wait=5.0)))
    h.resident.add("warm")
    await h.submit(ticket("blocker"))
    await h.submit(ticket("cold-tenant", "cold"))
    for _ in range(5):
        await h.submit(ticket("warm-tenant", "warm"))
    await h.serve(2)
    assert "cold-tenant" not in h.order  # affinity keeps choosing the warm adapter
    clock.advance(5.0)
    await h.serve(2)  # the first was dispatched before the clock moved
    assert h.order[-1] == "cold-tenant" and h.s.starvation_picks >= 1
    await h.close()


async def test_no_head_of_line_blocking_on_the_slot_bound() -> None:
    h = Harness(fair(), max_inflight=4)
    h.slots = 2
    for adapter in ("a1", "a2", "a3"):
        await h.submit(ticket(f"t-{adapter}", adapter))
    await h.submit(ticket("base-user"))
    dispatched = [t.tenant for t, _ in h.tasks if t.dispatched]
    # Two adapters fill the slots; the base-model request behind the third still runs.
    assert sorted(dispatched) == ["base-user", "t-a1", "t-a2"]
    await h.close()


# -- through the pool ------------------------------------------------------------------


async def test_cold_start_policies_and_usage(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 3)
    scheduler = FairScheduler(
        tenants=TenantConfig(
            tiers={
                "pro": TierPolicy(cold_start="reject"),
                "std": TierPolicy(cold_start="fallback"),
                "free": TierPolicy(cold_start="wait"),
            },
            tenant_tiers={"p": "pro", "s": "std"},
        )
    )
    async with AdapterPool(MockBackend(max_slots=4), scheduler=scheduler) as pool:
        for (name, path), tenant in zip(dirs.items(), ("p", "s", "f"), strict=True):
            await pool.register(name, str(path), tenant=tenant, shared=True)
        one = SamplingParams(max_tokens=2)
        with pytest.raises(ColdStartRejected) as err:
            await pool.complete("x", adapter="t/a0", tenant="p", params=one)
        assert err.value.retry_after > 0
        fallback = await pool.complete("x", adapter="t/a1", tenant="s", params=one)
        assert fallback.served_by == "base"
        waited = await pool.complete("x", adapter="t/a2", tenant="f", params=one)
        assert waited.served_by == "adapter"
        while pool.store._pending:  # the cold starts warmed the adapters in the background
            await asyncio.gather(*list(pool.store._pending))
        warm = await pool.complete("x", adapter="t/a0", tenant="p", params=one)
        assert warm.served_by == "adapter"
        assert (await pool.complete("x", adapter="t/a1", tenant="s", params=one)).served_by == (
            "adapter"
        )
        p, s = pool.usage("p"), pool.usage("s")
        assert (p.requests, p.refused, p.completed) == (2, 1, 1)
        assert (s.requests, s.fallbacks, s.completed) == (2, 1, 2)
        assert s.completion_tokens == 4 and s.prompt_tokens > 0
        assert pool.usage("nobody").requests == 0


async def test_rate_limited_requests_are_counted_and_served_later(tmp_path: Path) -> None:
    scheduler = FairScheduler(
        tenants=TenantConfig(tiers={"std": TierPolicy(requests_per_s=1.0, request_burst=2)})
    )
    async with AdapterPool(MockBackend(), scheduler=scheduler) as pool:
        one = SamplingParams(max_tokens=1)
        await pool.complete("x", tenant="t", params=one)
        await pool.complete("x", tenant="t", params=one)
        with pytest.raises(RateLimited) as err:
            await pool.complete("x", tenant="t", params=one)
        assert 0 < err.value.retry_after <= 1.0
        assert pool.usage("t").refused == 1 and pool.usage("t").completed == 2
        await pool.complete("x", tenant="other", params=one)  # other tenants are unaffected


async def _hot_adapters_run(tmp_path: Path, slack: float, max_wait: float) -> tuple[int, float]:
    """16 tenants, one hot adapter each, 4 device slots, 1008 requests from closed-loop
    clients (3 per tenant, one request at a time); returns (device loads, worst wait)."""
    import time

    root = tmp_path / f"slack{slack}-{max_wait}"
    root.mkdir()
    dirs = make_adapters(root, 16)
    scheduler = FairScheduler(fairness=FairnessConfig(affinity_slack=slack, max_wait=max_wait))
    backend = MockBackend(max_slots=4, max_batch=8, token_delay=0.003)
    worst = 0.0
    async with AdapterPool(backend, scheduler=scheduler) as pool:
        for i, (name, path) in enumerate(dirs.items()):
            await pool.register(name, str(path), tenant=f"tenant{i}")
        params = SamplingParams(max_tokens=2)

        async def client(i: int, name: str) -> None:
            nonlocal worst
            for _ in range(21):
                started = time.perf_counter()
                async for _ in pool.generate("x", adapter=name, tenant=f"tenant{i}", params=params):
                    worst = max(worst, time.perf_counter() - started)

        await asyncio.gather(*(client(i, name) for _ in range(3) for i, name in enumerate(dirs)))
        assert pool.stats.completed == 1008
        loads = pool.store.stats.device_loads
    return loads, worst


async def test_affinity_cuts_device_loads_and_the_starvation_bound_holds(tmp_path: Path) -> None:
    max_wait = 0.3
    without, _ = await _hot_adapters_run(tmp_path, slack=0.0, max_wait=max_wait)
    # Unlimited slack: only the starvation bound stops warm adapters from starving cold ones.
    with_affinity, worst = await _hot_adapters_run(tmp_path, slack=1e9, max_wait=max_wait)
    assert with_affinity < without, (with_affinity, without)
    # No request waits more than max_wait behind affinity choices, plus one turnover of a
    # batch row (a few 3 ms tokens). Without the bound the worst wait here is ~0.8 s.
    assert worst <= max_wait + 0.25, worst


async def test_a_returning_tenant_wins_the_tie_at_the_lifted_counter() -> None:
    h = Harness(fair(fairness=vtc(max_wait=1e9), places=PlacesConfig(headroom=0)), max_inflight=3)
    await h.submit(ticket("x"))
    for _ in range(5):
        await h.submit(ticket("busy"))  # two run, three wait
    await h.submit(ticket("back"))  # lifted to busy's counter: a tie
    assert h.s.counter("back") == h.s.counter("busy")
    await h.serve(1)  # x finishes; the freed place goes to the tenant with less in flight
    assert [t.tenant for t, _ in h.tasks if t.dispatched].count("back") == 1
    await h.close()


async def _finish(h: Harness, t: Ticket) -> None:
    """Finish one dispatched request, charging its output, and let the scheduler react."""
    h.s.charge(t, output_tokens=OUTPUT)
    h.s.release(t)
    h.tasks = [(x, k) for x, k in h.tasks if x is not t]
    await asyncio.sleep(0)


def _dispatched(h: Harness, tenant: str) -> list[Ticket]:
    return [t for t, _ in h.tasks if t.dispatched and t.tenant == tenant]


@pytest.mark.parametrize("credit", [512.0, 0.0])
async def test_a_light_tenant_with_a_request_running_keeps_its_lead_up_to_the_credit(
    credit: float,
) -> None:
    h = Harness(
        fair(fairness=vtc(max_wait=1e9, credit=credit), places=PlacesConfig(headroom=0)),
        max_inflight=2,
    )
    await h.submit(ticket("busy"))
    running = ticket("light")
    await h.submit(running)  # light keeps this one running throughout
    for _ in range(50):
        await h.submit(ticket("busy"))
    for _ in range(20):  # busy's counter climbs by U per request, light's stays put
        await _finish(h, _dispatched(h, "busy")[0])
    assert h.s.counter("busy") - h.s.counter("light") > credit
    for _ in range(6):
        await h.submit(ticket("light"))  # a burst; light's queue was empty
    lead = h.s.counter("busy") - h.s.counter("light")
    assert lead == pytest.approx(credit, abs=1e-9)  # kept exactly the credit, no more
    order = []
    for _ in range(8):  # who gets the place that keeps turning over
        cycling = [t for t, _ in h.tasks if t.dispatched and t is not running]
        await _finish(h, cycling[0])
        order.append(next(t.tenant for t, _ in h.tasks if t.dispatched and t is not running))
    if credit:
        # 512 of lead buys 512 / U = 10 requests: the whole burst of 6 goes first.
        assert order[:6] == ["light"] * 6, order
    else:
        # Lifted to busy's counter: light and busy alternate.
        assert 2 <= order[:6].count("light") <= 4, order
    await h.close()


async def test_a_fully_idle_tenant_gets_no_credit() -> None:
    h = Harness(
        fair(fairness=vtc(max_wait=1e9, credit=512.0), places=PlacesConfig(headroom=0)),
        max_inflight=1,
    )
    for _ in range(30):
        await h.submit(ticket("busy"))
    await h.serve(20)
    await h.submit(ticket("back"))  # nothing queued or running: lifted all the way
    assert h.s.counter("back") == h.s.counter("busy")
    await h.close()


@pytest.mark.parametrize("pace", [0.2, 0.0])
async def test_tenants_over_their_share_of_places_are_paced(pace: float) -> None:
    import time

    h = Harness(
        FairScheduler(
            fairness=FairnessConfig(max_wait=1e9), places=PlacesConfig(pace=pace, headroom=0)
        ),
        max_inflight=8,
    )
    await h.submit(ticket("light"))
    for _ in range(7):
        await h.submit(ticket("heavy"))
    # Two tenants present: a share is 4 places. Heavy gets 4 at once and, being then at its
    # share, one more (the first paced dispatch goes at once) ...
    if not pace:
        assert len(_dispatched(h, "heavy")) == 7
        await h.close()
        return
    assert len(_dispatched(h, "heavy")) == 5
    await h.submit(ticket("light"))  # below its share: not paced
    assert len(_dispatched(h, "light")) == 2
    # ... and its last place one pace later, with nothing released in between (a timer).
    start = time.monotonic()
    while len(_dispatched(h, "heavy")) < 6:
        assert time.monotonic() - start < 10, "pacing never let the next request go"
        await asyncio.sleep(0.01)
    assert time.monotonic() - start >= pace * 0.9
    await h.close()
