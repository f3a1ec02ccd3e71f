"""The Backend seam (defined with every other seam in :mod:`lorapool.abc`) and its glue.

A backend owns device memory and the forward pass. It does not decide what to
evict or whom to serve: the store tells it which adapter goes into which slot,
the scheduler decides which request it gets next.

:class:`BaseBackend` holds what every built-in backend shares, once: the
start/close lifecycle (idempotent, under a lock, with typed errors for misuse),
the chat-template :meth:`~BaseBackend.encode`, the defaults of the optional
abilities, and :meth:`~BaseBackend.from_config`, how ``server.toml`` and
``lorapool bench serve`` build a backend found by name. A third-party backend
may subclass it too; lorapool only needs the :class:`Backend` protocol.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar, Self

from lorapool.abc import Backend
from lorapool.errors import BackendClosed, BackendNotStarted, InvalidRequest
from lorapool.plugins import load_backend
from lorapool.types import Capabilities, Chunk, GenerationRequest, LoadedAdapter, Message, Prompt

__all__ = ["Backend", "BaseBackend", "build_backend", "chat_messages"]


def build_backend(name: str, model: str | None = None, /, **options: Any) -> Backend:
    """The backend registered as ``name`` (entry points), built from a config's values.

    A :class:`BaseBackend` builds itself (:meth:`BaseBackend.from_config`); any
    other class is called as ``cls(model, **options)`` (``cls(**options)`` without
    a model). ``server.toml`` and ``lorapool bench serve`` build their backend here.
    """
    cls: type[Any] = load_backend(name)
    try:
        if issubclass(cls, BaseBackend):
            return cls.from_config(model, **options)
        backend: Backend = _construct(cls, model, options)
    except TypeError as exc:  # an option the backend does not take: refused, by name
        raise InvalidRequest(
            f"the {name!r} backend refused its options {sorted(options)}: {exc}"
        ) from exc
    return backend


def _construct(cls: type[Any], model: str | None, options: dict[str, Any]) -> Any:
    return cls(**options) if model is None else cls(model, **options)


def chat_messages(prompt: Sequence[Message]) -> list[dict[str, str]]:
    """The messages of a chat prompt as plain dicts; refuses malformed ones.

    Each message must be a mapping with string ``role`` and ``content``; the list
    must not be empty (:class:`~lorapool.errors.InvalidRequest` otherwise).
    """
    messages: list[dict[str, str]] = []
    for i, m in enumerate(prompt):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise InvalidRequest(
                f"message {i} must be a mapping with string 'role' and 'content', got {m!r}"
            )
        messages.append(dict(m))
    if not messages:
        raise InvalidRequest("the message list is empty")
    return messages


class BaseBackend(ABC):
    """The lifecycle, prompt encoding and optional-ability defaults every backend shares.

    A subclass implements :meth:`_start` (build or reach the engine and return its
    :class:`~lorapool.types.Capabilities`) and :meth:`_aclose`, plus the adapter and
    generation methods of :class:`~lorapool.abc.Backend`. This class makes
    :meth:`start` idempotent and serialised with :meth:`aclose` under one lock,
    refuses a start after close (:class:`~lorapool.errors.BackendClosed`), and makes
    :attr:`capabilities` raise :class:`~lorapool.errors.BackendNotStarted` before a
    successful start. Subclasses call ``super().__init__()``.
    """

    requires_model: ClassVar[bool] = False
    """Whether :meth:`from_config` needs a ``model`` (the first constructor argument)."""

    def __init__(self) -> None:
        self._caps: Capabilities | None = None
        self._closed = False
        self._lifecycle = asyncio.Lock()
        self._tokenizer: Any = None

    # -- construction from a config ----------------------------------------------------

    @classmethod
    def from_config(cls, model: str | None = None, /, **options: Any) -> Self:
        """The backend a ``server.toml`` ``[backend]`` section or ``bench serve`` describes.

        ``model`` is what the config's ``model`` (the benchmark's ``--model``, or the
        URL of a ``url:`` target) names: a checkpoint directory, a hub name or a
        server URL, passed as the constructor's first argument; ``None`` leaves it
        out. ``options`` are keyword arguments (``max_slots``, ``max_rank``,
        ``max_batch`` and the config's ``options``). Override it where a backend
        builds differently from a config (the torch backend's demo model).
        """
        if model is None and cls.requires_model:
            raise ValueError(
                f"{cls.__name__} needs a model: a checkpoint directory, hub name or "
                "server URL (backend.model in server.toml, --model in the benchmark)"
            )
        backend: Self = _construct(cls, model, options)
        return backend

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """Negotiated at :meth:`start` (and still readable after :meth:`aclose`)."""
        if self._caps is None:
            raise self._lifecycle_error()
        return self._caps

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`aclose`."""
        return self._caps is not None and not self._closed

    def _lifecycle_error(self) -> BackendClosed | BackendNotStarted:
        name = type(self).__name__
        return BackendClosed(name) if self._closed else BackendNotStarted(name)

    def _require_started(self) -> Capabilities:
        """The capabilities; :class:`BackendNotStarted` / :class:`BackendClosed` otherwise."""
        if self._caps is None or self._closed:
            raise self._lifecycle_error()
        return self._caps

    async def start(self) -> None:
        """Start the engine once (:meth:`_start`); later calls return at once."""
        async with self._lifecycle:
            if self._closed:
                raise BackendClosed(type(self).__name__)
            if self._caps is None:
                self._caps = await self._start()

    async def aclose(self) -> None:
        """Stop the engine (:meth:`_aclose`, once); a closed backend cannot start again."""
        async with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            await self._aclose()

    @abstractmethod
    async def _start(self) -> Capabilities:
        """Build, adopt or reach the engine; return what it can do. Runs once, under the lock.

        On failure release what was acquired and raise: :meth:`start` may be called again.
        """

    @abstractmethod
    async def _aclose(self) -> None:
        """Release the engine (started or not). Runs once, under the lock."""

    # -- optional abilities (see Capabilities) -----------------------------------------

    def preempt(self, request_id: str) -> bool:
        """Not offered (``Capabilities.preemption`` is False): nothing is paused."""
        return False

    async def discard(self, adapter_id: str) -> None:  # noqa: B027 - optional, not abstract
        """Not offered (``Capabilities.engine_cache`` is False): there is no engine cache."""

    # -- prompts -----------------------------------------------------------------------

    def _prompt_tokenizer(self) -> Any:
        """The Hugging Face-style tokenizer :meth:`encode` uses (``self._tokenizer``)."""
        if self._tokenizer is None:
            self._require_started()
            raise InvalidRequest(f"{type(self).__name__} has no tokenizer to encode prompts")
        return self._tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; chat messages go through the model's chat template."""
        tok = self._prompt_tokenizer()
        if isinstance(prompt, str):
            return [int(i) for i in tok.encode(prompt)]
        messages = chat_messages(prompt)
        if not getattr(tok, "chat_template", None):
            raise InvalidRequest("this model has no chat template; pass the prompt as a string")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    # -- the rest of the seam ------------------------------------------------------------

    @abstractmethod
    async def health(self) -> bool:
        """True while the engine can serve."""

    @abstractmethod
    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Turn verified bytes into the host-tier form this backend loads fastest."""

    @abstractmethod
    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Copy an adapter's weights into device slot ``slot``."""

    @abstractmethod
    async def unload(self, adapter_id: str) -> None:
        """Free the slot that holds ``adapter_id``."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator cancels the request."""
