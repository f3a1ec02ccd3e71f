"""FairScheduler's settings: a few frozen, validated pydantic models, one per concern.

* :class:`TenantConfig`: the tiers (each a :class:`TierPolicy`) and who is in which, with
  what weight;
* :class:`AdmissionConfig`: the global queue cap;
* :class:`FairnessConfig`: what the virtual token counters charge, the burst credit, the
  affinity slack and the starvation bound;
* :class:`PlacesConfig`: the headroom, pacing, preemption and the light-tenant rule;
* :class:`HandoffConfig`: slot hand-off.

A bad value raises pydantic's ``ValidationError`` (a ``ValueError``) naming the field.
:func:`keyword_fields` maps FairScheduler's older keyword arguments onto these models' fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorapool.scheduler.base import ColdStart

__all__ = [
    "AdmissionConfig",
    "FairnessConfig",
    "HandoffConfig",
    "LegacyKeywords",
    "PlacesConfig",
    "TenantConfig",
    "TierPolicy",
    "keyword_fields",
]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class TierPolicy(_Config):
    """What a tier of tenants gets: weight, rate limits, a queue cap, the cold-start policy."""

    weight: float = 1.0
    """Share of service relative to other tenants' (> 0)."""
    requests_per_s: float | None = Field(default=None, gt=0)
    """Sustained requests per second per tenant (a token bucket); ``None`` for no limit."""
    request_burst: float | None = Field(default=None, ge=0)
    """Requests a tenant may send at once; by default one second of requests, at least 1."""
    tokens_per_min: float | None = Field(default=None, gt=0)
    """Sustained tokens per minute per tenant, counted at admission as the prompt plus
    ``max_tokens``; ``None`` for no limit."""
    token_burst: float | None = Field(default=None, ge=0)
    """Tokens a tenant may send at once; by default one minute of tokens. A request needing
    more can never be admitted and is refused with ``InvalidRequest``."""
    max_queue: int | None = Field(default=None, ge=0)
    """Queued requests of this tier, all its tenants together; ``None`` for no cap."""
    cold_start: ColdStart = "wait"
    """What a request whose adapter is not on the device does: ``wait`` for the load,
    ``fallback`` to the base model meanwhile, or ``reject`` with ``ColdStartRejected``."""

    @field_validator("weight")
    @classmethod
    def _positive_weight(cls, weight: float) -> float:
        if weight <= 0:
            raise ValueError("weight must be > 0")
        return weight


def _default_tiers() -> dict[str, TierPolicy]:
    return {"default": TierPolicy()}


class TenantConfig(_Config):
    """The tiers, in priority order (highest first; the last is shed first), and who is in
    which, with what weight."""

    tiers: dict[str, TierPolicy] = Field(default_factory=_default_tiers)
    """Tier names to policies, highest priority first."""
    tenant_tiers: dict[str, str] = Field(default_factory=dict)
    """Tenants to tier names; tenants not listed are in ``default_tier``."""
    default_tier: str | None = None
    """The tier of tenants not in ``tenant_tiers``; ``None`` for the last tier."""
    tenant_weights: dict[str, float] = Field(default_factory=dict)
    """Tenants' weights, overriding their tier's ``weight`` (each > 0)."""

    @model_validator(mode="after")
    def _known_tiers(self) -> TenantConfig:
        if not self.tiers:
            raise ValueError("give at least one tier")
        named = [] if self.default_tier is None else [self.default_tier]
        for name in [*named, *self.tenant_tiers.values()]:
            if name not in self.tiers:
                raise ValueError(f"unknown tier {name!r}; tiers are {list(self.tiers)}")
        if any(w <= 0 for w in self.tenant_weights.values()):
            raise ValueError("tenant weights must be > 0")
        return self

    @property
    def default(self) -> str:
        """The tier of tenants not in ``tenant_tiers``."""
        return self.default_tier if self.default_tier is not None else list(self.tiers)[-1]


class AdmissionConfig(_Config):
    """Admission beyond each tier's own limits."""

    max_queue: int = Field(default=4096, ge=0)
    """Queued requests in all. Past it an arriving request sheds the newest queued request of
    the lowest tier below its own (whose caller gets ``Overloaded``), or is refused when no
    lower tier has one queued."""


class FairnessConfig(_Config):
    """How the virtual token counters order tenants, and how far the pick may bend them."""

    input_cost: float = Field(default=1.0, ge=0)
    """Counter units per prompt token (divided by the tenant's weight)."""
    output_cost: float = Field(default=2.0, ge=0)
    """Counter units per output token (divided by the tenant's weight)."""
    credit: float = 512.0
    """Burst credit, in counter units: a tenant whose queue empties while it still has
    requests running keeps up to this much of its lead over the lowest counter when its
    next request comes (a fully idle tenant keeps none). ``0`` is plain VTC."""
    affinity_slack: float = Field(default=256.0, ge=0)
    """Counter units within the lowest counter where a request whose adapter is already on
    the device goes first. ``0`` turns affinity off."""
    max_wait: float = Field(default=30.0, ge=0)
    """Seconds after which the oldest queued request goes before any counter or affinity
    choice (the starvation bound)."""

    @field_validator("credit")
    @classmethod
    def _credit(cls, credit: float) -> float:
        if credit < 0:
            raise ValueError("credit must be >= 0")
        return credit


