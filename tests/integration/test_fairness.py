"""Noisy neighbour on the real model: FCFS lets one tenant's flood delay everyone; the
FairScheduler keeps the quiet tenants' time to first token within 1.5x of their baseline.

Seeded arrival traces run on one TorchBackend configuration: the three quiet tenants
alone (baseline), and with a fourth tenant sending ten times each one's rate, under the
FairScheduler and (first seed only) under FCFS. Only ratios between the runs are asserted,
never absolute times.

The issue's target is asserted on the quiet requests of three seeds pooled, about 90 a
side, so the p99 is the second slowest rather than the slowest: with one seed (about 30
requests) the p99 is the maximum, and one stall of this shared 2-core machine moves it by
100-300 ms. Baseline and noisy runs alternate seed by seed, so a slow spell of the machine
falls on both. Measured on 2026-11-23 with the engine's double-pause fix (08a74f5): one
seed at a time 0.4-1.6x (0.8-7.1x before it); this test, three seeds pooled, 0.83-1.30x in
ten runs. FCFS reaches 50-100x. Requests
are 24 tokens long so that the flood keeps the engine overloaded: with 12 (before the base
projections moved to oneDNN and got about 2x faster) FCFS reached only 8-9x the baseline.

The load follows the machine (2026-12-05): all four tenants together offer what the engine
serves in a closed-loop burst measured first (``capacity``), and each seed lasts long enough
for about 30 quiet requests. Until then the rate was fixed at 1 request/s per quiet tenant,
which on the machines of November (quiet baseline p99 43-53 ms) was about the engine's
capacity; on the slower machine of 2026-12-05 (baseline 71-77 ms, about 200 tok/s in the
burst) the same rate offered 1.56x what it serves, and the quiet p99 under FairScheduler was
10.8x the baseline with the code of 2026-11-23 and with today's alike (the queue of an
engine that cannot keep up, not a scheduling choice). At a capacity-relative rate the
offered load is ``LOAD`` (0.9) of the burst's tokens/s: at 1.0 two clean-clone runs gave 1.32x
and 1.51x (the engine then queues for whole bursts, and the p99 of 91 requests moves with the
machine's noise); at about 0.94 one run gave 1.08x with FCFS still at 15x the baseline.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, FairScheduler, SamplingParams
from lorapool.scheduler import FCFSScheduler, Scheduler

pytestmark = pytest.mark.slow

QUIET = ("q1", "q2", "q3")
NOISY_FACTOR = 10  # the noisy tenant sends 10x each quiet tenant's rate
QUIET_PER_SEED = 10  # requests of each quiet tenant per seed, on average
LOAD = 0.9  # offered tokens/s over what the engine serves in a closed-loop burst
SEEDS = (1, 2, 3)
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def arrivals(noisy: bool, seed: int, quiet_rate: float) -> list[tuple[float, str]]:
    """Poisson arrivals per tenant over ``QUIET_PER_SEED / quiet_rate`` seconds."""
    rng = random.Random(seed)
    out = []
    duration = QUIET_PER_SEED / quiet_rate
    for tenant in (*QUIET, "noisy") if noisy else QUIET:
        rate = quiet_rate * (NOISY_FACTOR if tenant == "noisy" else 1)
        at = rng.expovariate(rate)
        while at < duration:
            out.append((at, tenant))
            at += rng.expovariate(rate)
    return sorted(out)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[round(0.99 * (len(ordered) - 1))]


def engine(model_dir: Path) -> Any:
    from lorapool.backends.torch import TorchBackend

    return TorchBackend(model_dir, max_slots=2, max_rank=16, max_batch=8, max_seq_len=128)


async def capacity(model_dir: Path) -> float:
    """Tokens/s the engine serves to a closed-loop burst of 32 requests (after a warm-up)."""
    async with AdapterPool(engine(model_dir)) as pool:
        await pool.complete("warm up", tenant="warmup", params=PARAMS)
        started = time.perf_counter()
        done = await asyncio.gather(
            *(pool.complete(f"Tell q about {i}", tenant="t", params=PARAMS) for i in range(32))
        )
        return sum(len(c.token_ids) for c in done) / (time.perf_counter() - started)


async def quiet_ttft(
    model_dir: Path, scheduler: Scheduler, noisy: bool, seed: int, quiet_rate: float
) -> list[float]:
    backend = engine(model_dir)
    ttft: list[float] = []
    async with AdapterPool(backend, scheduler=scheduler) as pool:
        await pool.complete("warm up", tenant="warmup", params=PARAMS)
        start = time.perf_counter()

        async def one(at: float, tenant: str) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            sent = time.perf_counter()
            first: float | None = None
            async for _ in pool.generate(
                f"Tell {tenant} about {at:.3f}", tenant=tenant, params=PARAMS
            ):
                if first is None:
                    first = time.perf_counter() - sent
            assert first is not None
            if tenant in QUIET:
                ttft.append(first)

        trace = arrivals(noisy, seed, quiet_rate)
        await asyncio.gather(*(one(at, tenant) for at, tenant in trace))
    return ttft


async def test_quiet_tenants_keep_their_ttft_under_fair_scheduling(model_dir: Path) -> None:
    served = await capacity(model_dir)
    # All four tenants together offer 0.9 of what the engine serves: saturated in bursts.
    rate = LOAD * served / ((len(QUIET) + NOISY_FACTOR) * PARAMS.max_tokens)
    baseline: list[float] = []
    fair: list[float] = []
    for seed in SEEDS:  # alternating, so a slow spell of the machine hits both sides
        baseline += await quiet_ttft(model_dir, FairScheduler(), False, seed, rate)
        fair += await quiet_ttft(model_dir, FairScheduler(), True, seed, rate)
    fcfs = await quiet_ttft(model_dir, FCFSScheduler(), True, SEEDS[0], rate)
    base99, fair99, fcfs99 = p99(baseline), p99(fair), p99(fcfs)
    print(
        f"engine {served:.0f} tok/s, quiet tenants {rate:.2f} req/s each; "
        f"quiet p99 TTFT over {len(fair)} requests: baseline {base99:.3f}s, "
        f"fair {fair99:.3f}s ({fair99 / base99:.2f}x); FCFS {fcfs99:.3f}s"
    )
    assert len(baseline) == len(fair) >= 70, "the traces should hold about 90 quiet requests"
    assert fcfs99 > 4 * base99, ("the flood should blow up FCFS latency", base99, fcfs99)
    assert fair99 <= 1.5 * base99, ("fair scheduling should keep the quiet p99", base99, fair99)
