"""Eval-gated promotion and the automatic canary rollback on the real model (issue 29).

SmolLM2 on TorchBackend with the trained demo adapters (examples/train_adapter.py:
``pirate`` talks like a pirate, ``caps`` shouts): the pirate adapter's own weights
registered again as a new version answer like the baseline and are promoted, with the
gate's scores in the registry; ``caps`` registered as a new version of ``pirate`` is
refused with a report whose scores show why, the alias unchanged. A canary whose answers
get low feedback, or whose requests fail (its weights spoiled), is rolled back by the pool
within its window, with an audit entry and the metric; a good canary is not. ``lorapool
promote`` over the same call, as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.errors import PromotionRefused
from lorapool.lifecycle import CanaryPolicy, EvalCase, Gate, UserScorer
from lorapool.types import Completion

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0)
QUESTIONS = [
    "What is the weather like today?",
    "How do I reset my password?",
    "What is a good name for a dog?",
    "How far away is the moon?",
    "Recommend a good book.",
    "Can you suggest a fun weekend activity?",
]


@pytest.fixture(scope="module")
def demo_adapters() -> dict[str, Path]:
    """The trained demo adapters (pirate, french, caps), trained once and cached."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train_adapter import ensure_demo_adapters
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return ensure_demo_adapters()


def talks_like_a_pirate(case: EvalCase, answer: Completion) -> float:
    """1 when the answer sounds like the pirate persona."""
    text = answer.text.lower()
    return float(any(w in text for w in ("arr", "matey", "ye ", "yo ho")))


def pirate_gate() -> Gate:
    cases = [
        EvalCase([{"role": "user", "content": q}], params=PARAMS, id=f"q{i}")
        for i, q in enumerate(QUESTIONS)
    ]
    return Gate(
        cases,
        name="pirate-persona",
        scorers=["exact_match", UserScorer("pirate", talks_like_a_pirate)],
    )


@pytest.fixture
async def pool(
    model_dir: Path, demo_adapters: dict[str, Path], tmp_path: Path
) -> AsyncIterator[AdapterPool]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=4, max_rank=16, max_batch=16, max_seq_len=256)
    store = TieredStore(host_bytes="256MiB", disk_dir=tmp_path / "disk")
    async with AdapterPool(backend, store=store) as p:
        await p.register("pirate", str(demo_adapters["pirate"]), tenant="acme", version="v1")
        yield p


async def test_a_candidate_that_answers_like_the_baseline_is_promoted(
    pool: AdapterPool, demo_adapters: dict[str, Path]
) -> None:
    # the same weights, registered as a new version
    await pool.register(
        "pirate", str(demo_adapters["pirate"]), tenant="acme", version="v2", activate=False
    )
    gate = pirate_gate()
    progress: list[tuple[int, int]] = []
    done = await pool.promote(
        "pirate",
        "v2",
        tenant="acme",
        gate=gate,
        on_progress=lambda d, t: progress.append((d, t)),
        actor="ci",
    )
    report = done.report
    assert report is not None and report.passed, report.format() if report else None
    assert report.scores["exact_match"].candidate == 1.0
    assert report.scores["pirate"].baseline == report.scores["pirate"].candidate
    assert report.scores["pirate"].baseline >= 0.5  # the baseline does talk like a pirate
    assert progress[-1] == (len(QUESTIONS), len(QUESTIONS))
    assert pool.registry.alias("acme/pirate", None).traffic == {"v2": 100.0}
    # the registry holds the scores, the baseline and the gate
    (v2,) = [i for i in pool.versions("pirate", tenant="acme") if i.adapter_id.endswith("@v2")]
    assert v2.metadata.eval_scores == report.candidate_scores
    assert v2.metadata.baseline_version == "v1" and v2.metadata.gate == gate.identity
    assert v2.metadata.promoted_at == done.promoted_at
    (entry,) = pool.audit.entries(action="promote")
    assert entry.adapter == "acme/pirate@v2" and entry.actor == "ci"
    assert entry.detail["gate"] == gate.identity and entry.detail["automatic"] is False
    # the answers now come from v2
    answer = await pool.complete(
        [{"role": "user", "content": QUESTIONS[0]}], adapter="pirate", tenant="acme", params=PARAMS
    )
    assert answer.text == report.cases[0].candidate_text


