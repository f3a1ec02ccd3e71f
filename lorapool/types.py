"""Value types shared by the pool, the store, the scheduler and the backends."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .sampling import BASIC_PARAMETERS, SamplingParams, StructuredOutput

__all__ = [
    "AdapterInfo",
    "AdapterMetadata",
    "Capabilities",
    "Chunk",
    "Completion",
    "FinishReason",
    "GenerationRequest",
    "LoadedAdapter",
    "LoraConfig",
    "Message",
    "PrefixCacheStats",
    "Prompt",
    "SamplingParams",
    "StructuredOutput",
    "ToolCall",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]

FinishReason: TypeAlias = Literal["stop", "length", "cancelled", "tool_calls"]
Message: TypeAlias = Mapping[str, Any]
"""A chat message: ``role`` and ``content`` strings; an assistant message may carry
``tool_calls`` (OpenAI's shape) instead of content, a ``tool`` message a ``tool_call_id``."""
Prompt: TypeAlias = str | Sequence[Message]


class LoraConfig(BaseModel):
    """The part of a PEFT ``adapter_config.json`` that serving needs."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets_as_tuple(cls, value: object) -> object:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, set)):
            return tuple(sorted(value))
        return value

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies ``B(A x)`` by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        if self.use_rslora:
            return float(self.lora_alpha) / math.sqrt(self.r)
        return float(self.lora_alpha) / float(self.r)


@dataclass(frozen=True)
class AdapterMetadata:
    """What the registry keeps about an adapter version besides its files: where it came
    from, how it was judged, who signed it and how long it may be kept.

    Set at registration (``pool.register(..., metadata=...)``); ``promoted_at``,
    ``eval_scores``, ``baseline_version`` and ``gate`` are written by an eval-gated
    promotion, ``signer`` by signature verification. Times are Unix seconds.
    """

    training_data_sha256: str | None = None
    """sha256 of the training data (or of its manifest)."""
    training_config_sha256: str | None = None
    """sha256 of the training configuration."""
    trained_at: float | None = None
    promoted_at: float | None = None
    eval_scores: Mapping[str, float] = field(default_factory=dict)
    """The last eval gate's scores, by scorer name (the candidate's)."""
    baseline_version: str | None = None
    """The version the last eval gate compared this one with."""
    gate: str | None = None
    """The identity of the last eval gate this version passed (its name and digest)."""
    signer: str | None = None
    """The key id that signed the adapter's manifest (``None``: unsigned)."""
    retention_days: int | None = None
    """How long the platform may keep the adapter after it is last used (policy; lorapool
    records it and returns it)."""
    compliance: tuple[str, ...] = ()
    """Compliance flags, e.g. ``("pii-reviewed", "gdpr")``."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the registry knows about one registered adapter."""

    adapter_id: str
    tenant: str
    shared: bool
    source: str
    sha256: str
    size_bytes: int
    config: LoraConfig
    norm: float | None = None
    """The weights' norm measured at validation (RMS of per-tensor Frobenius norms), the
    population later registrations are compared with; ``None`` when values were not scanned."""
    metadata: AdapterMetadata = field(default_factory=AdapterMetadata)
    signature: str | None = None
    """The adapter's signed manifest as it was verified at registration (JSON text in
    :mod:`lorapool.signing`'s format), checked again whenever its bytes are read from
    disk or its source; ``None``: unsigned."""

    @property
    def rank(self) -> int:
        """The adapter's LoRA rank ``r``."""
        return self.config.r


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter's files held in host memory, verified, ready to copy to a device slot.

    ``weights`` is the raw ``adapter_model.safetensors`` content: the core holds
    bytes and never imports torch. A backend may turn them, once, into a form
    ready to copy (:meth:`Backend.prepare`): ``prepared`` holds it, opaque to
    the core, and ``prepared_nbytes`` its size, and the backend may drop the
    bytes it no longer needs.
    """

    adapter_id: str
    config: LoraConfig
    weights: bytes
    sha256: str
    prepared: object | None = None
    prepared_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        """Host memory the adapter occupies."""
        return len(self.weights) + self.prepared_nbytes


@dataclass(frozen=True)
class Capabilities:
    """What a started backend can do; negotiated once at start."""

    max_slots: int
    max_rank: int
    max_batch: int
    base_model: str
    target_modules: frozenset[str]
    dynamic_load: bool = True
    pinning: bool = True
    max_seq_len: int | None = None
    preemption: bool = False
    """The backend can pause a running request to free its place (``preempt(request_id)``)."""
    resume: bool = False
    """The backend continues a request after tokens it already produced
    (:attr:`GenerationRequest.resume`): the pool may then stop a running request to hand
    its adapter's slot to another adapter, and go on with it later."""
    engine_cache: bool = False
    """The engine keeps adapters evicted from a slot in a cache of its own (vLLM's CPU
    LoRA cache); the store calls ``discard(adapter_id)`` when it unloads one."""
    model_path: Path | None = None
    """A local copy of the base model (its ``config.json`` and weights' headers), when the
    backend has one: adapters are validated against its module names and shapes."""
    sampling: frozenset[str] = BASIC_PARAMETERS
    """The :class:`SamplingParams` the backend honours, by name (structured output by
    kind: ``structured.json_schema``, ...); a request setting any other is refused with
    :class:`~lorapool.errors.UnsupportedParameter` (:meth:`SamplingParams.used`)."""
    tools: bool = False
    """The backend renders ``GenerationRequest.tools`` into the prompt (the chat
    template's ``tools``, or lorapool's rendering where the template has none)."""
    pass_stats: bool = False
    """The engine counts, at each forward pass, the distinct adapters in it
    (:meth:`~lorapool.abc.Backend.adapters_per_pass`): the server's
    ``lorapool_forward_pass_adapters`` histogram."""
    dora: bool = False
    """The backend serves DoRA adapters (``use_dora=true``) exactly as PEFT computes them;
    without it they are refused at registration (``unsupported_dora``)."""
    device_bytes: int | None = None
    """The device tier's capacity in bytes, when the backend's slots hold adapters at their
    own size (:meth:`~lorapool.abc.Backend.device_nbytes`): the store then evicts until both
    a slot and the bytes are free. ``None``: every adapter fits any free slot."""
    prefix_cache: bool = False
    """The engine keeps a prefix (KV) cache keyed by adapter *content* (the sha256): the
    pool calls :meth:`~lorapool.abc.Backend.forget` when no registered adapter has a
    content any more, and the server reads :meth:`~lorapool.abc.Backend.prefix_cache_stats`
    (``lorapool_prefix_cache_bytes``)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the pool hands it to a backend."""

    request_id: str
    prompt: Prompt
    params: SamplingParams
    adapter_id: str | None = None
    slot: int | None = None
    resume: tuple[int, ...] = ()
    """Output token ids already streamed to the caller (a request handed off and resumed):
    the backend continues after them, for ``params.max_tokens`` minus their number, and
    reports usage as if the request had never stopped. Only for backends whose
    :attr:`Capabilities.resume` is true."""
    tools: tuple[Mapping[str, Any], ...] = ()
    """OpenAI-style tool definitions (``{"type": "function", "function": {...}}``) the
    chat prompt is rendered with; only for backends whose :attr:`Capabilities.tools`."""
    cache_scope: str | None = None
    """The isolation domain of the backend's prefix (KV) cache: two requests share cached
    state only when their scopes are equal (and their adapter content). The pool sets it
    to an opaque digest of the tenant, so no tenant can learn another's prompts from cache
    hits (``cached_tokens``, time to first token). ``None``: the backend's shared scope."""


