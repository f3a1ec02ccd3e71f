"""The EvictionPolicy seam (defined with every other seam in :mod:`lorapool.abc`)."""

from lorapool.abc import EvictionPolicy

__all__ = ["EvictionPolicy"]