class PlacesConfig(_Config):
    """The engine's places (its concurrency): headroom, pacing, preemption, light tenants.

    ``pace=0, preemption=False, light_window=0`` with ``FairnessConfig(credit=0)`` is plain
    VTC with the headroom.
    """

    headroom: int | None = None
    """The last places of the engine's concurrency, kept for tenants with nothing in flight
    (and, with preemption, for tenants under their share). ``None``: one in eight of the
    places, none below four."""
    pace: float | None = None
    """Seconds between dispatches to tenants over their share of the places; ``None``
    measures it (mean request time / places), ``0`` turns pacing off."""
    preemption: bool = True
    """With every place taken, pause a request of the tenant holding the most places for a
    queued one under its share (only with a backend that can, ``Capabilities.preemption``)."""
    light_window: float = 10.0
    """Seconds over which a tenant's recent service decays; ``0`` turns the light rule off."""
    light_ratio: float = 1.25
    """A tenant whose recent service is at most 1/``light_ratio`` of the heaviest tenant's
    in flight goes as if under its share of places (>= 1)."""

    @field_validator("headroom")
    @classmethod
    def _headroom(cls, headroom: int | None) -> int | None:
        if headroom is not None and headroom < 0:
            raise ValueError("headroom must be >= 0")
        return headroom

    @field_validator("pace")
    @classmethod
    def _pace(cls, pace: float | None) -> float | None:
        if pace is not None and pace < 0:
            raise ValueError("pace must be >= 0 (0 turns pacing off)")
        return pace

    @field_validator("light_window")
    @classmethod
    def _light_window(cls, window: float) -> float:
        if window < 0:
            raise ValueError("light_window must be >= 0 (0 turns the light rule off)")
        return window

    @field_validator("light_ratio")
    @classmethod
    def _light_ratio(cls, ratio: float) -> float:
        if ratio < 1:
            raise ValueError("light_ratio must be >= 1")
        return ratio


class HandoffConfig(_Config):
    """Slot hand-off (used only with a backend that can resume requests,
    ``Capabilities.resume``)."""

    slot_wait: float | None = 0.5
    """Seconds a request may wait for an adapter slot before another adapter's running
    requests stop and give theirs up; ``None`` never hands a slot over."""

    @field_validator("slot_wait")
    @classmethod
    def _slot_wait(cls, wait: float | None) -> float | None:
        if wait is not None and wait < 0:
            raise ValueError("slot_wait must be >= 0 seconds, or None for no hand-off")
        return wait


class LegacyKeywords(TypedDict, total=False):
    """FairScheduler's older keyword arguments, each now a field of one config model."""

    tiers: Mapping[str, TierPolicy] | None
    tenant_tiers: Mapping[str, str] | None
    default_tier: str | None
    tenant_weights: Mapping[str, float] | None
    input_cost: float
    output_cost: float
    max_queue: int
    max_wait: float
    affinity_slack: float
    headroom: int | None
    pace: float | None
    credit: float
    preemption: bool
    light_window: float
    light_ratio: float
    slot_wait: float | None


KEYWORD_GROUPS: dict[str, str] = {
    "tiers": "tenants",
    "tenant_tiers": "tenants",
    "default_tier": "tenants",
    "tenant_weights": "tenants",
    "max_queue": "admission",
    "input_cost": "fairness",
    "output_cost": "fairness",
    "credit": "fairness",
    "affinity_slack": "fairness",
    "max_wait": "fairness",
    "headroom": "places",
    "pace": "places",
    "preemption": "places",
    "light_window": "places",
    "light_ratio": "places",
    "slot_wait": "handoff",
}
"""The config (FairScheduler's argument name) each older keyword is a field of."""
GROUP_MODELS: dict[str, type[BaseModel]] = {
    "tenants": TenantConfig,
    "admission": AdmissionConfig,
    "fairness": FairnessConfig,
    "places": PlacesConfig,
    "handoff": HandoffConfig,
}
""":class:`FairScheduler`'s config arguments, by name, and their models."""


def keyword_fields(keywords: LegacyKeywords) -> dict[str, dict[str, Any]]:
    """The older keyword arguments as config fields, by FairScheduler argument name (only
    the configs some keyword was given for).

    ``None`` or empty for ``tiers``, ``tenant_tiers`` or ``tenant_weights`` meant the
    default, as it did.
    """
    fields: dict[str, dict[str, Any]] = {}
    for name, value in keywords.items():
        group = KEYWORD_GROUPS.get(name)
        if group is None:
            raise TypeError(f"FairScheduler() got an unexpected keyword argument {name!r}")
        given = fields.setdefault(group, {})
        if name not in ("tiers", "tenant_tiers", "tenant_weights") or value:
            given[name] = value
    return fields
