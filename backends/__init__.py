"""Engine backends: one module or sub-package per engine, all behind :class:`Backend`.

Backends are found by name through the ``lorapool.backends`` entry-point group
(see :func:`lorapool.plugins.load_backend`); importing this package imports no
engine.
"""

from .base import Backend

__all__ = ["Backend"]
