"""One request's life in the pool, from its ticket to its bill.

:meth:`Lifecycle.run` takes a request whose adapter the registry has resolved and:

1. counts it for its tenant, and applies the tenant's cold-start policy when the
   adapter is not on the device (wait for it, serve from the base model meanwhile,
   or refuse);
2. gives it a :class:`~lorapool.scheduler.Ticket` and waits for the scheduler to
   dispatch it (or to refuse it);
3. runs it in legs: a reference on the adapter's slot from the store, the backend's
   stream (through a :class:`Relay` when the scheduler may hand the slot to another
   adapter), each token charged to the tenant as it streams. A leg handed off gives
   its place back, queues again (resumed) and goes on from the tokens streamed, in
   the same stream for the caller;
4. whatever way it ends (its last chunk, an error, a caller that stops reading, a
   cancelled task): closes the backend's stream, releases the store's reference and
   the scheduler's place, and bills the tenant once for what was produced
   (:class:`Ledger`, :class:`TenantUsage`), writing one line of the audit of usage
   (:class:`UsageRecord`, logger ``lorapool.usage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from lorapool import tracing
from lorapool.abc import Backend
from lorapool.errors import ColdStartRejected, DeadlineExceeded, Overloaded, RateLimited
from lorapool.scheduler import Scheduler, Ticket
from lorapool.store import TieredStore
from lorapool.tools import prompt_tools
from lorapool.types import (
    AdapterInfo,
    Chunk,
    FinishReason,
    GenerationRequest,
    Message,
    Prompt,
    SamplingParams,
    Usage,
)

__all__ = [
    "AUDIT_LOGGER",
    "Ledger",
    "Lifecycle",
    "Outcome",
    "PoolStats",
    "Relay",
    "TenantUsage",
    "UsageRecord",
    "cache_scope",
    "estimate_tokens",
]

log = logging.getLogger(__name__)

# -- usage -------------------------------------------------------------------------------

Outcome = Literal[
    "finished",
    "handed_off",
    "cancelled",
    "preempted-then-cancelled",
    "error",
    "refused",
    "expired",
]
"""How a request ended, as its :class:`UsageRecord` says.

``finished``: the engine's last chunk came. ``handed_off``: a hand-off stopped it on its
last token (it has all its output; the engine's count never came). ``cancelled``: the
caller left (stopped reading, closed the stream, its task was cancelled), in the queue or
while streaming; ``preempted-then-cancelled``: the same, after the scheduler had paused
it at least once. ``error``: an error ended it (the backend's, the store's).
``refused``: rate limits, queue caps, shedding or the cold-start policy refused it;
``expired``: its deadline passed in the queue. The last two never reached the engine.
"""

AUDIT_LOGGER = "lorapool.usage"
"""The logger of the audit of usage: one record per request, see :class:`UsageRecord`."""

_audit = logging.getLogger(AUDIT_LOGGER)


@dataclass(frozen=True)
class UsageRecord:
    """What one request was billed, and how it ended: one line of the audit of usage.

    The :class:`Ledger` adds it to the totals and logs it on the logger
    ``lorapool.usage`` (:data:`AUDIT_LOGGER`, level INFO), its fields as the log
    record's attributes. ``adapter``: the adapter that served it (``None``: the base
    model, also when ``fallback`` served it while its adapter loaded). ``handoffs``:
    times it was stopped for another adapter's slot and resumed; ``preemptions``: times
    the scheduler paused it for another request.
    """

    request_id: str
    tenant: str
    adapter: str | None
    outcome: Outcome
    prompt_tokens: int
    completion_tokens: int
    handoffs: int = 0
    preemptions: int = 0
    fallback: bool = False
    ttft: float | None = None
    """Seconds from the request's arrival to its first chunk (``None``: none came)."""


@dataclass
class _Totals:
    """Counts of requests by how they ended, and the tokens billed."""

    requests: int = 0
    completed: int = 0
    failed: int = 0
    refused: int = 0
    expired: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, record: UsageRecord) -> None:
        """Count an ended request and its tokens."""
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        match record.outcome:
            case "finished" | "handed_off":
                self.completed += 1
            case "refused":
                self.refused += 1
            case "expired":
                self.expired += 1
            case _:
                self.failed += 1


