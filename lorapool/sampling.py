"""What a request asks of the sampler: :class:`SamplingParams` and :class:`StructuredOutput`.

The parameters are those vLLM's OpenAI server accepts, each validated here (a clear
``ValueError`` / pydantic ``ValidationError`` naming the field). A backend declares the
ones it honours in :attr:`Capabilities.sampling <lorapool.types.Capabilities.sampling>`;
:func:`refuse_unsupported` refuses, with :class:`~lorapool.errors.UnsupportedParameter`
naming the backend, a request that sets any other: nothing a caller sends is silently
ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import UnsupportedParameter

__all__ = [
    "ALL_PARAMETERS",
    "BASIC_PARAMETERS",
    "MAX_GRAMMAR_CHARS",
    "MAX_LOGIT_BIAS",
    "MAX_N",
    "MAX_TOP_LOGPROBS",
    "STRUCTURED_PARAMETERS",
    "SamplingParams",
    "StructuredKind",
    "StructuredOutput",
    "refuse_unsupported",
]

StructuredKind: TypeAlias = Literal["json_object", "json_schema", "regex", "choice", "grammar"]

MAX_GRAMMAR_CHARS = 65_536
"""The longest schema, regex or grammar (its text) a request may carry."""
MAX_LOGIT_BIAS = 300
"""The most tokens one ``logit_bias`` may name (OpenAI's limit)."""
MAX_N = 16
"""The most samples one request may ask for."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token ``top_logprobs`` may ask for (OpenAI's limit)."""

BASIC_PARAMETERS = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos"})
"""What every backend honours; a backend's ``Capabilities.sampling`` defaults to these."""


class StructuredOutput(BaseModel):
    """Output constrained token by token to a format.

    ``kind`` is one of ``json_object`` (any JSON object), ``json_schema`` (``spec`` is
    the schema as JSON text), ``regex`` (``spec`` is the pattern), ``choice``
    (``choices``: exactly one of these strings) or ``grammar`` (``spec`` is a Lark
    grammar, llguidance's dialect, whose start rule is ``start``). Build one with the
    class methods. Whether the schema, pattern or grammar compiles is checked by the
    backend when the request arrives (:class:`~lorapool.errors.InvalidRequest`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: StructuredKind
    spec: str | None = Field(default=None, max_length=MAX_GRAMMAR_CHARS)
    choices: tuple[str, ...] = ()

    @classmethod
    def json_object(cls) -> StructuredOutput:
        """Any JSON object."""
        return cls(kind="json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> StructuredOutput:
        """JSON that validates against ``schema`` (a mapping, or its JSON text)."""
        spec = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        return cls(kind="json_schema", spec=spec)

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        """Text that matches ``pattern`` whole."""
        return cls(kind="regex", spec=pattern)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> StructuredOutput:
        """Exactly one of ``options``."""
        return cls(kind="choice", choices=tuple(options))

    @classmethod
    def grammar(cls, lark: str) -> StructuredOutput:
        """Text of a Lark grammar (llguidance's dialect; the start rule is ``start``)."""
        return cls(kind="grammar", spec=lark)

    @property
    def schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema, for ``json_schema``; ``None`` otherwise."""
        if self.kind != "json_schema" or self.spec is None:
            return None
        value: dict[str, Any] = json.loads(self.spec)
        return value

    @model_validator(mode="after")
    def _complete(self) -> StructuredOutput:
        needs_spec = self.kind in ("json_schema", "regex", "grammar")
        if needs_spec and not self.spec:
            raise ValueError(f"structured output of kind {self.kind!r} needs a spec")
        if not needs_spec and self.spec is not None:
            raise ValueError(f"structured output of kind {self.kind!r} takes no spec")
        if self.kind == "choice":
            if not self.choices or any(not c for c in self.choices):
                raise ValueError("a choice needs at least one option, none of them empty")
            if sum(len(c) for c in self.choices) > MAX_GRAMMAR_CHARS:
                raise ValueError(f"the choices exceed {MAX_GRAMMAR_CHARS} characters")
        elif self.choices:
            raise ValueError(f"structured output of kind {self.kind!r} takes no choices")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec or "")
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ValueError("the JSON schema must be a JSON object")
        return self


class SamplingParams(BaseModel):
    """How to sample a completion.

    ``temperature=0`` means greedy decoding. ``seed`` makes sampling reproducible per
    request. ``stop`` strings end the completion; the stop string itself is not
    returned. ``ignore_eos`` keeps generating past the end-of-sequence token (for
    benchmarks that need a fixed output length).

    The rest follow vLLM's meaning. ``top_k`` keeps the k likeliest tokens (``None``:
    all); ``min_p`` drops tokens less likely than ``min_p`` times the likeliest.
    ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, over the output so far)
    subtract from the logits of tokens already produced, once and per occurrence;
    ``repetition_penalty`` (over prompt and output) divides a positive logit and
    multiplies a negative one. ``logit_bias`` adds to the named tokens' logits
    (-100 bans a token, 100 all but forces it). ``stop_token_ids`` end the completion
    (finish reason ``stop``; the token is not returned). ``min_tokens`` keeps the
    end-of-sequence token and ``stop_token_ids`` from ending it earlier. ``n`` asks for
    several samples of the prompt (their chunks carry ``Chunk.index``); with a
    ``seed``, sample ``i`` uses ``seed + i``. ``logprobs`` returns each produced
    token's log-probability, with ``top_logprobs`` alternatives, computed from the
    model's distribution before any penalty, bias, temperature or truncation.
    ``structured`` constrains the output (:class:`StructuredOutput`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int | None = Field(default=None, ge=1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    structured: StructuredOutput | None = None

    @field_validator("stop", "stop_token_ids", mode="before")
    @classmethod
    def _as_tuple(cls, value: object) -> object:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be token ids (>= 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[int, float]) -> dict[int, float]:
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias names {len(value)} tokens; at most {MAX_LOGIT_BIAS}")
        for token, bias in value.items():
            if token < 0:
                raise ValueError(f"logit_bias key {token} is not a token id (>= 0)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(
                    f"logit_bias for token {token} is {bias}; it must be in [-100, 100]"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    def used(self) -> frozenset[str]:
        """The parameters set to something other than their default.

        Structured output is named by kind (``structured.json_schema``, ...), so a
        backend may honour some kinds and not others.
        """
        names = set()
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            default = field.get_default(call_default_factory=True)
            if value != default:
                names.add(name)
        if self.structured is not None:
            names.discard("structured")
            names.add(f"structured.{self.structured.kind}")
        return frozenset(names)


STRUCTURED_PARAMETERS = frozenset(f"structured.{kind}" for kind in get_args(StructuredKind))
"""Structured output's names in ``Capabilities.sampling``, one per kind."""
ALL_PARAMETERS = (
    frozenset(name for name in SamplingParams.model_fields if name != "structured")
    | STRUCTURED_PARAMETERS
)
"""Every name :meth:`SamplingParams.used` can report: a backend that honours everything."""


def refuse_unsupported(params: SamplingParams, supported: frozenset[str], backend: str) -> None:
    """Raise :class:`~lorapool.errors.UnsupportedParameter` when ``params`` set any
    parameter outside ``supported`` (a backend's ``Capabilities.sampling``)."""
    missing = sorted(params.used() - supported)
    if missing:
        raise UnsupportedParameter(backend, missing)
