"""The Source seam and the registry of URI schemes.

A source knows how to copy one file of an adapter directory from where the
adapter lives (a local directory, an S3 prefix, an HTTP directory) to a local
file. The store decides where that file goes, checks its sha256 and retries
transient failures; a source only moves bytes, like an fsspec protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from lorapool.abc import Source
from lorapool.errors import InvalidRequest

__all__ = [
    "Source",
    "SourceFactory",
    "available_schemes",
    "make_source",
    "register_source",
    "scheme_of",
]


SourceFactory = Callable[[], Source]

_FACTORIES: dict[str, SourceFactory] = {}


def register_source(scheme: str, factory: SourceFactory) -> None:
    """Serve URIs of ``scheme`` (``"s3"``, ``"gs"``, ...) with sources made by ``factory``.

    Registering a scheme again replaces the earlier factory. A store can also
    be given ready-made sources per scheme (``TieredStore(sources={...})``).
    """
    if not scheme or not scheme.isascii() or not scheme.replace("+", "").isalnum():
        raise ValueError(f"not a URI scheme: {scheme!r}")
    _FACTORIES[scheme.lower()] = factory


def available_schemes() -> list[str]:
    """The schemes that have a registered source."""
    _register_builtins()
    return sorted(_FACTORIES)


def scheme_of(uri: str) -> str:
    """``"file"`` for plain paths and ``file://`` URIs, else the URI's scheme."""
    scheme = urlsplit(uri).scheme.lower()
    # A one-letter "scheme" is a Windows drive, not a protocol.
    return scheme if len(scheme) > 1 else "file"


def make_source(scheme: str) -> Source:
    """A new source for ``scheme`` from the registry."""
    _register_builtins()
    factory = _FACTORIES.get(scheme)
    if factory is None:
        raise InvalidRequest(
            f"no source handles {scheme!r} URIs; known schemes: {sorted(_FACTORIES)} "
            "(lorapool.sources.register_source adds one)"
        )
    return factory()


_builtins_done = False


def _register_builtins() -> None:
    global _builtins_done
    if _builtins_done:
        return
    _builtins_done = True
    from .http import HttpSource
    from .local import LocalSource
    from .s3 import S3Source

    for scheme, factory in (
        ("file", LocalSource),
        ("s3", S3Source),
        ("http", HttpSource),
        ("https", HttpSource),
    ):
        _FACTORIES.setdefault(scheme, factory)