@dataclass
class TenantUsage(_Totals):
    """One tenant's totals: what it asked for, what it got, what it was refused.

    Every request ends in one of ``completed`` (its whole output: ``finished`` or
    ``handed_off``), ``failed`` (``cancelled``, ``preempted-then-cancelled``,
    ``error``), ``refused`` (rate-limited, shed or cold-start-rejected) and ``expired``
    (its deadline passed in the queue); ``requests`` also counts those still running.
    ``fallbacks``: requests served by the base model while their adapter loaded;
    ``queue_seconds``: total time requests waited for dispatch.

    ``prompt_tokens`` and ``completion_tokens`` are billed however a request ends
    (see :class:`Ledger`): every token the engine produced for it, and its prompt
    once the engine has worked on it.
    """

    fallbacks: int = 0
    queue_seconds: float = 0.0


@dataclass
class PoolStats(_Totals):
    """Totals since the pool started, over all tenants (:meth:`by_tenant`: each one's)."""

    _accounts: dict[str, TenantUsage] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def by_tenant(self) -> dict[str, TenantUsage]:
        """A copy of every tenant's totals, by tenant (safe to call from another thread)."""
        return {t: dataclasses.replace(u) for t, u in list(self._accounts.items())}


def cache_scope(tenant: str) -> str:
    """The prefix-cache scope of ``tenant``'s requests: an opaque digest, so an engine
    keeps each tenant's cached prompts apart without ever seeing a tenant's name."""
    return hashlib.sha256(b"lorapool-cache-scope\0" + tenant.encode()).hexdigest()[:32]


def estimate_tokens(prompt: str | Sequence[Message]) -> int:
    """A cheap prompt-token estimate for admission (about 4 characters a token; a chat
    prompt's messages, their tool calls and the tools it carries)."""
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    tools = sum(len(json.dumps(t, default=str)) for t in prompt_tools(prompt)) // 4
    messages = sum(
        (len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or ""))) // 4 + 4
        for m in prompt
    )
    return messages + tools + 1


class Ledger:
    """The pool's :class:`PoolStats` and a :class:`TenantUsage` per tenant: the bill.

    The single source of truth for usage: ``pool.usage(tenant)``, the server's
    ``lorapool_tokens_total`` and the audit log (:data:`AUDIT_LOGGER`) all come from
    it. :class:`Lifecycle` opens an account entry when a request arrives and closes it
    once, with a :class:`UsageRecord`, whatever way the request ends:

    * the engine's count when its last chunk came (``finished``);
    * otherwise, once the engine produced a first chunk for it (its prompt was
      prefilled), its prompt tokens as the backend's tokenizer counts them (the ids
      the engine prefilled; the estimate charged to the scheduler where the backend
      has no tokenizer) and every token streamed from the engine, over all legs;
    * nothing for a request that ended before its first chunk: refused, expired,
      cancelled in the queue, failed before the engine produced anything.
    """

    def __init__(self) -> None:
        self.stats = PoolStats()
        self._tenants = self.stats._accounts
        self.observers: list[Callable[[UsageRecord], None]] = []
        """Called with each request's record once it is billed (the pool's canary watch);
        an observer's error is logged, never raised into the request."""

    def open(self, tenant: str) -> TenantUsage:
        """Count a new request of ``tenant``; returns the tenant's account to charge."""
        account = self._tenants.setdefault(tenant, TenantUsage())
        account.requests += 1
        self.stats.requests += 1
        return account

    def close(self, account: TenantUsage, record: UsageRecord) -> None:
        """Bill a request that ended, once, and write its line of the audit."""
        self.stats.add(record)
        account.add(record)
        _audit.info(
            "request %s tenant=%s adapter=%s outcome=%s prompt_tokens=%d completion_tokens=%d",
            record.request_id,
            record.tenant,
            record.adapter,
            record.outcome,
            record.prompt_tokens,
            record.completion_tokens,
            extra=dataclasses.asdict(record),
        )
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                log.exception("a usage observer failed on request %s", record.request_id)

    def usage(self, tenant: str) -> TenantUsage:
        """A copy of the tenant's totals (zeros for a tenant never seen)."""
        return dataclasses.replace(self._tenants.get(tenant, TenantUsage()))


# -- the backend's stream ----------------------------------------------------------------


