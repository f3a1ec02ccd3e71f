"""The server's ``lorapool_tokens_total`` is the pool's ledger, read at scrape time: a stream
the caller left counts the tokens it was billed, exactly as ``pool.usage(tenant)`` says; what
the app adds to ``ServerMetrics.tokens`` is not exported twice."""

from __future__ import annotations

import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.server.metrics import ServerMetrics
from lorapool.testing import MockBackend

prometheus = pytest.importorskip("prometheus_client.parser")


def tokens(metrics: ServerMetrics) -> dict[tuple[str, str], float]:
    """``lorapool_tokens_total`` by (tenant, direction)."""
    return {
        (s.labels["tenant"], s.labels["direction"]): s.value
        for family in prometheus.text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name == "lorapool_tokens_total"
    }


async def test_tokens_total_is_the_ledger_on_every_exit_path() -> None:
    pool = AdapterPool(MockBackend())
    metrics = ServerMetrics(pool)
    assert tokens(metrics) == {}
    done = await pool.complete("finished", tenant="acme", params=SamplingParams(max_tokens=3))
    stream = pool.generate("left early", tenant="globex", params=SamplingParams(max_tokens=50))
    received = [await stream.__anext__() for _ in range(4)]
    await stream.aclose()
    # What the app adds from a stream's last chunk goes nowhere: the ledger already has it.
    metrics.tokens.labels("acme", "out").inc(done.usage.completion_tokens)
    acme, globex = pool.usage("acme"), pool.usage("globex")
    assert globex.completion_tokens == len(received) and globex.prompt_tokens > 0
    assert tokens(metrics) == {
        ("acme", "in"): acme.prompt_tokens,
        ("acme", "out"): acme.completion_tokens,
        ("globex", "in"): globex.prompt_tokens,
        ("globex", "out"): globex.completion_tokens,
    }
    await pool.aclose()
