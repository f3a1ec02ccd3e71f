"""Server config and the trusted-gateway auth mode (ASGI in process, MockBackend)."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("starlette")

from lorapool import AdapterPool
from lorapool.server import TrustedHeader, create_app
from lorapool.server.config import ServerConfig
from lorapool.sources import S3Source
from lorapool.testing import MockBackend


def test_sources_come_from_the_config() -> None:
    config = ServerConfig.model_validate(
        {
            "store": {"sources": {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}},
            "keys": {"k": {"tenant": "t"}},
        }
    )
    sources = config.store.build_sources()
    assert isinstance(sources["s3"], S3Source)
    assert sources["s3"]._client_kwargs["endpoint_url"] == "http://127.0.0.1:9000"
    with pytest.raises(ValueError):
        ServerConfig.model_validate({"store": {"sources": {"ftp": {}}}})


def test_header_mode_takes_the_tenant_from_the_gateway_header() -> None:
    config = ServerConfig.model_validate(
        {
            "auth": {"mode": "header", "header": "x-org"},
            "keys": {"k": {"tenant": "ops", "admin": True}},
        }
    )
    auth = config.build_auth()
    assert isinstance(auth, TrustedHeader) and auth.admin_tenants == frozenset({"ops"})


async def test_trusted_header_requests_are_scoped_to_that_tenant() -> None:
    pool = AdapterPool(MockBackend())
    app = create_app(pool, auth=TrustedHeader("x-tenant-id"))
    await pool.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            r = await http.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await http.get("/v1/models", headers={"x-tenant-id": "acme"})
            assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["mock"]
            body = {"model": "mock", "prompt": "hi", "max_tokens": 3}
            r = await http.post("/v1/completions", json=body, headers={"x-tenant-id": "acme"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert pool.usage("acme").completed == 1
    finally:
        await pool.aclose()
