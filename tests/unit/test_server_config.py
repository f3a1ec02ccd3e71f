"""Server config and the trusted-gateway auth mode (ASGI in process, MockBackend)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytest.importorskip("starlette")

from lorapool import AdapterPool
from lorapool.backends.openai import OpenAIServerBackend
from lorapool.server import TrustedHeader, create_app
from lorapool.server.config import ServerConfig, load_config
from lorapool.sources import HttpSource, S3Source
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


def test_the_backend_is_found_by_name_and_built_from_its_options() -> None:
    config = ServerConfig.model_validate(
        {
            "backend": {
                "kind": "openai",
                "model": "http://vllm.internal:8000/",
                "max_slots": 3,
                "options": {"model": "served-base", "flavor": "sglang"},
            }
        }
    )
    backend = config.build_backend()
    assert isinstance(backend, OpenAIServerBackend)
    assert backend.base_url == "http://vllm.internal:8000" and backend.model == "served-base"
    assert (backend.flavor, backend.max_slots, backend.max_batch) == ("sglang", 3, 32)
    with pytest.raises(ValueError, match=r"no backend named 'nope'.*'torch'"):
        ServerConfig.model_validate({"backend": {"kind": "nope"}})
    no_url = ServerConfig.model_validate({"backend": {"kind": "tgi"}})
    with pytest.raises(ValueError, match="TGIBackend needs a model"):
        no_url.build_backend()


def test_any_installed_scheme_takes_source_settings() -> None:
    config = ServerConfig.model_validate(
        {"store": {"sources": {"https": {"headers": {"authorization": "Bearer t"}}}}}
    )
    [source] = config.store.build_sources().values()
    assert isinstance(source, HttpSource) and source._headers == {"authorization": "Bearer t"}


def test_the_environment_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        """
[backend]
kind = "openai"
model = "http://file:8000"
max_slots = 2

[server]
port = 8000
"""
    )
    monkeypatch.setenv("LORAPOOL_BACKEND__MAX_SLOTS", "8")
    monkeypatch.setenv("LORAPOOL_SERVER__PORT", "9001")
    monkeypatch.setenv("LORAPOOL_KEYS", '{"sk-env": {"tenant": "acme", "admin": true}}')
    monkeypatch.setenv("LORAPOOL_CACHE_DIR", str(tmp_path))  # another lorapool variable: ignored
    config = load_config(path)
    assert config.backend.max_slots == 8 and config.backend.model == "http://file:8000"
    assert config.server.port == 9001 and config.keys["sk-env"].admin
    monkeypatch.setenv("LORAPOOL_BACKEND__KIND", "no-such-backend")
    with pytest.raises(ValueError, match="no backend named 'no-such-backend'"):
        load_config(path)
    monkeypatch.setenv("LORAPOOL_BACKEND__KIND", "openai")
    monkeypatch.setenv("LORAPOOL_BACKEND__MODEL", "http://env:8000")
    assert load_config().backend.model == "http://env:8000"  # no file: the environment alone


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


def test_an_option_the_backend_does_not_take_is_refused_by_name() -> None:
    from lorapool.backends.base import build_backend
    from lorapool.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=r"'openai' backend refused its options.*no_such_knob"):
        build_backend("openai", "http://127.0.0.1:9", no_such_knob=1)
