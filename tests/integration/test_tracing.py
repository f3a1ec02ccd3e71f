"""OpenTelemetry spans of a real pool request (TorchBackend, the demo model, a real PEFT
adapter), exported to the SDK's InMemorySpanExporter; and nothing, not even the import
of opentelemetry, while tracing is off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from lorapool import AdapterPool, SamplingParams, tracing

PARAMS = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(tracer_provider=provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _parent(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


async def test_a_request_is_one_span_with_its_phases_nested_under_it(
    backend: Any, adapters: dict[str, Path], exporter: InMemorySpanExporter
) -> None:
    async with AdapterPool(backend) as pool:
        await pool.register("pirate", str(adapters["r8-attn"]), tenant="acme")
        done = await pool.complete("Hello", adapter="acme/pirate", tenant="acme", params=PARAMS)
        assert done.usage.completion_tokens >= 1
    spans = exporter.get_finished_spans()
    (root,) = _by_name(spans, "lorapool.request")
    assert root.parent is None
    assert root.attributes is not None
    assert root.attributes["lorapool.tenant"] == "acme"
    assert root.attributes["lorapool.adapter"] == "acme/pirate"
    assert root.attributes["lorapool.outcome"] == "finished"
    trace_id = root.context.trace_id if root.context else None
    phases = {}
    for name in (
        "lorapool.registry.resolve",
        "lorapool.scheduler.admit",
        "lorapool.store.acquire",
        "lorapool.backend.generate",
    ):
        (span,) = _by_name(spans, name)
        assert _parent(span) == _id(root), name
        assert span.context is not None and span.context.trace_id == trace_id
        assert span.attributes is not None and span.attributes["lorapool.tenant"] == "acme"
        assert span.attributes["lorapool.adapter"] == "acme/pirate"
        phases[name] = span
    # the adapter was not resident: a device load under the acquire, a host load under it
    loads = {s.attributes["lorapool.tier"]: s for s in _by_name(spans, "lorapool.store.load")}
    assert set(loads) >= {"device", "host"}
    assert _parent(loads["device"]) == _id(phases["lorapool.store.acquire"])
    assert _parent(loads["host"]) == _id(loads["device"])
    assert loads["device"].attributes is not None
    assert loads["device"].attributes["lorapool.adapter"] == "acme/pirate"
    # phases in order, within the request
    assert root.start_time is not None and root.end_time is not None
    for span in phases.values():
        assert span.start_time is not None and span.end_time is not None
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time


async def test_with_tracing_off_nothing_is_recorded(
    backend: Any, adapters: dict[str, Path]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(tracer_provider=provider)
    tracing.disable()
    assert not tracing.enabled()
    async with AdapterPool(backend) as pool:
        await pool.register("pirate", str(adapters["r8-attn"]), tenant="acme")
        await pool.complete("Hello", adapter="acme/pirate", tenant="acme", params=PARAMS)
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


def test_with_tracing_off_opentelemetry_is_not_imported() -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        from lorapool import AdapterPool, SamplingParams
        from lorapool.testing import MockBackend

        async def main():
            async with AdapterPool(MockBackend()) as pool:
                done = await pool.complete("hi there", tenant="acme", params=SamplingParams())
                assert done.text
        asyncio.run(main())
        leaked = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not leaked, leaked
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
