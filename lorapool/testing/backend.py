"""MockBackend: a Backend whose answers come from a function, like httpx's MockTransport."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from lorapool.backends.base import BaseBackend
from lorapool.errors import BackendError, LoadError
from lorapool.types import Capabilities, Chunk, GenerationRequest, LoadedAdapter, Usage

__all__ = ["MockBackend"]

Handler = Callable[[GenerationRequest], "str | Iterable[str]"]


def _echo(request: GenerationRequest) -> list[str]:
    return [f"{request.adapter_id or 'base'} "] * request.params.max_tokens


@dataclass
class MockBackend(BaseBackend):
    """Answers each request with ``handler(request)``: a string, or one string per token.

    Each piece is one token; its id is a hash of its text, so different
    answers have different token ids.

    Records every load, unload and request so tests can assert on them;
    ``fail_loads`` makes loading the named adapters fail; ``token_delay``
    sleeps between tokens. ``resume=True`` offers ``Capabilities.resume``: a
    request with ``resume`` tokens goes on with the handler's pieces after them.

    Its lifecycle is :class:`~lorapool.backends.base.BaseBackend`'s (a closed
    MockBackend does not start again), but its :attr:`capabilities` are readable
    before :meth:`start`.
    """

    handler: Handler = _echo
    max_slots: int = 4
    max_rank: int = 64
    max_batch: int = 8
    token_delay: float = 0.0
    resume: bool = False
    target_modules: frozenset[str] = frozenset(
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    device_bytes: int | None = None
    """A byte budget for the slots (``Capabilities.device_bytes``); each adapter then
    takes its weights' size (:meth:`device_nbytes`)."""
    fail_loads: set[str] = field(default_factory=set)
    loads: list[tuple[str, int]] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    requests: list[GenerationRequest] = field(default_factory=list)
    slots: dict[int, str] = field(default_factory=dict)
    started: bool = False
    closed: bool = False

    def __post_init__(self) -> None:
        BaseBackend.__init__(self)

    @classmethod
    def from_config(cls, model: str | None = None, /, **options: Any) -> Self:
        """A MockBackend from keyword ``options``; it has no model, so ``model`` is ignored."""
        return cls(**options)

    @property
    def capabilities(self) -> Capabilities:
        """Fixed capabilities from the constructor."""
        return Capabilities(
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            max_batch=self.max_batch,
            base_model="mock",
            target_modules=self.target_modules,
            resume=self.resume,
            device_bytes=self.device_bytes,
        )

    async def _start(self) -> Capabilities:
        """Mark started."""
        self.started = True
        return self.capabilities

    async def _aclose(self) -> None:
        """Mark closed."""
        self.closed = True

    async def health(self) -> bool:
        """Healthy between start and close."""
        return self.started and not self.closed

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Nothing to prepare: the adapter as it is."""
        return adapter

    def device_nbytes(self, adapter: LoadedAdapter) -> int:
        """The adapter's weights' size, when slots are sized in bytes (``device_bytes``)."""
        return len(adapter.weights) if self.device_bytes is not None else 0

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Record the load (or fail it for adapters in ``fail_loads``)."""
        await asyncio.sleep(0)
        if adapter.adapter_id in self.fail_loads:
            raise LoadError(adapter.adapter_id, "device", "injected failure")
        self.slots[slot] = adapter.adapter_id
        self.loads.append((adapter.adapter_id, slot))

    async def unload(self, adapter_id: str) -> None:
        """Record the unload and free the slot."""
        self.unloads.append(adapter_id)
        for slot, held in list(self.slots.items()):
            if held == adapter_id:
                del self.slots[slot]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield the handler's tokens, then a final chunk with usage.

        Refuses what it does not honour first (:meth:`BaseBackend.check_request`), as
        every backend must.
        """
        self.check_request(request)
        slot = -1 if request.slot is None else request.slot
        if request.adapter_id is not None and self.slots.get(slot) != request.adapter_id:
            raise BackendError(f"adapter {request.adapter_id!r} is not in slot {request.slot}")
        self.requests.append(request)
        out = self.handler(request)
        pieces = [out] if isinstance(out, str) else list(out)
        pieces = pieces[: request.params.max_tokens] or [""]
        prompt_tokens = len(request.prompt) if isinstance(request.prompt, str) else 1
        done = len(request.resume)
        if done and not self.resume:
            raise BackendError("this MockBackend was made with resume=False")
        for i, piece in enumerate(pieces):
            if i < done:
                continue
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            last = i == len(pieces) - 1
            yield Chunk(
                text=piece,
                token_ids=(zlib.crc32(piece.encode()) % 50_000,),
                finish_reason="length" if last else None,
                usage=Usage(prompt_tokens, len(pieces)) if last else None,
                adapter_id=request.adapter_id,
                served_by="base" if request.adapter_id is None else "adapter",
            )
