"""Adapters under an S3 prefix, fetched with aiobotocore.

``s3://bucket/prefix`` names a directory: the source GETs
``prefix/adapter_config.json`` and ``prefix/adapter_model.safetensors``. It
works against any S3-compatible endpoint (MinIO, R2, Ceph, moto).
Credentials, region and endpoint come from the arguments or, when those are
left out, from the usual AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, profiles, instance roles) as botocore resolves them.

botocore's own retries are turned off: the store retries transient errors
with its backoff, so one policy decides how hard to try, and the number of
requests is what the store asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lorapool.abc import Source
from lorapool.errors import ExtraNotInstalled, SourceError, SourceNotFound

from ._files import open_for_writing
from .caps import fetch_limit

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["S3Source", "split_s3_uri"]

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_TRANSIENT = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
    }
)
_CHUNK = 1 << 20


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``("bucket", "prefix")`` from ``s3://bucket/prefix``."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise SourceError(uri, "expected s3://bucket/prefix", transient=False)
    return parts.netloc, parts.path.strip("/")


class S3Source(Source):
    """GETs adapter files from S3 or any S3-compatible endpoint with one aiobotocore client."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._client_kwargs: dict[str, Any] = {
            k: v
            for k, v in {
                "endpoint_url": endpoint_url,
                "region_name": region_name,
                "aws_access_key_id": aws_access_key_id,
                "aws_secret_access_key": aws_secret_access_key,
                "aws_session_token": aws_session_token,
            }.items()
            if v is not None
        }
        self._profile = profile
        self._timeouts = (connect_timeout, read_timeout)
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()

    def local_path(self, uri: str) -> Path | None:
        """S3 adapters are never local."""
        return None

    async def _s3(self) -> S3Client:
        async with self._lock:
            if self._client is not None:
                return self._client
            try:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session
            except ImportError as exc:
                raise ExtraNotInstalled("the s3:// source", "s3", str(exc)) from None
            session = get_session()
            if self._profile is not None:
                session.set_config_variable("profile", self._profile)
            config = AioConfig(
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=self._timeouts[0],
                read_timeout=self._timeouts[1],
            )
            stack = contextlib.AsyncExitStack()
            client = await stack.enter_async_context(
                session.create_client("s3", config=config, **self._client_kwargs)
            )
            self._stack, self._client = stack, client
            return client

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        """Stream object ``<prefix>/<name>`` into ``dest`` under the cap (:mod:`.caps`).

        An object whose ContentLength is over the cap is refused before its body
        is read; the body is counted as it is read and stopped one byte past the cap.
        """
        import aiohttp
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_uri(uri)
        key = f"{prefix}/{name}" if prefix else name
        label = f"s3://{bucket}/{key}"
        client = await self._s3()
        limit = fetch_limit()
        try:
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body, open_for_writing(dest, label, limit) as out:
                out.check_declared(response.get("ContentLength"))
                # Never ask for more than one byte past the cap.
                while chunk := await body.read(min(_CHUNK, out.room() + 1)):
                    await out.write(chunk)
                written = out.written
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND:
                raise SourceNotFound(label, code, hint="check the bucket and prefix") from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = code in _TRANSIENT or status >= 500
            detail = f"{code}: {error.get('Message', '')}"
            raise SourceError(label, detail, transient=transient) from exc
        except (BotoCoreError, OSError, aiohttp.ClientError) as exc:
            # Connection refused or reset, timeouts, truncated bodies.
            raise SourceError(label, f"{type(exc).__name__}: {exc}", transient=True) from exc
        return written

    def can_delete(self, uri: str) -> bool:
        """An adapter under a prefix can be deleted (given the credentials' permission);
        never a whole bucket (an adapter at a bucket's root)."""
        return bool(split_s3_uri(uri)[1])

    async def delete(self, uri: str) -> list[str]:
        """Delete the adapter's objects: the object ``<prefix>`` itself (an archive) and
        every object under ``<prefix>/``; returns their ``s3://`` URIs."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_uri(uri)
        client = await self._s3()
        deleted: list[str] = []
        try:
            keys: list[str] = []
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    key = str(item["Key"])
                    if key == prefix or key.startswith(f"{prefix}/"):
                        keys.append(key)
            for key in sorted(keys):
                await client.delete_object(Bucket=bucket, Key=key)
                deleted.append(f"s3://{bucket}/{key}")
        except ClientError as exc:
            error = exc.response.get("Error", {})
            detail = f"{error.get('Code', '')}: {error.get('Message', '')}"
            message = f"deleting it failed after {len(deleted)} objects: {detail}"
            raise SourceError(uri, message, transient=False) from exc
        except (BotoCoreError, OSError) as exc:
            message = f"deleting it failed after {len(deleted)} objects: {exc}"
            raise SourceError(uri, message, transient=True) from exc
        return deleted

    async def aclose(self) -> None:
        """Close the client."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
