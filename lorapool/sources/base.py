"""The Source seam and how a URI scheme finds its source.

A source knows how to copy one file of an adapter directory from where the
adapter lives (a local directory, an S3 prefix, an HTTP directory) to a local
file. The store decides where that file goes, checks its sha256 and retries
transient failures; a source only moves bytes, like an fsspec protocol.

Sources are found by scheme through the ``lorapool.sources`` entry-point group
(:func:`lorapool.plugins.load_source`), where the built-in ``file``, ``s3``,
``http`` and ``https`` are declared like a third-party package's. In code,
:func:`register_source` sets a scheme's factory for this process, over what the
entry points say.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from lorapool.abc import Source, conform
from lorapool.errors import InvalidRequest, PluginNotFound
from lorapool.plugins import SOURCES, available, load_source

__all__ = [
    "Source",
    "SourceFactory",
    "available_schemes",
    "make_source",
    "register_source",
    "scheme_of",
]


SourceFactory = Callable[[], Source]

_OVERRIDES: dict[str, SourceFactory] = {}


def register_source(scheme: str, factory: SourceFactory) -> None:
    """Serve URIs of ``scheme`` (``"s3"``, ``"gs"``, ...) with sources made by ``factory``.

    For this process, over the ``lorapool.sources`` entry points (a package
    declares its scheme there instead). Registering a scheme again replaces the
    earlier factory. A store can also be given ready-made sources per scheme
    (``TieredStore(sources={...})``).
    """
    if not scheme or not scheme.isascii() or not scheme.replace("+", "").isalnum():
        raise ValueError(f"not a URI scheme: {scheme!r}")
    _OVERRIDES[scheme.lower()] = factory


def available_schemes() -> list[str]:
    """The schemes that have a source: entry points and :func:`register_source`."""
    return sorted(set(available(SOURCES)) | set(_OVERRIDES))


def scheme_of(uri: str) -> str:
    """``"file"`` for plain paths and ``file://`` URIs, else the URI's scheme."""
    scheme = urlsplit(uri).scheme.lower()
    # A one-letter "scheme" is a Windows drive, not a protocol.
    return scheme if len(scheme) > 1 else "file"


def make_source(scheme: str) -> Source:
    """A new source for ``scheme``, with its default settings.

    Refuses a scheme no source handles with :class:`~lorapool.errors.InvalidRequest`
    (the URI is the caller's mistake) naming the known ones.
    """
    factory = _OVERRIDES.get(scheme.lower())
    if factory is not None:
        return conform(factory(), Source, what=f"a source for {scheme!r}")
    try:
        return conform(load_source(scheme)(), Source, what=f"a source for {scheme!r}")
    except PluginNotFound:
        raise InvalidRequest(
            f"no source handles {scheme!r} URIs; known schemes: {available_schemes()} "
            "(a package declares one in the lorapool.sources entry-point group)"
        ) from None