async def test_caps_as_a_new_version_of_pirate_is_refused_with_its_scores(
    pool: AdapterPool, demo_adapters: dict[str, Path]
) -> None:
    await pool.register(
        "pirate", str(demo_adapters["caps"]), tenant="acme", version="v2", activate=False
    )
    with pytest.raises(PromotionRefused) as refused:
        await pool.promote("pirate", "v2", tenant="acme", gate=pirate_gate())
    report = refused.value.report
    assert refused.value.adapter == "acme/pirate@v2"
    assert not report.passed
    # the scores say why: the candidate neither answers like v1 nor like a pirate
    exact, pirate = report.scores["exact_match"], report.scores["pirate"]
    assert exact.baseline == 1.0 and exact.candidate < 0.5 and not exact.passed
    assert pirate.candidate < pirate.baseline and not pirate.passed
    assert "exact_match regressed" in refused.value.reason
    shouted = [c.candidate_text for c in report.cases]
    assert sum(t.upper() == t for t in shouted if t.strip()) >= len(shouted) // 2, shouted
    # nothing moved, nothing recorded as promoted
    assert pool.registry.alias("acme/pirate", None).traffic == {"v1": 100.0}
    v2 = pool.registry.resolve("acme/pirate@v2", None)
    assert v2.metadata.promoted_at is None and dict(v2.metadata.eval_scores) == {}
    (entry,) = pool.audit.entries(action="promotion_refused")
    assert entry.adapter == "acme/pirate@v2"
    assert entry.detail["scores"]["exact_match"]["passed"] is False
    assert pool.audit.entries(action="promote") == []


async def _canary_traffic(pool: AdapterPool, rounds: int) -> dict[str, list[float]]:
    """Send ``rounds`` batches of questions to the alias, score each answer's pirate
    speech as feedback; stop early once the alias is back on v1 alone. Returns the
    feedback sent, by the version that answered."""
    sent: dict[str, list[float]] = {}
    for r in range(rounds):
        if pool.registry.alias("acme/pirate", None).traffic == {"v1": 100.0}:
            break
        ids = [f"round{r}-{i}" for i in range(len(QUESTIONS))]
        answers = await asyncio.gather(
            *(
                pool.complete(
                    [{"role": "user", "content": q}],
                    adapter="pirate",
                    tenant="acme",
                    params=PARAMS,
                    request_id=rid,
                )
                for q, rid in zip(QUESTIONS, ids, strict=True)
            )
        )
        for rid, answer in zip(ids, answers, strict=True):
            score = talks_like_a_pirate(EvalCase("-"), answer)
            version = pool.registry.resolve("pirate", "acme", request_id=rid).adapter_id
            if pool.feedback(rid, score, tenant="acme"):
                sent.setdefault(version, []).append(score)
    return sent


POLICY = CanaryPolicy(window=50, min_samples=6, min_feedback=6, max_quality_drop=0.3)


async def test_a_canary_with_low_feedback_is_rolled_back_within_the_window(
    pool: AdapterPool, demo_adapters: dict[str, Path]
) -> None:
    from lorapool.server.metrics import ServerMetrics

    await pool.register(
        "pirate", str(demo_adapters["caps"]), tenant="acme", version="v2", activate=False
    )
    await pool.promote("pirate", "v2", tenant="acme", canary=50, canary_policy=POLICY)
    assert pool.registry.alias("acme/pirate", None).traffic == {"v1": 50.0, "v2": 50.0}
    sent = await asyncio.wait_for(_canary_traffic(pool, rounds=8), timeout=900)  # hang guard
    assert pool.registry.alias("acme/pirate", None).traffic == {"v1": 100.0}
    assert len(sent["acme/pirate@v2"]) <= POLICY.window
    (entry,) = pool.audit.entries(action="rollback")
    assert entry.adapter == "acme/pirate@v2" and entry.detail["automatic"] is True
    assert "mean feedback" in entry.detail["reason"]
    numbers = entry.detail["numbers"]
    assert numbers["candidate_quality"] < numbers["stable_quality"] - POLICY.max_quality_drop
    assert pool.canary.rollbacks == {"acme/pirate": 1} and pool.canary.canaries == {}
    text = ServerMetrics(pool).render().decode()
    assert 'lorapool_canary_rollbacks_total{adapter="acme/pirate"} 1.0' in text


async def test_a_good_canary_is_not_rolled_back(
    pool: AdapterPool, demo_adapters: dict[str, Path]
) -> None:
    await pool.register(
        "pirate", str(demo_adapters["pirate"]), tenant="acme", version="v2", activate=False
    )
    await pool.promote("pirate", "v2", tenant="acme", canary=50, canary_policy=POLICY)
    sent = await asyncio.wait_for(_canary_traffic(pool, rounds=4), timeout=900)  # hang guard
    # both sides got enough feedback to be judged, and were judged alike
    assert len(sent["acme/pirate@v2"]) >= POLICY.min_feedback, sent
    assert len(sent["acme/pirate@v1"]) >= POLICY.min_feedback, sent
    assert pool.registry.alias("acme/pirate", None).traffic == {"v1": 50.0, "v2": 50.0}
    assert pool.audit.entries(action="rollback") == []
    watched = pool.canary.canaries["acme/pirate"]
    numbers = watched.numbers(0.0)
    assert numbers["candidate_samples"] >= POLICY.min_samples
    assert numbers["candidate_error_rate"] == 0.0
    assert pool.canary.rollbacks == {}


