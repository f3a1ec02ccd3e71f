"""Registry, FCFS scheduler, store residency and the pool's paths, over MockBackend."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import (
    AccessDenied,
    AdapterNotFound,
    InvalidRequest,
    LoadError,
    PinLimitExceeded,
)
from lorapool.scheduler import FCFSScheduler, Ticket
from lorapool.store import parse_size
from lorapool.testing import MockBackend
from lorapool.types import GenerationRequest

from .test_formats_peft import make_dir


@pytest.fixture
def adapter_dirs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for i in range(6):
        d = tmp_path / f"a{i}"
        d.mkdir()
        out[f"t/a{i}"] = make_dir(d, {"lora_alpha": 8 + i})
    return out


async def _pool(backend: MockBackend, dirs: dict[str, Path]) -> AdapterPool:
    pool = AdapterPool(backend)
    await pool.start()
    for name, path in dirs.items():
        await pool.register(name, str(path), tenant="t")
    return pool


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_sampling_params_validation() -> None:
    assert SamplingParams(stop="END").stop == ("END",)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(bogus=1)  # type: ignore[call-arg]


async def test_concurrent_misses_share_one_load(adapter_dirs: dict[str, Path]) -> None:
    backend = MockBackend(max_slots=2, max_batch=64)
    pool = await _pool(backend, adapter_dirs)
    outs = await asyncio.gather(
        *(
            pool.complete("x", adapter="t/a0", tenant="t", params=SamplingParams(max_tokens=3))
            for _ in range(50)
        )
    )
    assert len(outs) == 50
    assert backend.loads == [("t/a0", 0)]
    assert pool.store.stats.host_loads == 1
    assert pool.store.refs("t/a0") == 0


async def test_never_more_distinct_adapters_in_flight_than_slots(
    adapter_dirs: dict[str, Path],
) -> None:
    peak = 0

    def handler(request: GenerationRequest) -> list[str]:
        return ["x"] * 3

    backend = MockBackend(handler, max_slots=2, max_batch=16, token_delay=0.001)
    pool = await _pool(backend, adapter_dirs)

    async def one(name: str) -> None:
        nonlocal peak
        async for _chunk in pool.generate("p", adapter=name, tenant="t"):
            peak = max(peak, sum(1 for n in adapter_dirs if pool.store.refs(n) > 0))

    await asyncio.gather(*(one(f"t/a{i % 6}") for i in range(60)))
    assert peak <= 2
    assert all(pool.store.refs(n) == 0 for n in adapter_dirs)
    assert len(pool.store.resident) <= 2


async def test_failed_load_fails_only_its_requests(adapter_dirs: dict[str, Path]) -> None:
    backend = MockBackend(max_slots=2, fail_loads={"t/a1"})
    pool = await _pool(backend, adapter_dirs)
    await pool.complete("x", adapter="t/a0", tenant="t")
    resident = dict(pool.store.resident)
    results = await asyncio.gather(
        pool.complete("x", adapter="t/a1", tenant="t"),
        pool.complete("x", adapter="t/a0", tenant="t"),
        return_exceptions=True,
    )
    assert isinstance(results[0], LoadError) and results[0].tier == "device"
    assert not isinstance(results[1], BaseException)
    assert pool.store.resident == resident
    assert pool.store.refs("t/a1") == 0


async def test_changed_files_fail_sha256(adapter_dirs: dict[str, Path]) -> None:
    backend = MockBackend()
    pool = await _pool(backend, adapter_dirs)
    path = adapter_dirs["t/a2"] / "adapter_config.json"
    path.write_text(path.read_text().replace('"r": 4', '"r": 4 '))
    with pytest.raises(LoadError, match="sha256"):
        await pool.complete("x", adapter="t/a2", tenant="t")
    assert not pool.store.on_host("t/a2")


async def test_pins_are_capped_and_never_evicted(adapter_dirs: dict[str, Path]) -> None:
    backend = MockBackend(max_slots=3)
    pool = await _pool(backend, adapter_dirs)
    await pool.pin("t/a0", tenant="t")
    await pool.pin("t/a1", tenant="t")
    with pytest.raises(PinLimitExceeded, match="at most 2"):
        await pool.pin("t/a2", tenant="t")
    for i in range(2, 6):
        await pool.complete("x", adapter=f"t/a{i}", tenant="t")
    assert {"t/a0", "t/a1"} <= set(pool.store.resident)
    await pool.unpin("t/a0", tenant="t")
    await pool.complete("x", adapter="t/a2", tenant="t")
    await pool.complete("x", adapter="t/a3", tenant="t")
    assert "t/a0" not in pool.store.resident


async def test_tenancy(adapter_dirs: dict[str, Path]) -> None:
    pool = AdapterPool(MockBackend())
    await pool.register("acme/a", str(adapter_dirs["t/a0"]), tenant="acme")
    await pool.register("shared/b", str(adapter_dirs["t/a1"]), tenant="platform", shared=True)
    with pytest.raises(AdapterNotFound):  # another tenant's: exactly like a missing one
        await pool.complete("x", adapter="acme/a", tenant="globex")
    # A shared adapter answers to its name without the owner's prefix, and to its full id.
    assert (await pool.complete("x", adapter="shared/b", tenant="globex")).text
    assert (await pool.complete("x", adapter="platform/shared/b", tenant="globex")).text
    assert [a.adapter_id for a in pool.list_adapters(tenant="globex")] == ["platform/shared/b"]
    with pytest.raises(AccessDenied):  # it may use it, not change it
        await pool.unregister("shared/b", tenant="globex")
    with pytest.raises(AdapterNotFound):
        await pool.unregister("nope", tenant="acme")
    with pytest.raises(InvalidRequest, match="adapter id"):
        await pool.register("bad id!", str(adapter_dirs["t/a2"]), tenant="acme")
    await pool.aclose()
    await pool.aclose()


async def test_fcfs_dispatches_in_arrival_order() -> None:
    sched = FCFSScheduler()
    sched.bind(max_inflight=1, can_dispatch=lambda a, inflight: True)
    order: list[str] = []

    async def go(name: str) -> None:
        t = Ticket(name, "t", None)
        await sched.acquire(t)
        order.append(name)
        await asyncio.sleep(0.001)
        sched.release(t)

    await asyncio.gather(*(go(f"r{i}") for i in range(10)))
    assert order == [f"r{i}" for i in range(10)]
    assert sched.inflight == 0


async def test_cancelled_wait_leaves_queue() -> None:
    sched = FCFSScheduler()
    sched.bind(max_inflight=1, can_dispatch=lambda a, inflight: True)
    first = Ticket("a", "t", None)
    await sched.acquire(first)
    waiter = asyncio.create_task(sched.acquire(Ticket("b", "t", None)))
    await asyncio.sleep(0)
    assert sched.queued == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert sched.queued == 0
    sched.release(first)
    assert sched.inflight == 0
