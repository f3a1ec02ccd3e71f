"""Deprecated module paths from before the wings became packages.

``import lorapool.fair`` (and the other flat modules of 0.1) still works: the
finder below answers those names with the module that now holds the code, and
warns once with a :class:`DeprecationWarning` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED: dict[str, str] = {
    "lorapool.fair": "lorapool.scheduler.fair",
    "lorapool.scheduling": "lorapool.scheduler",
    "lorapool.handoff": "lorapool.scheduler.handoff",
    "lorapool.tiers": "lorapool.store.tiers",
    "lorapool.disk": "lorapool.store.disk",
    "lorapool.registry_store": "lorapool.registry.stores",
    "lorapool.adapters": "lorapool.formats",
}
"""Old module path -> the module that holds its code now."""


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} is deprecated; import from {self._target}",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self._target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(new))


def install() -> None:
    """Answer the old module paths (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
