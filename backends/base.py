"""The Backend seam: what an engine must offer the pool.

A backend owns device memory and the forward pass. It does not decide what to
evict or whom to serve: the store tells it which adapter goes into which slot,
the scheduler decides which request it gets next.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from lorapool.types import Capabilities, Chunk, GenerationRequest, LoadedAdapter

__all__ = ["Backend", "EngineCached", "Preemptible"]


@runtime_checkable
class Backend(Protocol):
    """An engine that runs many LoRA adapters over one base model."""

    @property
    def capabilities(self) -> Capabilities:
        """Slots, max rank, batch size and base model; valid after :meth:`start`."""
        ...

    async def start(self) -> None:
        """Load the base model and get ready to serve. Idempotent."""
        ...

    async def aclose(self) -> None:
        """Stop serving and free the engine. Idempotent."""
        ...

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Turn verified bytes into the host-tier form this backend loads fastest.

        Called once when the adapter enters the host tier, off the engine's
        step. Return the adapter unchanged if there is nothing to gain; raise
        to refuse an adapter the engine cannot serve.
        """
        ...

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Copy an adapter's weights into device slot ``slot``, replacing what was there."""
        ...

    async def unload(self, adapter_id: str) -> None:
        """Free the slot that holds ``adapter_id``; no request may be using it."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator cancels the request."""
        ...

    async def health(self) -> bool:
        """True while the engine can serve."""
        ...


@runtime_checkable
class EngineCached(Protocol):
    """A backend whose engine keeps adapters evicted from a slot in a cache of its own.

    VLLMBackend keeps them in vLLM's CPU LoRA cache, so a later load into a
    slot is a memory copy. The store calls :meth:`discard` when it unloads an
    adapter that holds no slot, so unregistered adapters do not stay there.
    """

    async def discard(self, adapter_id: str) -> None:
        """Drop the adapter from the engine's cache; a no-op if it is not there."""
        ...


@runtime_checkable
class Preemptible(Protocol):
    """A backend that can pause a running request (``Capabilities.preemption``)."""

    def preempt(self, request_id: str) -> bool:
        """Ask the engine to give the request's place to a waiting request.

        Non-blocking and safe to call from the event loop. The request's stream
        pauses and resumes later with the same output (recomputed, not lost).
        Returns False when the request is not running now or was already asked
        to pause (and not resumed since): each True frees one place.
        """
        ...