async def _close_stream(stream: AsyncIterator[Chunk]) -> None:
    """Close a backend's stream now, which cancels its request in the engine.

    ``Backend.generate`` returns an async iterator whose closing cancels the request;
    every backend's is an async generator, closed with its ``aclose``. Closing now,
    rather than when the stream is garbage collected, frees the engine's place as soon
    as the caller leaves. An iterator that is not an async generator cannot be closed
    and is left to end by itself.
    """
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()


class Relay:
    """A backend stream, read by a task of its own so that a hand-off can stop it.

    Iterating the relay yields the backend's chunks. :meth:`hand_off` closes the
    backend's stream (the engine drops the request) while the caller keeps
    iterating: the chunks already produced still come, then the iteration ends
    with :attr:`handed_off` set. Errors of the backend's stream are raised to the
    caller as they are. :meth:`aclose` stops the stream (the caller left).
    """

    def __init__(self, stream: AsyncIterator[Chunk]) -> None:
        self.handed_off = False
        self._stream = stream
        self._queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        end: Exception | None = None
        try:
            async for chunk in self._stream:
                self._queue.put_nowait(chunk)
        except asyncio.CancelledError:
            if not self.handed_off:
                raise
        except Exception as exc:  # handed to the reader, raised there
            end = exc
        finally:
            # The reader's last item goes first: closing the stream may itself be cut short.
            self._queue.put_nowait(end)
            with contextlib.suppress(Exception):
                await _close_stream(self._stream)

    def hand_off(self) -> bool:
        """Stop the backend's stream for a hand-off; False if it has already ended."""
        if self._task.done() or self.handed_off:
            return False
        self.handed_off = True
        self._task.cancel()
        return True

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> Chunk:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop the backend's stream (if it still runs) and wait until it is closed."""
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait([self._task])  # never raises: a cancel of the caller still does


# -- the lifecycle -----------------------------------------------------------------------


@runtime_checkable
class _Tokenizes(Protocol):
    """A backend that tokenizes prompts as its engine does (``BaseBackend.encode``)."""

    def encode(self, prompt: Prompt) -> list[int]: ...


@dataclass
class _Output:
    """What one request has produced so far, over all its legs."""

    estimate: int  # the prompt's estimated tokens, charged to the tenant at dispatch
    streamed: list[int] = field(default_factory=list)  # token ids the caller received
    usage: Usage | None = None  # the engine's count, with the last chunk
    finish: FinishReason | None = None
    started: bool = False  # the engine produced a chunk: it has prefilled the prompt
    tickets: list[Ticket] = field(default_factory=list)  # one per leg dispatched or queued
    opened_at: float = field(default_factory=time.monotonic)  # the request's arrival
    ttft: float | None = None  # seconds from arrival to the first chunk

    @property
    def legs(self) -> int:
        return len(self.tickets)

    @property
    def pauses(self) -> int:
        return sum(t.pauses for t in self.tickets)