@dataclass(frozen=True)
class TopLogprob:
    """One alternative for a position: a token and its log-probability."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A produced token's log-probability and the likeliest alternatives at its position
    (``SamplingParams.logprobs`` / ``top_logprobs``), from the model's distribution
    before penalties, bias, temperature and truncation."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made (OpenAI's ``tool_calls`` entry): ``arguments`` is
    the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    """Tokens a request consumed."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the engine's prefix cache instead of
    a prefill (OpenAI's ``usage.prompt_tokens_details.cached_tokens``); 0 when the backend
    keeps no prefix cache or reports none."""

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class PrefixCacheStats:
    """A backend's prefix (KV) cache, as :meth:`~lorapool.abc.Backend.prefix_cache_stats`
    reads it: counters since start and the cache's size now."""

    prompt_tokens: int = 0
    """Prompt tokens of the prefills run (a resumed request's output counted too)."""
    hit_tokens: int = 0
    """Of those, tokens whose keys and values were copied from the cache."""
    cached_bytes: int = 0
    """Memory the cached blocks hold now."""
    cached_blocks: int = 0
    """Blocks cached now."""
    budget_bytes: int = 0
    """The most memory the cache may hold."""
    evictions: int = 0
    """Blocks given up to stay within the budget."""
    forgotten: int = 0
    """Blocks dropped because their adapter content was forgotten (unregistered)."""


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed completion.

    Every chunk carries the new ``text`` and ``token_ids``; the last one also
    ``finish_reason`` and ``usage``.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    adapter_id: str | None = None
    served_by: str = "adapter"
    index: int = 0
    """Which of the request's ``n`` samples the chunk belongs to."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per token of ``token_ids`` when ``SamplingParams.logprobs`` is set."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls the model made (with ``tools``); the sample's text then holds none of them."""


@dataclass(frozen=True)
class Completion:
    """A whole completion, as returned by ``pool.complete``.

    With ``n`` samples, ``text``, ``token_ids``, ``finish_reason``, ``logprobs`` and
    ``tool_calls`` are sample 0's and ``choices`` holds every sample (``choices[i]`` is
    sample ``i``, its own ``choices`` empty); ``usage`` is the whole request's.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    adapter_id: str | None = None
    served_by: str = "adapter"
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    choices: tuple[Completion, ...] = ()
