"""The benchmark's workload generators: parameters recovered from 10k samples; trace parsing."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest

from lorapool.bench.workload import (
    Lengths,
    gamma_arrivals,
    read_trace,
    slora_workload,
    zipf_weights,
)

ADAPTERS = [f"a{i}" for i in range(50)]


def _fit_zipf(counts: Counter[str], order: list[str], top: int) -> float:
    """Least-squares slope of log frequency on log rank over the ``top`` ranks."""
    xs = [math.log(i + 1) for i in range(top)]
    ys = [math.log(counts[order[i]]) for i in range(top)]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return -slope


@pytest.mark.parametrize(("rate", "cv"), [(5.0, 1.0), (5.0, 2.0), (20.0, 0.5)])
def test_gamma_arrivals_have_the_asked_rate_and_cv(rate: float, cv: float) -> None:
    times = gamma_arrivals(random.Random(1), rate=rate, cv=cv, duration=10_000 / rate)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 9_000 < len(gaps) < 11_000
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.08)


@pytest.mark.parametrize("alpha", [0.8, 1.2])
def test_power_law_popularity_recovers_alpha(alpha: float) -> None:
    reqs = slora_workload(seed=3, duration=1000, rate=10, adapters=ADAPTERS, alpha=alpha, tenants=5)
    assert 9_000 < len(reqs) < 11_000
    counts = Counter(r.adapter for r in reqs if r.adapter)
    assert _fit_zipf(counts, ADAPTERS, 10) == pytest.approx(alpha, abs=0.12)
    assert {r.tenant for r in reqs} == {f"t{k}" for k in range(5)}


def test_punica_patterns() -> None:
    common = {"seed": 2, "duration": 1000.0, "rate": 10.0, "adapters": ADAPTERS}
    identical = slora_workload(pattern="identical", **common)  # type: ignore[arg-type]
    assert {r.adapter for r in identical} == {"a0"}
    many = [f"d{i}" for i in range(20_000)]
    distinct = slora_workload(seed=2, duration=1000.0, rate=10.0, adapters=many, pattern="distinct")
    assert len({r.adapter for r in distinct}) == len(distinct)
    uniform = slora_workload(pattern="uniform", **common)  # type: ignore[arg-type]
    counts = Counter(r.adapter for r in uniform)
    expected = len(uniform) / len(ADAPTERS)
    assert all(abs(counts[a] - expected) < 0.25 * expected for a in ADAPTERS)
    skewed = slora_workload(pattern="skewed", **common)  # type: ignore[arg-type]
    assert _fit_zipf(Counter(r.adapter for r in skewed if r.adapter), ADAPTERS, 8) == (
        pytest.approx(1.5, abs=0.15)
    )


def test_lengths() -> None:
    rng = random.Random(4)
    logn = Lengths.parse("lognormal:256,0.5")
    xs = [logn.sample(rng) for _ in range(10_000)]
    assert statistics.fmean(xs) == pytest.approx(256, rel=0.03)
    assert statistics.pstdev(xs) / statistics.fmean(xs) == pytest.approx(0.5, rel=0.06)
    uni = Lengths.parse("uniform:8,64")
    ys = [uni.sample(rng) for _ in range(10_000)]
    assert min(ys) == 8 and max(ys) == 64
    assert statistics.fmean(ys) == pytest.approx(36, rel=0.03)
    assert Lengths.parse("fixed:7").sample(rng) == 7
    for bad in ("fixed", "uniform:9,3", "normal:1,2", "lognormal:x,1"):
        with pytest.raises(ValueError, match="length spec"):
            Lengths.parse(bad)


def test_a_seed_fixes_the_workload() -> None:
    def make(seed: int) -> list[object]:
        return list(
            slora_workload(
                seed=seed,
                duration=50,
                rate=4,
                cv=2,
                adapters=ADAPTERS,
                input_lengths=Lengths.parse("lognormal:100,1"),
            )
        )

    assert make(5) == make(5)
    assert make(5) != make(6)


def test_zipf_weights_sum_to_one() -> None:
    w = zipf_weights(10, 1.0)
    assert sum(w) == pytest.approx(1.0) and w == sorted(w, reverse=True)


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:47.5080230,879,46
2023-11-16 18:15:48.0000000,2,1
"""


def test_azure_trace_layout(tmp_path: Path) -> None:
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    path.write_text(AZURE)
    reqs = read_trace(path, adapters=["x", "y"])
    assert [r.input_tokens for r in reqs] == [374, 879, 2, 396]  # sorted by time
    assert [r.output_tokens for r in reqs] == [44, 46, 1, 109]
    assert reqs[0].at == 0.0
    assert reqs[1].at == pytest.approx(0.8274330, abs=1e-5)
    assert reqs[3].at == pytest.approx(4.314579, abs=1e-5)
    assert {r.adapter for r in reqs} == {"x", "y"} and {r.tenant for r in reqs} == {"trace"}
    fast = read_trace(path, speedup=2.0, limit=2)
    assert len(fast) == 2 and fast[1].at == pytest.approx(4.314579 / 2, abs=1e-5)
    assert all(r.adapter is None for r in fast)


def test_trace_with_adapter_and_tenant_columns_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "time,input_tokens,output_tokens,adapter,tenant\n1.5,10,5,acme/a,acme\n0.5,3,2,,b\n"
    )
    reqs = read_trace(path)
    assert [(r.at, r.adapter, r.tenant) for r in reqs] == [
        (0.0, None, "b"),
        (1.0, "acme/a", "acme"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,ten,5\n")
    with pytest.raises(ValueError, match="row 2"):
        read_trace(bad)
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="no column"):
        read_trace(nohead)
