"""The prefix cache in the server: usage's cached tokens (OpenAI's
``prompt_tokens_details.cached_tokens``) and the metric families of docs/metrics.md."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("prometheus_client")

from lorapool import AdapterPool
from lorapool.server.metrics import ServerMetrics
from lorapool.server.responses import usage_dict
from lorapool.testing import MockBackend
from lorapool.types import Capabilities, PrefixCacheStats, Usage


@dataclasses.dataclass
class _Caching(MockBackend):
    stats: PrefixCacheStats | None = None

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, prefix_cache=True)

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return self.stats


def test_usage_says_how_many_prompt_tokens_came_from_the_cache() -> None:
    assert usage_dict(Usage(10, 2, cached_tokens=8)) == {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert usage_dict(Usage(10, 2)) == {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
    }


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_hit_and_prompt_tokens_by_tier_and_the_cache_s_bytes() -> None:
    backend = _Caching(stats=PrefixCacheStats(cached_bytes=4096, cached_blocks=2, evictions=3))
    async with AdapterPool(backend) as pool:
        metrics = ServerMetrics(pool)
        for tier, usage in (("gold", Usage(100, 5, 64)), ("gold", Usage(20, 1)), ("free", None)):
            request = metrics.begin(tier, "t", None)
            request.finish("ok", served_by="base", fallback=False, usage=usage)
        samples = _samples(metrics)
        assert samples[("lorapool_prompt_tokens_total", (("tier", "gold"),))] == 120
        assert samples[("lorapool_prefix_cache_hit_tokens_total", (("tier", "gold"),))] == 64
        assert ("lorapool_prompt_tokens_total", (("tier", "free"),)) not in samples  # no usage
        assert samples[("lorapool_prefix_cache_bytes", ())] == 4096
        assert samples[("lorapool_prefix_cache_evictions_total", ())] == 3
        backend.stats = None  # a backend that counts nothing now: no family, not a zero
        assert ("lorapool_prefix_cache_bytes", ()) not in _samples(metrics)


async def test_a_backend_without_a_prefix_cache_exports_no_cache_family() -> None:
    async with AdapterPool(MockBackend()) as pool:
        metrics = ServerMetrics(pool)
        assert ("lorapool_prefix_cache_bytes", ()) not in _samples(metrics)
