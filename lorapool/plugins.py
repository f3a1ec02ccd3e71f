"""Finding backends, eviction policies and sources by name, through entry points.

=====================  =================================  ==============================
group                  built-in names                     what a name loads
=====================  =================================  ==============================
``lorapool.backends``  torch, vllm, openai, sglang, tgi   a backend class
``lorapool.policies``  lru, lru2, sieve, s3fifo,          an eviction policy class
                       wtinylfu, gdsf, ttl
``lorapool.sources``   file, s3, http, https              a source class (one per scheme)
=====================  =================================  ==============================

Built-in plugins are declared in lorapool's own ``pyproject.toml`` under these
groups, exactly as a third-party package declares its own::

    [project.entry-points."lorapool.backends"]
    mybackend = "my_package.backend:MyBackend"

so once that package is installed, ``kind = "mybackend"`` in ``server.toml``
and ``lorapool bench serve --target mybackend`` find it with no change to
lorapool. Loading a name imports only the module that defines it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any, Final, cast

from lorapool.abc import Backend, EvictionPolicy, Source, conform, lacks
from lorapool.errors import PluginNotFound

__all__ = [
    "BACKENDS",
    "DEFAULT_EVICTION",
    "POLICIES",
    "SOURCES",
    "available",
    "load_backend",
    "load_policy",
    "load_source",
    "policies_for_tiers",
]

BACKENDS = "lorapool.backends"
"""The entry-point group of backends: name -> backend class."""
POLICIES = "lorapool.policies"
"""The entry-point group of eviction policies: name -> policy class."""
SOURCES = "lorapool.sources"
"""The entry-point group of sources: URI scheme -> source class."""


def _entry_points(group: str) -> dict[str, EntryPoint]:
    """The group's entry points by name (the first installed one wins a name)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def available(group: str) -> list[str]:
    """The names registered in an entry-point group (:data:`BACKENDS`, ...), sorted."""
    return sorted(_entry_points(group))


def _load(group: str, name: str) -> Any:
    eps = _entry_points(group)
    ep = eps.get(name)
    if ep is None:
        raise PluginNotFound(group, name, sorted(eps))
    return ep.load()


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name`` (``"torch"``, ``"vllm"``, ...).

    Build it with its constructor, or from a config's values with its
    ``from_config(model, **options)`` (built-in backends inherit it from
    :class:`lorapool.backends.base.BaseBackend`). Raises
    :class:`~lorapool.errors.PluginNotFound` for a name no installed package declares.
    """
    cls: type[Backend] = _load(BACKENDS, name)
    return cls


def load_source(scheme: str) -> Callable[..., Source]:
    """The source class registered for URI scheme ``scheme`` (``"s3"``, ...).

    Called with the source's settings (none: its defaults), it makes a source.
    Raises :class:`~lorapool.errors.PluginNotFound` for a scheme no package declares.
    """
    factory: Callable[..., Source] = _load(SOURCES, scheme.lower())
    return factory


def load_policy(spec: str | EvictionPolicy) -> EvictionPolicy:
    """An eviction policy object from a name (``"lru"``) or the object itself.

    Raises :class:`~lorapool.errors.PluginNotFound` for a name no package declares.
    """
    if not isinstance(spec, str):
        return spec
    factory = _load(POLICIES, spec)
    policy: EvictionPolicy = factory()
    return policy


_TIER_NAMES = ("device", "host", "disk")


DEFAULT_EVICTION: Final[Mapping[str, str]] = MappingProxyType(
    {"device": "wtinylfu", "host": "sieve", "disk": "sieve"}
)
"""Entry-point name of the default eviction policy of each tier (``docs/decisions.md``
explains the choice with the cache simulator's results)."""


def policies_for_tiers(spec: object = None) -> dict[str, EvictionPolicy]:
    """One eviction policy per tier from a store's ``eviction`` argument.

    ``None``: the defaults of :data:`DEFAULT_EVICTION`. A name or
    a policy class: that policy for every tier, one instance each. A policy
    object: the device tier's (a stateful object cannot serve two tiers); the
    other tiers keep their defaults. A mapping: per tier, any of the above,
    missing tiers defaulted.
    """

    def make(item: object, tier: str) -> EvictionPolicy:
        if item is None:
            return load_policy(DEFAULT_EVICTION[tier])
        if isinstance(item, str):
            return load_policy(item)
        if isinstance(item, type):
            policy: EvictionPolicy = item()
            return policy
        if not lacks(item, EvictionPolicy):
            policy = cast(EvictionPolicy, item)
            return conform(policy, EvictionPolicy, what="an eviction policy")
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