class Lifecycle:
    """Runs the pool's requests over its backend, store and scheduler, and bills them.

    The pool makes one and calls :meth:`run` for each request; :meth:`bind_handoff`
    lets the scheduler stop running requests so that their adapter's slot goes to
    another (for backends that can resume a request from its output).
    """

    def __init__(
        self, backend: Backend, store: TieredStore, scheduler: Scheduler, ledger: Ledger
    ) -> None:
        self.backend = backend
        self.store = store
        self.scheduler = scheduler
        self.ledger = ledger
        self._handoffs = False
        self._relays: dict[str, Relay] = {}  # streams a hand-off can stop, by request id
        self._encode = backend.encode if isinstance(backend, _Tokenizes) else None

    def bind_handoff(self) -> None:
        """Give the scheduler :meth:`hand_off`; requests for adapters then run through a relay."""
        self.scheduler.bind_handoff(self.hand_off)
        self._handoffs = True

    def hand_off(self, request_id: str) -> bool:
        """Stop a running request so its adapter's slot can go to another.

        The request queues again and goes on from its output (:meth:`run`). False
        when it is not streaming through a relay now.
        """
        relay = self._relays.get(request_id)
        return relay is not None and relay.hand_off()

    async def run(
        self,
        request_id: str,
        prompt: Prompt,
        info: AdapterInfo | None,
        *,
        tenant: str,
        params: SamplingParams,
        deadline: float | None = None,
        tools: tuple[Mapping[str, Any], ...] = (),
        span: tracing.RequestSpan | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Serve one request with ``info``'s adapter (``None``: the base model) and stream it.

        ``deadline``: seconds the request may wait for dispatch. ``tools``: the OpenAI
        definitions the backend renders the prompt with (``GenerationRequest.tools``).
        ``span``: the request's trace span (:mod:`lorapool.tracing`), given its phases as
        children and ended here with the outcome.
        Raises what the cold-start policy, the scheduler, the store or the backend raise; the
        request's ticket, reference and bill are settled before it propagates, and
        the ledger writes its line of the audit (:class:`UsageRecord`).
        """
        account = self.ledger.open(tenant)
        out = _Output(estimate=estimate_tokens(prompt))
        served = info
        ticket: Ticket | None = None  # the leg's ticket, once dispatched
        outcome: Outcome = "finished"
        try:
            served = self._cold_start(info, tenant, account)
            if span is not None and info is not None and served is None:
                span.span.set_attribute("lorapool.fallback", True)
            pending = Ticket(
                request_id,
                tenant,
                None if served is None else served.adapter_id,
                prompt_tokens=out.estimate,
                max_tokens=params.max_tokens * params.n,
                timeout=deadline,
            )
            with tracing.phase(span, "lorapool.scheduler.admit"):
                await self._admit(pending, account, out)
            ticket = pending
            while True:
                slot = None
                if served is not None:
                    with tracing.phase(span, "lorapool.store.acquire"):
                        slot = await self.store.acquire(served)
                try:
                    stream = self._open(ticket, prompt, params, slot, out, tools)
                    leg = None if span is None else span.start("lorapool.backend.generate")
                    try:
                        async for chunk in stream:
                            self._charge(ticket, chunk, out)
                            yield chunk
                    finally:
                        await self._close(request_id, stream)
                        if leg is not None:
                            leg.end()
                finally:
                    if served is not None:
                        self.store.release(served.adapter_id)
                if not self._goes_on(stream, params, out):
                    break
                with tracing.phase(span, "lorapool.scheduler.requeue"):
                    ticket = await self._requeue(ticket, params, out)
            if out.usage is None and self._handed_off(stream):
                outcome = "handed_off"  # stopped on its last token
        except BaseException as exc:
            outcome = _outcome(exc, dispatched=ticket is not None, paused=out.pauses > 0)
            raise
        finally:
            if ticket is not None:
                if served is not None:
                    self.store.request_done(served)
                self.scheduler.release(ticket)
            self.ledger.close(
                account, self._record(request_id, tenant, info, served, out, prompt, outcome)
            )
            if span is not None:
                span.end(outcome)

    def _record(
        self,
        request_id: str,
        tenant: str,
        info: AdapterInfo | None,
        served: AdapterInfo | None,
        out: _Output,
        prompt: Prompt,
        outcome: Outcome,
    ) -> UsageRecord:
        """The request's bill: see :class:`Ledger` for what each way of ending is billed."""
        if out.usage is not None:
            prompt_tokens, completion_tokens = out.usage.prompt_tokens, out.usage.completion_tokens
        elif out.started:
            prompt_tokens, completion_tokens = self._prompt_tokens(prompt, out), len(out.streamed)
        else:
            prompt_tokens = completion_tokens = 0
        return UsageRecord(
            request_id,
            tenant,
            None if served is None else served.adapter_id,
            outcome,
            prompt_tokens,
            completion_tokens,
            handoffs=max(out.legs - 1, 0),
            preemptions=out.pauses,
            fallback=info is not None and served is None,
            ttft=out.ttft,
        )

    def _prompt_tokens(self, prompt: Prompt, out: _Output) -> int:
        """The prompt's tokens for a request whose engine count never came: the backend's
        tokenizer's (the ids its engine prefilled), else the estimate the scheduler was charged."""
        if self._encode is not None:
            try:
                return len(self._encode(prompt))
            except Exception as exc:  # no tokenizer (a remote server, a test double)
                log.debug("prompt tokens estimated: the backend cannot count them (%s)", exc)
        return out.estimate

    def _cold_start(
        self, info: AdapterInfo | None, tenant: str, account: TenantUsage
    ) -> AdapterInfo | None:
        """The adapter to serve with: ``info``, or ``None`` when the tenant's policy falls
        back to the base model while the adapter loads. Raises ``ColdStartRejected`` when
        the policy refuses to wait (the adapter loads all the same, for the retry)."""
        if info is None or self.store.on_device(info.adapter_id):
            return info
        policy = self.scheduler.cold_start(tenant)
        if policy == "wait":
            return info
        self.store.load_for(info)
        if policy == "reject":
            raise ColdStartRejected(
                f"adapter {info.adapter_id!r} is not loaded (tenant {tenant!r} rejects "
                "cold starts); it is being loaded now",
                retry_after=self.store.stats.load_seconds,
            )
        account.fallbacks += 1
        return None

    async def _admit(self, ticket: Ticket, account: TenantUsage, out: _Output) -> None:
        """Wait for the scheduler to dispatch the ticket; count its queue time."""
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        out.tickets.append(ticket)
        await self.scheduler.acquire(ticket)
        account.queue_seconds += loop.time() - queued_at

    def _open(
        self,
        ticket: Ticket,
        prompt: Prompt,
        params: SamplingParams,
        slot: int | None,
        out: _Output,
        tools: tuple[Mapping[str, Any], ...] = (),
    ) -> AsyncIterator[Chunk]:
        """Start a leg in the backend: the request, going on after what was streamed."""
        rid = ticket.request_id
        leg_id = rid if out.legs == 1 else f"{rid}.{out.legs - 1}"
        request = GenerationRequest(
            leg_id,
            prompt,
            params,
            ticket.adapter_id,
            slot,
            tuple(out.streamed),
            tools,
            cache_scope=cache_scope(ticket.tenant),
        )
        stream = self.backend.generate(request)
        # A request of several samples is not handed off: resuming is per sequence.
        if self._handoffs and ticket.adapter_id is not None and params.n == 1:
            stream = self._relays[rid] = Relay(stream)
        return stream

    def _charge(self, ticket: Ticket, chunk: Chunk, out: _Output) -> None:
        """Record a chunk and charge the tenant's service: its tokens, the prompt's count."""
        if not out.started:
            out.ttft = time.monotonic() - out.opened_at
        out.started = True
        if chunk.token_ids:
            ticket.output_tokens += len(chunk.token_ids)
            out.streamed.extend(chunk.token_ids)
            self.scheduler.charge(ticket, output_tokens=len(chunk.token_ids))
        if chunk.usage is not None:
            out.usage, out.finish = chunk.usage, chunk.finish_reason
            # The estimate was charged at dispatch; the engine's count corrects it.
            self.scheduler.charge(ticket, input_tokens=chunk.usage.prompt_tokens - out.estimate)

    async def _close(self, request_id: str, stream: AsyncIterator[Chunk]) -> None:
        """End a leg's stream now, so the engine drops the request as soon as the caller left."""
        if isinstance(stream, Relay):
            self._relays.pop(request_id, None)
            await stream.aclose()
        else:
            await _close_stream(stream)

    @staticmethod
    def _handed_off(stream: AsyncIterator[Chunk]) -> bool:
        """Whether the leg that ended was stopped by a hand-off."""
        return isinstance(stream, Relay) and stream.handed_off

    @classmethod
    def _goes_on(cls, stream: AsyncIterator[Chunk], params: SamplingParams, out: _Output) -> bool:
        """Whether the leg that ended was handed off with output still to produce."""
        # A leg stopped on its last token is done.
        return (
            cls._handed_off(stream) and out.usage is None and len(out.streamed) < params.max_tokens
        )

    async def _requeue(self, ticket: Ticket, params: SamplingParams, out: _Output) -> Ticket:
        """Give a handed-off request's place back and wait for a new one (resumed)."""
        self.scheduler.release(ticket)
        ticket = Ticket(
            ticket.request_id,
            ticket.tenant,
            ticket.adapter_id,
            max_tokens=params.max_tokens - len(out.streamed),
            resumed=True,
        )
        out.tickets.append(ticket)
        await self.scheduler.acquire(ticket)
        return ticket


def _outcome(exc: BaseException, *, dispatched: bool, paused: bool) -> Outcome:
    """How a request that ``exc`` ended ended (:data:`Outcome`)."""
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):  # the caller left
        return "preempted-then-cancelled" if paused else "cancelled"
    if not dispatched and isinstance(exc, RateLimited | Overloaded | ColdStartRejected):
        return "refused"
    if not dispatched and isinstance(exc, DeadlineExceeded):
        return "expired"
    return "error"