def _config(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        "[backend]\n"
        'kind = "torch"\n'
        f"model = {json.dumps(str(model_dir))}\n"
        "max_slots = 4\nmax_rank = 16\nmax_batch = 16\n"
        "options = { max_seq_len = 256 }\n"
        "[store]\n"
        f"disk_dir = {json.dumps(str(tmp_path / 'server-disk'))}\n"
        'host_bytes = "256MiB"\n'
        "[keys]\n"
        '"sk-acme" = { tenant = "acme" }\n'
    )
    return path


def _promote_cli(config: Path, version: str, cases: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [
            *(sys.executable, "-m", "lorapool", "promote", str(config), "pirate", version),
            *("--tenant", "acme", "--cases", str(cases), "--gate-name", "cli-gate"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,  # a hang guard
        check=False,
    )


async def test_the_promote_cli_refuses_and_promotes(
    model_dir: Path, demo_adapters: dict[str, Path], tmp_path: Path
) -> None:
    from lorapool.server.config import load_config

    config = _config(tmp_path, model_dir)
    async with load_config(config).build_pool() as pool:
        for version, persona in (("v1", "pirate"), ("v2", "caps"), ("v3", "pirate")):
            await pool.register(
                "pirate",
                str(demo_adapters[persona]),
                tenant="acme",
                version=version,
                activate=version == "v1",
            )
    cases = tmp_path / "cases.jsonl"
    cases.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}], "params": {"max_tokens": 24}})
            + "\n"
            for q in QUESTIONS[:4]
        )
    )
    refused = await asyncio.to_thread(_promote_cli, config, "v2", cases)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "REFUSED acme/pirate@v2" in refused.stdout and "FAILED" in refused.stdout
    assert "exact_match" in refused.stdout and "REGRESSED" in refused.stdout
    assert "4/4" in refused.stderr  # tqdm's progress
    promoted = await asyncio.to_thread(_promote_cli, config, "v3", cases)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert "PROMOTED acme/pirate@v3" in promoted.stdout and "PASSED" in promoted.stdout
    async with load_config(config).build_pool() as pool:
        assert pool.registry.alias("acme/pirate", None).traffic == {"v3": 100.0}
        v3 = pool.registry.resolve("acme/pirate@v3", None)
        assert v3.metadata.eval_scores == {"exact_match": 1.0}
        assert v3.metadata.gate is not None and v3.metadata.gate.startswith("cli-gate@")
        assert pool.registry.resolve("acme/pirate@v2", None).metadata.promoted_at is None


async def test_a_canary_whose_requests_fail_is_rolled_back(
    pool: AdapterPool, demo_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from lorapool.errors import LoadError

    source = tmp_path / "caps-copy"
    shutil.copytree(demo_adapters["caps"], source)
    await pool.register("pirate", str(source), tenant="acme", version="v2", activate=False)
    await pool.promote("pirate", "v2", tenant="acme", canary=50, canary_policy=POLICY)
    # v2 leaves memory and its weights go bad where they are kept: its next loads fail the
    # store's sha256 check
    await pool.unload("acme/pirate@v2", tenant=None)
    weights = source / "adapter_model.safetensors"  # a local source is read in place
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    failed = served = 0
    for i in range(40):
        if pool.registry.alias("acme/pirate", None).traffic == {"v1": 100.0}:
            break
        try:
            await pool.complete(
                QUESTIONS[i % len(QUESTIONS)],
                adapter="pirate",
                tenant="acme",
                params=PARAMS,
                request_id=f"fail-{i}",
            )
            served += 1
        except LoadError:
            failed += 1
    assert pool.registry.alias("acme/pirate", None).traffic == {"v1": 100.0}
    assert failed == POLICY.min_samples and served > 0  # judged as soon as it may be
    (entry,) = pool.audit.entries(action="rollback")
    assert entry.adapter == "acme/pirate@v2" and entry.detail["automatic"] is True
    assert "error rate 1.000" in entry.detail["reason"]
    assert pool.canary.rollbacks == {"acme/pirate": 1}
