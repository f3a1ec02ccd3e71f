"""Finding backends and policies by name through entry points.

Built-in plugins register through the same ``lorapool.backends`` and
``lorapool.policies`` groups as third-party ones, so a user's own policy is
selected exactly like a built-in one: by name, or by passing the object.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from lorapool.abc import EvictionPolicy, conform, lacks

__all__ = ["available", "load_backend_class", "load_policy", "policies_for_tiers"]

_BUILTIN_POLICIES = {
    "lru": "lorapool.policies.lru:LRUPolicy",
    "lru2": "lorapool.policies.lru2:LRU2Policy",
    "sieve": "lorapool.policies.sieve:SievePolicy",
    "s3fifo": "lorapool.policies.s3fifo:S3FIFOPolicy",
    "wtinylfu": "lorapool.policies.wtinylfu:WTinyLFUPolicy",
    "gdsf": "lorapool.policies.gdsf:GDSFPolicy",
    "ttl": "lorapool.policies.ttl:TTLPolicy",
}
_BUILTIN_BACKENDS = {
    "torch": "lorapool.backends.torch:TorchBackend",
    "vllm": "lorapool.backends.vllm:VLLMBackend",
    "openai": "lorapool.backends.openai:OpenAIServerBackend",
    "sglang": "lorapool.backends.sglang:SGLangBackend",
    "tgi": "lorapool.backends.tgi:TGIBackend",
}


def _resolve(group: str, name: str, builtins: dict[str, str]) -> Any:
    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()
    target = builtins.get(name)
    if target is None:
        names = sorted({ep.name for ep in entry_points(group=group)} | set(builtins))
        raise LookupError(f"no {group} plugin named {name!r}; available: {names}")
    module, _, attr = target.partition(":")
    import importlib

    return getattr(importlib.import_module(module), attr)


def available(group: str) -> list[str]:
    """Names registered in an entry-point group (``lorapool.backends`` / ``lorapool.policies``)."""
    builtins = _BUILTIN_POLICIES if group.endswith("policies") else _BUILTIN_BACKENDS
    return sorted({ep.name for ep in entry_points(group=group)} | set(builtins))


def load_policy(spec: str | EvictionPolicy) -> EvictionPolicy:
    """An eviction policy object from a name (``"lru"``) or the object itself."""
    if not isinstance(spec, str):
        return spec
    factory = _resolve("lorapool.policies", spec, _BUILTIN_POLICIES)
    policy: EvictionPolicy = factory()
    return policy


def load_backend_class(name: str) -> Any:
    """The backend class registered under ``name`` (``"torch"``, ...)."""
    return _resolve("lorapool.backends", name, _BUILTIN_BACKENDS)


_TIER_NAMES = ("device", "host", "disk")


def policies_for_tiers(spec: object = None) -> dict[str, EvictionPolicy]:
    """One eviction policy per tier from a store's ``eviction`` argument.

    ``None``: the defaults of ``lorapool.policies.DEFAULT_EVICTION``. A name or
    a policy class: that policy for every tier, one instance each. A policy
    object: the device tier's (a stateful object cannot serve two tiers); the
    other tiers keep their defaults. A mapping: per tier, any of the above,
    missing tiers defaulted.
    """
    from lorapool.policies import DEFAULT_EVICTION

    def make(item: object, tier: str) -> EvictionPolicy:
        if item is None:
            return load_policy(DEFAULT_EVICTION[tier])
        if isinstance(item, str):
            return load_policy(item)
        if isinstance(item, type):
            policy: EvictionPolicy = item()
            return policy
        if not lacks(item, EvictionPolicy):
            return conform(item, EvictionPolicy, what="an eviction policy")  # type: ignore[arg-type]
        raise TypeError(
            f"eviction for the {tier} tier must be a policy name, class or object, "
            f"not {type(item).__name__}"
        )

    if isinstance(spec, Mapping):
        unknown = set(spec) - set(_TIER_NAMES)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)} in eviction; use {_TIER_NAMES}")
        return {t: make(spec.get(t), t) for t in _TIER_NAMES}
    if spec is None or isinstance(spec, (str, type)):
        return {t: make(spec, t) for t in _TIER_NAMES}
    return {t: make(spec if t == "device" else None, t) for t in _TIER_NAMES}

