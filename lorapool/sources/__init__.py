"""Where adapters come from: a source per URI scheme.

Built in: local paths and ``file://`` (:class:`LocalSource`), ``s3://``
(:class:`S3Source`, aiobotocore; the ``s3`` extra) and ``http(s)://``
(:class:`HttpSource`, httpx), declared in the ``lorapool.sources`` entry-point group
like a third-party package's schemes; :func:`register_source` adds or replaces a
scheme in code.
"""

from .base import Source, SourceFactory, available_schemes, make_source, register_source, scheme_of
from .http import HttpSource
from .local import LocalSource, local_path_of
from .s3 import S3Source

__all__ = [
    "HttpSource",
    "LocalSource",
    "S3Source",
    "Source",
    "SourceFactory",
    "available_schemes",
    "local_path_of",
    "make_source",
    "register_source",
    "scheme_of",
]
