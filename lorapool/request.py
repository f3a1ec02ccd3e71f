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
   (:class:`Ledger`, :class:`TenantUsage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from lorapool.abc import Backend
from lorapool.errors import ColdStartRejected, DeadlineExceeded, Overloaded, RateLimited
from lorapool.scheduler import Scheduler, Ticket
from lorapool.store import TieredStore
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
    "Ledger",
    "Lifecycle",
    "PoolStats",
    "Relay",
    "TenantUsage",
    "estimate_tokens",
]

log = logging.getLogger(__name__)

# -- usage -------------------------------------------------------------------------------


@dataclass
class PoolStats:
    """Totals since the pool started."""

    requests: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class TenantUsage:
    """One tenant's totals: what it asked for, what it got, what it was refused.

    ``refused``: rate-limited, shed or cold-start-rejected requests; ``expired``:
    requests whose deadline passed in the queue; ``fallbacks``: requests served
    by the base model while their adapter loaded; ``queue_seconds``: total time
    requests waited for dispatch. ``completion_tokens`` counts every token a
    request produced, however it ended: the engine's count for a completed
    request, the tokens streamed to the caller for one that failed or that the
    caller left. ``prompt_tokens`` are the engine's count, which comes with the
    last chunk: a request that ends before it adds none.
    """

    requests: int = 0
    completed: int = 0
    failed: int = 0
    refused: int = 0
    expired: int = 0
    fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0


def estimate_tokens(prompt: str | Sequence[Message]) -> int:
    """A cheap prompt-token estimate for admission (about 4 characters a token)."""
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    return sum(len(str(m.get("content", ""))) // 4 + 4 for m in prompt) + 1


class Ledger:
    """The pool's :class:`PoolStats` and a :class:`TenantUsage` per tenant."""

    def __init__(self) -> None:
        self.stats = PoolStats()
        self._tenants: dict[str, TenantUsage] = {}

    def open(self, tenant: str) -> TenantUsage:
        """Count a new request of ``tenant``; returns the tenant's account to charge."""
        account = self._tenants.setdefault(tenant, TenantUsage())
        account.requests += 1
        self.stats.requests += 1
        return account

    def close(
        self, account: TenantUsage, usage: Usage | None, *, streamed: int, failed: bool
    ) -> None:
        """Bill a request that ended, once.

        With the engine's ``usage`` (its last chunk came) the request completed and
        is billed that; without it the request is billed the ``streamed`` tokens it
        produced, and counts as failed if it ended with an error, a cancellation or
        a caller that stopped reading.
        """
        for totals in (self.stats, account):
            if usage is not None:
                totals.completed += 1
                totals.prompt_tokens += usage.prompt_tokens
                totals.completion_tokens += usage.completion_tokens
            else:
                totals.completion_tokens += streamed
                if failed:
                    totals.failed += 1

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


@dataclass
class _Output:
    """What one request has produced so far, over all its legs."""

    estimate: int  # the prompt's estimated tokens, charged to the tenant at dispatch
    streamed: list[int] = field(default_factory=list)  # token ids the caller received
    usage: Usage | None = None  # the engine's count, with the last chunk
    finish: FinishReason | None = None
    legs: int = 1


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
    ) -> AsyncGenerator[Chunk, None]:
        """Serve one request with ``info``'s adapter (``None``: the base model) and stream it.

        ``deadline``: seconds the request may wait for dispatch. Raises what the
        cold-start policy, the scheduler, the store or the backend raise; the
        request's ticket, reference and bill are settled before it propagates.
        """
        account = self.ledger.open(tenant)
        info = self._cold_start(info, tenant, account)
        ticket = Ticket(
            request_id,
            tenant,
            None if info is None else info.adapter_id,
            prompt_tokens=estimate_tokens(prompt),
            max_tokens=params.max_tokens,
            timeout=deadline,
        )
        await self._admit(ticket, account)
        out = _Output(estimate=ticket.prompt_tokens)
        failed = False
        try:
            while True:
                slot = await self.store.acquire(info) if info is not None else None
                try:
                    stream = self._open(ticket, prompt, params, slot, out)
                    try:
                        async for chunk in stream:
                            self._charge(ticket, chunk, out)
                            yield chunk
                    finally:
                        await self._close(request_id, stream)
                finally:
                    if info is not None:
                        self.store.release(info.adapter_id)
                if not self._goes_on(stream, params, out):
                    break
                ticket = await self._requeue(ticket, params, out)
        except BaseException:
            failed = True
            raise
        finally:
            if info is not None:
                self.store.request_done(info)
            self.scheduler.release(ticket)
            self.ledger.close(account, out.usage, streamed=len(out.streamed), failed=failed)
            log.debug(
                "request %s tenant=%s adapter=%s finish=%s usage=%s streamed=%d legs=%d",
                request_id,
                tenant,
                ticket.adapter_id,
                out.finish,
                out.usage,
                len(out.streamed),
                out.legs,
            )

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
            account.refused += 1
            raise ColdStartRejected(
                f"adapter {info.adapter_id!r} is not loaded (tenant {tenant!r} rejects "
                "cold starts); it is being loaded now",
                retry_after=self.store.stats.load_seconds,
            )
        account.fallbacks += 1
        return None

    async def _admit(self, ticket: Ticket, account: TenantUsage) -> None:
        """Wait for the scheduler to dispatch the ticket; count refusals and queue time."""
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        try:
            await self.scheduler.acquire(ticket)
        except (RateLimited, Overloaded):
            account.refused += 1
            raise
        except DeadlineExceeded:
            account.expired += 1
            raise
        account.queue_seconds += loop.time() - queued_at

    def _open(
        self,
        ticket: Ticket,
        prompt: Prompt,
        params: SamplingParams,
        slot: int | None,
        out: _Output,
    ) -> AsyncIterator[Chunk]:
        """Start a leg in the backend: the request, going on after what was streamed."""
        rid = ticket.request_id
        leg_id = rid if out.legs == 1 else f"{rid}.{out.legs - 1}"
        request = GenerationRequest(
            leg_id, prompt, params, ticket.adapter_id, slot, tuple(out.streamed)
        )
        stream = self.backend.generate(request)
        if self._handoffs and ticket.adapter_id is not None:
            stream = self._relays[rid] = Relay(stream)
        return stream

    def _charge(self, ticket: Ticket, chunk: Chunk, out: _Output) -> None:
        """Record a chunk and charge the tenant's service: its tokens, the prompt's count."""
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
    def _goes_on(stream: AsyncIterator[Chunk], params: SamplingParams, out: _Output) -> bool:
        """Whether the leg that ended was handed off with output still to produce."""
        handed_off = isinstance(stream, Relay) and stream.handed_off
        # A leg stopped on its last token is done.
        return handed_off and out.usage is None and len(out.streamed) < params.max_tokens

    async def _requeue(self, ticket: Ticket, params: SamplingParams, out: _Output) -> Ticket:
        """Give a handed-off request's place back and wait for a new one (resumed)."""
        self.scheduler.release(ticket)
        out.legs += 1
        ticket = Ticket(
            ticket.request_id,
            ticket.tenant,
            ticket.adapter_id,
            max_tokens=params.max_tokens - len(out.streamed),
            resumed=True,
        )
        await self.scheduler.acquire(ticket)
        return ticket
