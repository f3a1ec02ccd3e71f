"""Adapters served as files over HTTP(S), fetched with httpx.

``https://host/adapters/acme`` names a directory: the source GETs
``.../acme/adapter_config.json`` and ``.../acme/adapter_model.safetensors``,
streaming each to disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import httpx

from lorapool.abc import Source
from lorapool.errors import SourceError, SourceNotFound

from ._files import open_for_writing

__all__ = ["HttpSource"]

_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 1 << 20


class HttpSource(Source):
    """GETs adapter files with one shared :class:`httpx.AsyncClient`.

    Pass ``client`` to control TLS, proxies, auth or transports; otherwise one
    is created on first use with ``headers`` and ``timeout``, and closed by
    :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._client = client
        self._owns_client = client is None
        self._headers = dict(headers or {})
        self._timeout = timeout

    def local_path(self, uri: str) -> Path | None:
        """HTTP adapters are never local."""
        return None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers, timeout=self._timeout, follow_redirects=True
            )
        return self._client

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        """Stream ``<uri>/<name>`` into ``dest``."""
        url = f"{uri.rstrip('/')}/{name}"
        written = 0
        try:
            async with self._http().stream("GET", url) as response:
                if response.status_code == 404:
                    raise SourceNotFound(url, "HTTP 404", hint="check the adapter URL")
                if response.status_code >= 400:
                    raise SourceError(
                        url,
                        f"HTTP {response.status_code}",
                        transient=response.status_code in _TRANSIENT_STATUS,
                    )
                async with open_for_writing(dest) as out:
                    async for chunk in response.aiter_bytes(_CHUNK):
                        await out.write(chunk)
                        written += len(chunk)
        except httpx.TransportError as exc:
            raise SourceError(url, f"{type(exc).__name__}: {exc}", transient=True) from exc
        except httpx.HTTPError as exc:
            raise SourceError(url, f"{type(exc).__name__}: {exc}", transient=False) from exc
        return written

    async def aclose(self) -> None:
        """Close the client if this source created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None
