"""FairScheduler's settings (lorapool.scheduler.config): the models, their checks, and the
older keyword form (deprecated, still working)."""

from __future__ import annotations

import warnings

import pydantic
import pytest

from lorapool.scheduler import (
    AdmissionConfig,
    FairnessConfig,
    FairScheduler,
    HandoffConfig,
    PlacesConfig,
    TenantConfig,
    TierPolicy,
)


def test_the_defaults_are_the_schedulers_defaults() -> None:
    s = FairScheduler()
    assert s.tiers == {"default": TierPolicy()} and s.default_tier == "default"
    assert s.admission.max_queue == 4096
    f = s.fairness
    assert (f.input_cost, f.output_cost, f.credit) == (1.0, 2.0, 512.0)
    assert (f.affinity_slack, f.max_wait) == (256.0, 30.0)
    p = s.places
    assert (p.headroom, p.pace, p.preemption) == (None, None, True)
    assert (p.light_window, p.light_ratio) == (10.0, 1.25)
    assert s.handoff.slot_wait == 0.5
    t = TierPolicy()
    assert (t.weight, t.requests_per_s, t.tokens_per_min, t.max_queue) == (1.0, None, None, None)
    assert t.cold_start == "wait"


def test_configs_are_frozen_and_refuse_unknown_fields() -> None:
    with pytest.raises(pydantic.ValidationError):
        FairnessConfig().max_wait = 1.0
    with pytest.raises(pydantic.ValidationError, match="max_wiat"):
        FairnessConfig(max_wiat=1.0)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TierPolicy(weight=0), "weight must be > 0"),
        (lambda: TierPolicy(cold_start="later"), "cold_start"),  # type: ignore[arg-type]
        (lambda: TierPolicy(requests_per_s=0), "requests_per_s"),
        (lambda: TenantConfig(tiers={}), "give at least one tier"),
        (lambda: TenantConfig(default_tier="gold"), "unknown tier 'gold'"),
        (lambda: TenantConfig(tenant_tiers={"t": "gold"}), "unknown tier 'gold'"),
        (lambda: TenantConfig(tenant_weights={"t": 0}), "tenant weights must be > 0"),
        (lambda: AdmissionConfig(max_queue=-1), "max_queue"),
        (lambda: FairnessConfig(credit=-1), "credit must be >= 0"),
        (lambda: FairnessConfig(output_cost=-1), "output_cost"),
        (lambda: FairnessConfig(max_wait=-1), "max_wait"),
        (lambda: PlacesConfig(headroom=-1), "headroom must be >= 0"),
        (lambda: PlacesConfig(pace=-1), "pace must be >= 0"),
        (lambda: PlacesConfig(light_window=-1), "light_window must be >= 0"),
        (lambda: PlacesConfig(light_ratio=0.5), "light_ratio must be >= 1"),
        (lambda: HandoffConfig(slot_wait=-1), "slot_wait must be >= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_field(make: object, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message) as err:
        make()  # type: ignore[operator]
    assert isinstance(err.value, ValueError)


def test_tier_policies_come_from_plain_mappings() -> None:
    tenants = TenantConfig.model_validate(
        {"tiers": {"gold": {"weight": 3, "cold_start": "fallback"}, "free": {}}}
    )
    assert tenants.tiers["gold"] == TierPolicy(weight=3.0, cold_start="fallback")
    assert tenants.default == "free"
    with pytest.raises(pydantic.ValidationError, match="wieght"):
        TenantConfig.model_validate({"tiers": {"gold": {"wieght": 3}}})


# -- the older keyword form --------------------------------------------------------------------


def test_the_keyword_form_warns_naming_the_new_form_and_means_the_same() -> None:
    gold = {"gold": TierPolicy(weight=2), "free": TierPolicy()}
    with pytest.warns(DeprecationWarning) as caught:
        old = FairScheduler(
            tiers=gold,
            tenant_tiers={"a": "gold"},
            max_queue=10,
            max_wait=5.0,
            headroom=1,
            light_window=0,
            slot_wait=None,
        )
    (warning,) = caught
    message = str(warning.message)
    assert "FairScheduler(tiers=..., tenant_tiers=..., max_queue=..." in message
    assert "tenants=TenantConfig(tiers=..., tenant_tiers=...)" in message
    assert "admission=AdmissionConfig(max_queue=...)" in message
    assert "places=PlacesConfig(headroom=..., light_window=...)" in message
    assert "handoff=HandoffConfig(slot_wait=...)" in message
    assert warning.filename == __file__  # points at the caller
    new = FairScheduler(
        tenants=TenantConfig(tiers=gold, tenant_tiers={"a": "gold"}),
        admission=AdmissionConfig(max_queue=10),
        fairness=FairnessConfig(max_wait=5.0),
        places=PlacesConfig(headroom=1, light_window=0),
        handoff=HandoffConfig(slot_wait=None),
    )
    for name in ("tenants", "admission", "fairness", "places", "handoff"):
        assert getattr(old, name) == getattr(new, name), name
    assert old.tier_of("a") == "gold" and old.tier_of("b") == "free"


def test_the_new_form_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FairScheduler(places=PlacesConfig(headroom=0))


def test_empty_or_none_keywords_meant_the_defaults() -> None:
    with pytest.warns(DeprecationWarning):
        s = FairScheduler(tiers={}, tenant_tiers=None, tenant_weights=None, headroom=None)
    assert s.tenants == TenantConfig() and s.places == PlacesConfig()


def test_bad_keyword_values_are_refused_as_before() -> None:
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="light_ratio"):
        FairScheduler(light_ratio=0.5)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="unknown tier"):
        FairScheduler(default_tier="gold")


def test_a_keyword_and_its_config_together_or_an_unknown_keyword_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"headroom=.*places="):
        FairScheduler(places=PlacesConfig(), headroom=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'pacing'"):
        FairScheduler(pacing=1.0)  # type: ignore[call-arg]
