"""Adapters served as files over HTTP(S), fetched with httpx.

``https://host/adapters/acme`` names a directory: the source GETs
``.../acme/adapter_config.json`` and ``.../acme/adapter_model.safetensors``,
streaming each to disk under the cap the store set (:mod:`.caps`): a
Content-Length over it is refused before the body is read, and a body without
one (or with a wrong one) is stopped as soon as it goes past the cap.

Redirects are followed by the source itself, hop by hop, and only to URLs
within the allowed prefixes: those given as ``allowed_prefixes``, or else the
adapter's own directory (same scheme, host and port, a path under it). A
refused URL is never requested, so the refusal says nothing about whether it
exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote

import httpx

from lorapool.abc import Source
from lorapool.errors import SourceError, SourceNotFound

from ._files import open_for_writing
from .caps import fetch_limit

__all__ = ["HttpSource"]

_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 1 << 20
_MAX_REDIRECTS = 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
_OUTSIDE = "a URL outside the allowed prefixes is not allowed"
_REDIRECT_OUTSIDE = "redirect to a URL outside the allowed prefixes is not allowed"


class HttpSource(Source):
    """GETs adapter files with one shared :class:`httpx.AsyncClient`.

    Pass ``client`` to control TLS, proxies, auth or transports; otherwise one
    is created on first use with ``headers`` and ``timeout``, and closed by
    :meth:`aclose`. Redirects are followed here, never by the client, at most
    10 per file: with ``allowed_prefixes`` (``["https://cdn.example.com/adapters/"]``)
    the adapter's URL and every redirect must start with one of them; without,
    a redirect must stay under the adapter's own directory. Anything else is a
    permanent :class:`~lorapool.errors.SourceError` saying it is not allowed.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        allowed_prefixes: Sequence[str] | None = None,
    ) -> None:
        self._client = client
        self._owns_client = client is None
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._allowed: list[httpx.URL] | None = None
        if allowed_prefixes is not None:
            if isinstance(allowed_prefixes, str):
                raise TypeError("allowed_prefixes is a list of URL prefixes, not one string")
            self._allowed = [_prefix(p) for p in allowed_prefixes]

    def local_path(self, uri: str) -> Path | None:
        """HTTP adapters are never local."""
        return None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers, timeout=self._timeout, follow_redirects=False
            )
        return self._client

    def _prefixes(self, uri: str) -> list[httpx.URL]:
        """The prefixes a URL of adapter ``uri`` must start with."""
        if self._allowed is not None:
            return self._allowed
        return [_prefix(uri.rstrip("/") + "/")]

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        """Stream ``<uri>/<name>`` into ``dest``, following allowed redirects, under the cap."""
        url = f"{uri.rstrip('/')}/{name}"
        try:
            prefixes = self._prefixes(uri)
            target = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            raise SourceError(url, "not a valid http(s) URL", transient=False) from None
        if not _within(target, prefixes):
            raise SourceError(url, _OUTSIDE, transient=False)
        limit = fetch_limit()
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                async with self._http().stream("GET", target, follow_redirects=False) as response:
                    if response.has_redirect_location:
                        target = _redirect_target(url, response, prefixes)
                        continue
                    _check_status(url, response.status_code)
                    async with open_for_writing(dest, url, limit) as out:
                        out.check_declared(_content_length(response))
                        async for chunk in response.aiter_bytes(_CHUNK):
                            await out.write(chunk)
                        return out.written
        except httpx.TransportError as exc:
            raise SourceError(url, f"{type(exc).__name__}: {exc}", transient=True) from exc
        except httpx.HTTPError as exc:
            raise SourceError(url, f"{type(exc).__name__}: {exc}", transient=False) from exc
        raise SourceError(url, f"more than {_MAX_REDIRECTS} redirects", transient=False)

    async def aclose(self) -> None:
        """Close the client if this source created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None


def _redirect_target(
    url: str, response: httpx.Response, prefixes: Sequence[httpx.URL]
) -> httpx.URL:
    """Where a redirect points, if that is within ``prefixes`` (never echoing the target)."""
    try:
        target = response.url.join(response.headers["location"])
    except httpx.InvalidURL:
        raise SourceError(url, _REDIRECT_OUTSIDE, transient=False) from None
    if not _within(target, prefixes):
        raise SourceError(url, _REDIRECT_OUTSIDE, transient=False)
    return target


def _check_status(url: str, status: int) -> None:
    """Raise the source error of an HTTP error status (never echoing the body)."""
    if status == 404:
        raise SourceNotFound(url, "HTTP 404", hint="check the adapter URL")
    if status >= 300:
        raise SourceError(url, f"HTTP {status}", transient=status in _TRANSIENT_STATUS)


def _content_length(response: httpx.Response) -> int | None:
    """The announced body size, if the server gave a usable one."""
    raw = response.headers.get("content-length", "")
    return int(raw) if raw.isdigit() else None


def _prefix(prefix: str) -> httpx.URL:
    """A prefix as a URL: http(s), with a host."""
    url = httpx.URL(prefix)
    if url.scheme not in _DEFAULT_PORTS or not url.host:
        raise ValueError(f"an allowed prefix must be an http(s) URL with a host: {prefix!r}")
    return url


def _port(url: httpx.URL) -> int | None:
    return url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)


def _within(url: httpx.URL, prefixes: Sequence[httpx.URL]) -> bool:
    """Whether ``url`` is under one of ``prefixes``: same scheme, host, port and credentials,
    and a path at or below the prefix's (whole segments; no ``..`` even percent-encoded)."""
    path = url.path
    if ".." in unquote(path).split("/"):
        return False
    for prefix in prefixes:
        if (url.scheme, url.host, _port(url), url.userinfo) != (
            prefix.scheme,
            prefix.host,
            _port(prefix),
            prefix.userinfo,
        ):
            continue
        base = prefix.path
        if path == base or path.startswith(base if base.endswith("/") else base + "/"):
            return True
    return False
