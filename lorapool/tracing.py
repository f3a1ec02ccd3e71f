"""OpenTelemetry spans for a request's phases: off by default, and free when off.

``lorapool.tracing.enable()`` (the ``otel`` extra: ``opentelemetry-api``) turns them on
for the process; :func:`disable` turns them off. Until then opentelemetry is not even
imported, and each hook below is one check of a global.

One generation request (``AdapterPool.generate``) is one span, ``lorapool.request``,
with the tenant and adapter asked for (``lorapool.tenant``, ``lorapool.adapter``) and,
at its end, ``lorapool.outcome`` (the audit's outcome). Its children, one per phase:

* ``lorapool.registry.resolve``: the adapter name to its registration (and version);
* ``lorapool.scheduler.admit``: admission and the wait in the queue for dispatch (again,
  ``lorapool.scheduler.requeue``, after a hand-off);
* ``lorapool.store.acquire``: making the adapter resident and taking a reference, with
  a ``lorapool.store.load`` child per tier filled (``lorapool.tier``: ``device``, then
  ``host`` under it, then ``disk``, a download, under that) when it was not resident;
* ``lorapool.backend.generate``: the engine's stream, from opening to closing it.

A load that other requests joined appears under the request that started it;
prefetches' loads are spans of their own (no request). The request span is never made
the *current* span (it outlives the phases and the chunks the generator yields, which
the server may read from another task); each phase is made current for its duration,
so spans opened below it (the store's) nest under it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["RequestSpan", "disable", "enable", "enabled", "request", "span"]

_tracer: Tracer | None = None

TENANT = "lorapool.tenant"
ADAPTER = "lorapool.adapter"
TIER = "lorapool.tier"
OUTCOME = "lorapool.outcome"


def enable(tracer_provider: Any = None) -> None:
    """Record spans from now on, with ``tracer_provider`` (``None``: the global one).

    The global provider is what ``opentelemetry.trace.set_tracer_provider`` or
    ``opentelemetry-instrument`` installed; without either it records nothing.
    Raises ``ImportError`` without the ``otel`` extra.
    """
    global _tracer
    from opentelemetry import trace

    from lorapool._version import __version__

    _tracer = trace.get_tracer("lorapool", __version__, tracer_provider=tracer_provider)


def disable() -> None:
    """Record no more spans (those open end as they would)."""
    global _tracer
    _tracer = None


def enabled() -> bool:
    """Whether spans are recorded."""
    return _tracer is not None


def _attributes(**values: object) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class RequestSpan:
    """The span of one request; its phases are children (see the module's docstring)."""

    def __init__(self, tracer: Tracer, span: Span, tenant: str, adapter: str | None) -> None:
        self._tracer = tracer
        self.span = span
        self._common = _attributes(**{TENANT: tenant, ADAPTER: adapter})
        self._ended = False

    @contextlib.contextmanager
    def phase(self, name: str, **attributes: object) -> Iterator[Span]:
        """A child span, current while the block runs (no ``yield`` of a generator in it)."""
        from opentelemetry import trace

        context = trace.set_span_in_context(self.span)
        with self._tracer.start_as_current_span(
            name, context=context, attributes={**self._common, **_attributes(**attributes)}
        ) as child:
            yield child

    def start(self, name: str, **attributes: object) -> Span:
        """A child span that is never current (it may span yields); end it with ``end()``."""
        from opentelemetry import trace

        return self._tracer.start_span(
            name,
            context=trace.set_span_in_context(self.span),
            attributes={**self._common, **_attributes(**attributes)},
        )

    def end(self, outcome: str) -> None:
        """The request ended with ``outcome``; later calls do nothing."""
        if self._ended:
            return
        self._ended = True
        self.span.set_attribute(OUTCOME, outcome)
        self.span.end()


def request(tenant: str, adapter: str | None) -> RequestSpan | None:
    """Start a request's span; ``None`` when tracing is off."""
    tracer = _tracer
    if tracer is None:
        return None
    root = tracer.start_span(
        "lorapool.request", attributes=_attributes(**{TENANT: tenant, ADAPTER: adapter})
    )
    return RequestSpan(tracer, root, tenant, adapter)


@contextlib.contextmanager
def phase(parent: RequestSpan | None, name: str, **attributes: object) -> Iterator[None]:
    """``parent.phase(name)``, or nothing when ``parent`` is ``None`` (tracing off)."""
    if parent is None:
        yield
        return
    with parent.phase(name, **attributes):
        yield


@contextlib.contextmanager
def span(name: str, **attributes: object) -> Iterator[None]:
    """A span under the current one (a phase's), current while the block runs; nothing
    when tracing is off. For the store's loads: ``span("lorapool.store.load", tier=...)``
    records the tier as ``lorapool.tier``."""
    tracer = _tracer
    if tracer is None:
        yield
        return
    named: dict[str, Any] = {f"lorapool.{k}": v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(name, attributes=named):
        yield
