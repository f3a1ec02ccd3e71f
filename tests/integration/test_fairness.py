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
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from lorapool import AdapterPool, FairScheduler, SamplingParams
from lorapool.scheduling import FCFSScheduler, Scheduler

pytestmark = pytest.mark.slow

QUIET = ("q1", "q2", "q3")
RATE = 1.0  # requests/s of each quiet tenant; the noisy one sends 10x
DURATION = 10.0
SEEDS = (1, 2, 3)
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def arrivals(noisy: bool, seed: int = 7) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    out = []
    for tenant in (*QUIET, "noisy") if noisy else QUIET:
        rate = RATE * (10 if tenant == "noisy" else 1)
        at = rng.expovariate(rate)
        while at < DURATION:
            out.append((at, tenant))
            at += rng.expovariate(rate)
    return sorted(out)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[round(0.99 * (len(ordered) - 1))]


async def quiet_ttft(model_dir: Path, scheduler: Scheduler, noisy: bool, seed: int) -> list[float]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=2, max_rank=16, max_batch=8, max_seq_len=128)
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

        await asyncio.gather(*(one(at, tenant) for at, tenant in arrivals(noisy, seed)))
    return ttft


async def test_quiet_tenants_keep_their_ttft_under_fair_scheduling(model_dir: Path) -> None:
    baseline: list[float] = []
    fair: list[float] = []
    for seed in SEEDS:  # alternating, so a slow spell of the machine hits both sides
        baseline += await quiet_ttft(model_dir, FairScheduler(), noisy=False, seed=seed)
        fair += await quiet_ttft(model_dir, FairScheduler(), noisy=True, seed=seed)
    fcfs = await quiet_ttft(model_dir, FCFSScheduler(), noisy=True, seed=SEEDS[0])
    base99, fair99, fcfs99 = p99(baseline), p99(fair), p99(fcfs)
    print(
        f"quiet p99 TTFT over {len(fair)} requests: baseline {base99:.3f}s, "
        f"fair {fair99:.3f}s ({fair99 / base99:.2f}x); FCFS {fcfs99:.3f}s"
    )
    assert len(baseline) == len(fair) >= 70, "the traces should hold about 90 quiet requests"
    assert fcfs99 > 4 * base99, ("the flood should blow up FCFS latency", base99, fcfs99)
    assert fair99 <= 1.5 * base99, ("fair scheduling should keep the quiet p99", base99, fair99)
