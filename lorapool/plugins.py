"""Finding backends and policies by name through entry points.

Built-in plugins register through the same ``lorapool.backends`` and
``lorapool.policies`` groups as third-party ones, so a user's own policy is
selected exactly like a built-in one: by name, or by passing the object.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorapool.policies.base import EvictionPolicy

__all__ = ["available", "load_backend_class", "load_policy"]

_BUILTIN_POLICIES = {"lru": "lorapool.policies.lru:LRUPolicy"}
_BUILTIN_BACKENDS = {"torch": "lorapool.backends.torch:TorchBackend"}


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
