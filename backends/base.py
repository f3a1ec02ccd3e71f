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
import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Self

from lorapool.abc import Backend
from lorapool.errors import (
    BackendClosed,
    BackendNotStarted,
    InvalidRequest,
    UnsupportedParameter,
)
from lorapool.plugins import load_backend
from lorapool.sampling import refuse_unsupported
from lorapool.tools import (
    native_messages,
    prompt_tools,
    render_messages,
    template_renders_tools,
)
from lorapool.types import (
    Capabilities,
    Chunk,
    GenerationRequest,
    LoadedAdapter,
    Message,
    PrefixCacheStats,
    Prompt,
)

log = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "BaseBackend",
    "build_backend",
    "chat_messages",
    "prompt_chars",
    "refuse_long_prompt",
]

PROMPT_CHARS_MARGIN = 4
"""How many times more characters than ``max_seq_len`` times the longest token a prompt
may have before it is refused untokenized: room for normalisers that compose characters."""


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


def chat_messages(prompt: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages of a chat prompt as plain dicts; refuses malformed ones.

    Each message must be a mapping with a string ``role`` and a string ``content``, except
    that an assistant message carrying ``tool_calls`` (OpenAI's shape: ``id``, ``type``
    ``function`` and ``function`` with a string ``name`` and ``arguments``) may have no
    content (``None`` or absent), and a ``tool`` message must carry a string
    ``tool_call_id``. The list must not be empty. Anything else is
    :class:`~lorapool.errors.InvalidRequest`.
    """
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidRequest(
                f"message {i} must be a mapping with string 'role' and 'content', got {m!r}"
            )
        calls = m.get("tool_calls")
        if calls is not None:
            _check_tool_calls(i, m["role"], calls)
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise InvalidRequest(
                f"message {i} must be a mapping with string 'role' and 'content', got {m!r}"
            )
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise InvalidRequest(f"message {i} has role 'tool' but no string 'tool_call_id'")
        messages.append(dict(m))
    if not messages:
        raise InvalidRequest("the message list is empty")
    return messages


def _check_tool_calls(i: int, role: str, calls: object) -> None:
    """Refuse a message's ``tool_calls`` that are not OpenAI's shape, or not an assistant's."""
    if role != "assistant":
        raise InvalidRequest(f"message {i} has tool_calls but role {role!r}; only 'assistant'")
    if not isinstance(calls, list | tuple) or not calls:
        raise InvalidRequest(f"message {i}'s tool_calls must be a non-empty list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if (
            not isinstance(call, Mapping)
            or call.get("type", "function") != "function"
            or not isinstance(function, Mapping)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str | Mapping)
        ):
            raise InvalidRequest(
                f"message {i}'s tool_calls[{j}] must be {{'id', 'type': 'function', "
                "'function': {'name', 'arguments'}}"
            )


def _strings(value: object) -> Iterator[str]:
    """Every string in a message (keys and values, however deep; no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            for key, child in item.items():
                stack.append(key)
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)


def prompt_chars(prompt: Prompt) -> int:
    """A prompt's text in characters: the string's, or its messages' contents, their tool
    calls' names and arguments and the tools it carries (:class:`~lorapool.tools.ToolPrompt`)
    together."""
    if isinstance(prompt, str):
        return len(prompt)
    total = sum(len(json.dumps(t)) for t in prompt_tools(prompt))
    for m in prompt:
        if not isinstance(m, Mapping):
            continue
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        calls = m.get("tool_calls")
        if isinstance(calls, list | tuple):
            total += sum(len(s) for s in _strings(calls))
    return total


def refuse_long_prompt(chars: int, limit: int | None) -> None:
    """Refuse a prompt of ``chars`` characters over ``limit`` (``None``: no bound).

    Raises :class:`~lorapool.errors.InvalidRequest` saying the prompt is too long.
    """
    if limit is not None and chars > limit:
        raise InvalidRequest(
            f"the prompt is too long: {chars} characters, more than the {limit} that can "
            "fit the model's context; shorten the prompt"
        )


def _printable(key: object) -> str:
    """A message field's name for an error, or ``field`` where the name is not valid text."""
    if isinstance(key, str):
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return "field"
        return key
    return "field"


def _refuse_lone_surrogate(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{what} contains an unpaired surrogate; send valid UTF-8 text"
        ) from None


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
        self._max_prompt_chars: int | None = None

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
                caps = await self._start()
                if not caps.tools and self._encodes_chat():
                    caps = dataclasses.replace(caps, tools=True)
                self._caps = caps
                if self._tokenizer is not None and type(self).encode is BaseBackend.encode:
                    await asyncio.to_thread(self._warm_tokenizer)

    def _warm_tokenizer(self) -> None:
        """Pay the tokenizer's first-use costs at start, on a worker thread: the prompt
        bound (a pass over the vocabulary) and a first encode. Left to the first requests,
        they held the GIL long enough to stall the event loop by 50-100 ms (a burst of 8
        requests on a fresh TorchBackend; tests/integration/test_engine.py). Only an
        optimisation: a tokenizer that cannot encode it says so at the first request."""
        try:
            self.encode("warm up")
        except Exception as exc:  # a warm-up never fails the start
            log.debug("the tokenizer's warm-up failed: %s", exc)

    async def aclose(self) -> None:
        """Stop the engine (:meth:`_aclose`, once); a closed backend cannot start again."""
        async with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            await self._aclose()

    def _encodes_chat(self) -> bool:
        """Whether chat prompts go through :meth:`encode` with a tokenizer of this process:
        then tools are rendered here, and :attr:`Capabilities.tools` is true."""
        return self._tokenizer is not None and type(self).encode is BaseBackend.encode

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

    def adapters_per_pass(self) -> Mapping[int, int]:
        """Not offered (``Capabilities.pass_stats`` is False): no passes counted."""
        return {}

    async def forget(self, sha256: str) -> None:  # noqa: B027 - optional, not abstract
        """Not offered (``Capabilities.prefix_cache`` is False): nothing cached by content."""

    async def forget_scope(self, scope: str) -> None:  # noqa: B027 - optional, not abstract
        """Not offered (``Capabilities.prefix_cache`` is False): nothing cached by scope."""

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Not offered (``Capabilities.prefix_cache`` is False): nothing counted."""
        return None

    async def purge(self, adapter_id: str, sha256: str) -> Sequence[str]:
        """Drop a forgotten adapter from the engine's cache (:meth:`discard`, with
        ``Capabilities.engine_cache``) and its content's prefix blocks (:meth:`forget`, with
        ``Capabilities.prefix_cache``); a backend that knows more says more."""
        caps = self._caps
        dropped: list[str] = []
        if caps is None:
            return dropped
        if caps.engine_cache:
            await self.discard(adapter_id)
            dropped.append("engine adapter cache")
        if caps.prefix_cache:
            await self.forget(sha256)
            dropped.append("prefix cache")
        return dropped

    # -- requests ----------------------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse what the backend cannot honour, before any work is done for it.

        A sampling parameter outside :attr:`Capabilities.sampling`, or ``tools`` without
        :attr:`Capabilities.tools`: :class:`~lorapool.errors.UnsupportedParameter`,
        naming this backend. Every backend's :meth:`generate` calls it first.
        """
        caps = self._require_started()
        refuse_unsupported(request.params, caps.sampling, type(self).__name__)
        if request.tools and not caps.tools:
            raise UnsupportedParameter(type(self).__name__, ["tools"])

    # -- prompts -----------------------------------------------------------------------

    def _prompt_tokenizer(self) -> Any:
        """The Hugging Face-style tokenizer :meth:`encode` uses (``self._tokenizer``)."""
        if self._tokenizer is None:
            self._require_started()
            raise InvalidRequest(f"{type(self).__name__} has no tokenizer to encode prompts")
        return self._tokenizer

    @property
    def max_prompt_chars(self) -> int | None:
        """The longest prompt, in characters, that could fit the engine's context.

        ``Capabilities.max_seq_len`` tokens, times the longest entry of the tokenizer's
        vocabulary (no token covers more characters than it spells), times
        :data:`PROMPT_CHARS_MARGIN`. :meth:`encode` refuses a longer prompt before
        tokenizing it, so the work a prompt costs is bounded by the context, not by what
        a client sent. ``None`` (no bound) without a tokenizer, a vocabulary or a context
        length.
        """
        if self._max_prompt_chars is None:
            caps, tok = self._caps, self._tokenizer
            if caps is None or caps.max_seq_len is None or tok is None:
                return None
            try:
                vocab = tok.get_vocab()
            except (AttributeError, NotImplementedError, TypeError):
                return None
            longest = max((len(str(t)) for t in vocab), default=1)
            self._max_prompt_chars = caps.max_seq_len * max(1, longest) * PROMPT_CHARS_MARGIN
        return self._max_prompt_chars

    def encode(self, prompt: Prompt, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt; chat messages go through the model's chat template.

        ``tools`` (OpenAI's definitions; by default those a
        :class:`~lorapool.tools.ToolPrompt` carries) are rendered into a chat prompt: as the
        template's ``tools`` where it references them, else by lorapool into the system
        message (:func:`lorapool.tools.render_messages`, which also renders assistant
        ``tool_calls`` and ``tool`` messages for a template that knows neither).

        Refused with :class:`~lorapool.errors.InvalidRequest`, before the tokenizer sees
        it: a prompt longer than :attr:`max_prompt_chars`, and text holding an unpaired
        surrogate (not text; the tokenizer would fail on it). Runs the tokenizer on the
        calling thread: from a coroutine use :meth:`aencode`.
        """
        tok = self._prompt_tokenizer()
        refuse_long_prompt(prompt_chars(prompt), self.max_prompt_chars)
        if isinstance(prompt, str):
            _refuse_lone_surrogate(prompt, "the prompt")
            return [int(i) for i in tok.encode(prompt)]
        tools = list(prompt_tools(prompt) if tools is None else tools)
        messages = chat_messages(prompt)
        for i, m in enumerate(messages):
            for key, value in m.items():  # named by field: "message 1's role"
                for text in _strings([key, value]):
                    _refuse_lone_surrogate(text, f"message {i}'s {_printable(key)}")
        for text in _strings(tools):
            _refuse_lone_surrogate(text, "the tools")
        template = getattr(tok, "chat_template", None)
        if not template:
            raise InvalidRequest("this model has no chat template; pass the prompt as a string")
        if template_renders_tools(template):
            extra: dict[str, Any] = {"tools": tools} if tools else {}
            chat: list[dict[str, Any]] = native_messages(messages)
        else:
            extra, chat = {}, list(render_messages(messages, tools))
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    async def aencode(
        self, prompt: Prompt, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """:meth:`encode` on a worker thread: tokenizing never holds up the event loop.

        The tokenizer's work is bounded first (:attr:`max_prompt_chars`); Hugging Face's
        fast tokenizers release the GIL while they run, so other requests go on meanwhile.
        """
        return await asyncio.to_thread(self.encode, prompt, tools)

    # -- the rest of the seam ------------------------------------------------------------

    @abstractmethod
    async def health(self) -> bool:
        """True while the engine can serve."""

    @abstractmethod
    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Turn verified bytes into the host-tier form this backend loads fastest."""

    def device_nbytes(self, adapter: LoadedAdapter) -> int:
        """Device bytes ``adapter`` takes in a slot; 0 where slots are not sized in bytes."""
        return 0

    @abstractmethod
    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Copy an adapter's weights into device slot ``slot``."""

    @abstractmethod
    async def unload(self, adapter_id: str) -> None:
        """Free the slot that holds ``adapter_id``."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator cancels the request."""
