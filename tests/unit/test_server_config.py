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


# -- secrets from files ---------------------------------------------------------------


def test_a_key_read_from_a_file_authenticates(tmp_path: Path) -> None:
    secret = tmp_path / "acme.key"
    secret.write_text("sk-from-file\n")  # as `echo` and most secret stores write it
    metrics = tmp_path / "metrics.key"
    metrics.write_text("mk-from-file\r\n")
    config = ServerConfig.model_validate(
        {
            "keys": {"acme": {"key_file": str(secret), "tenant": "acme", "tier": "gold"}},
            "tiers": {"gold": {"weight": 2}},
            "server": {"metrics_key_file": str(metrics)},
        }
    )
    assert config.server.metrics_key == "mk-from-file"
    assert set(config.keys) == {"sk-from-file"}  # the label is not a key
    assert config.build_scheduler().tier_of("acme") == "gold"


async def test_a_file_key_over_http(tmp_path: Path) -> None:
    secret = tmp_path / "k"
    secret.write_text("sk-file-key\n")
    config = ServerConfig.model_validate(
        {"keys": {"ops": {"key_file": str(secret), "tenant": "ops"}}}
    )
    pool = AdapterPool(MockBackend())
    app = config.build_app(pool)
    await pool.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            ok = await http.get("/v1/models", headers={"authorization": "Bearer sk-file-key"})
            assert ok.status_code == 200
            bad = await http.get("/v1/models", headers={"authorization": "Bearer ops"})
            assert bad.status_code == 401
    finally:
        await pool.aclose()


def test_a_missing_or_empty_secret_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"keys\.acme\.key_file: cannot read .*nope"):
        ServerConfig.model_validate({"keys": {"acme": {"key_file": str(missing), "tenant": "a"}}})
    with pytest.raises(ValueError, match=r"server\.metrics_key_file: cannot read .*nope"):
        ServerConfig.model_validate({"server": {"metrics_key_file": str(missing)}})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ServerConfig.model_validate({"keys": {"x": {"key_file": str(empty), "tenant": "a"}}})
    both = tmp_path / "m"
    both.write_text("m")
    with pytest.raises(ValueError, match="not both"):
        ServerConfig.model_validate(
            {"server": {"metrics_key": "inline", "metrics_key_file": str(both)}}
        )
    # and through the file and the command line
    toml = tmp_path / "server.toml"
    toml.write_text(f'[keys]\nacme = {{ key_file = "{missing}", tenant = "acme" }}\n')
    with pytest.raises(ValueError, match=r"keys\.acme\.key_file"):
        load_config(toml)
    from lorapool.__main__ import main

    assert main(["serve", "--check", str(toml)]) == 2


def test_serve_prints_the_shipped_example_config(capsys: pytest.CaptureFixture[str]) -> None:
    from lorapool.__main__ import main

    assert main(["serve", "--print-example-config"]) == 0
    text = capsys.readouterr().out
    root = Path(__file__).resolve().parents[2]
    # One source: examples/server.toml is the packaged file.
    assert text == (root / "examples" / "server.toml").read_text()
    assert text == (root / "lorapool" / "server" / "example.toml").read_text()
    import tomllib

    config = ServerConfig.model_validate(tomllib.loads(text))
    assert {t.cold_start for t in config.tiers.values()} == {"wait"}  # fallback is opt-in
    assert main(["serve", "--check", str(root / "examples" / "server.toml")]) == 0


# -- [[adapters]] registered at start ---------------------------------------------------


def _adapter(tmp_path: Path, name: str, alpha: int = 8) -> Path:
    from .test_formats_peft import make_dir

    d = tmp_path / name
    d.mkdir()
    return make_dir(d, {"lora_alpha": alpha})


def _adapters_config(tmp_path: Path, entries: list[dict[str, object]]) -> ServerConfig:
    return ServerConfig.model_validate(
        {
            "registry": str(tmp_path / "registry.sqlite"),
            "keys": {"sk-acme": {"tenant": "acme"}, "sk-globex": {"tenant": "globex"}},
            "registration": {"tenant_sources": []},  # HTTP may register nothing
            "adapters": entries,
        }
    )


async def test_adapters_are_registered_before_ready_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = _adapter(tmp_path, "one"), _adapter(tmp_path, "two", alpha=16)
    config = _adapters_config(
        tmp_path,
        [
            {"name": "support", "source": str(one), "tenant": "acme", "preload": True},
            {"name": "shared", "source": str(two), "tenant": "globex", "shared": True},
        ],
    )
    pool = AdapterPool(MockBackend(), registry=config.registry)
    app = config.build_app(pool)
    caplog.set_level("INFO", logger="lorapool.server.config")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/ready")).status_code == 200
            r = await http.get("/v1/models", headers={"authorization": "Bearer sk-acme"})
            ids = {m["id"] for m in r.json()["data"]}
            assert {"acme/support", "globex/shared"} <= ids
            body = {"model": "acme/support", "prompt": "hi", "max_tokens": 2}
            r = await http.post(
                "/v1/completions", json=body, headers={"authorization": "Bearer sk-acme"}
            )
            assert r.status_code == 200
        lines = [r for r in caplog.records if r.name == "lorapool.server.config"]
        assert [r.progress for r in lines] == ["1/2", "2/2"]  # type: ignore[attr-defined]
        assert [r.adapter for r in lines] == ["acme/support", "globex/shared"]  # type: ignore[attr-defined]
        assert all(r.took_s >= 0 for r in lines)  # type: ignore[attr-defined]
        assert lines[0].resident in ("device", "host")  # type: ignore[attr-defined]


async def test_a_restart_keeps_what_is_registered_and_refuses_a_changed_source(
    tmp_path: Path,
) -> None:
    from lorapool.server import LocalPool

    one, other = _adapter(tmp_path, "one"), _adapter(tmp_path, "other", alpha=16)
    entry = {"name": "support", "source": str(one), "tenant": "acme", "pin": True}
    config = _adapters_config(tmp_path, [entry])
    for _ in range(2):  # the second start finds it in the persistent registry
        async with AdapterPool(MockBackend(), registry=config.registry) as pool:
            start = config.on_start()
            assert start is not None
            await start(LocalPool(pool))
            assert [i.adapter_id for i in pool.list_adapters(tenant="acme")] == ["acme/support"]
    # the same name from another source: start-up fails, naming the entry
    moved = _adapters_config(tmp_path, [{**entry, "source": str(other)}])
    async with AdapterPool(MockBackend(), registry=config.registry) as pool:
        start = moved.on_start()
        assert start is not None
        with pytest.raises(RuntimeError, match=r"entry 1 \('support' of tenant 'acme'\).*other"):
            await start(LocalPool(pool))
    # the files at the same source changed since: refused too (the registry holds a hash)
    (one / "adapter_config.json").write_text(
        (one / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": 9')
    )
    async with AdapterPool(MockBackend(), registry=config.registry) as pool:
        start = config.on_start()
        assert start is not None
        with pytest.raises(RuntimeError, match="changed since"):
            await start(LocalPool(pool))


async def test_a_failed_registration_fails_start_up_naming_the_entry(tmp_path: Path) -> None:
    good = _adapter(tmp_path, "good")
    config = _adapters_config(
        tmp_path,
        [
            {"name": "fine", "source": str(good), "tenant": "acme"},
            {"name": "broken", "source": str(tmp_path / "missing"), "tenant": "globex"},
        ],
    )
    pool = AdapterPool(MockBackend(), registry=config.registry)
    app = config.build_app(pool)
    with pytest.raises(RuntimeError, match=r"entry 2 \('broken' of tenant 'globex'\).*missing"):
        async with app.router.lifespan_context(app):
            pass
    with pytest.raises(ValueError, match="listed more than once"):
        _adapters_config(tmp_path, [{"name": "a", "source": "/x", "tenant": "t"}] * 2)


def test_serve_without_the_server_extra_says_what_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "server.toml"
    config.write_text("")
    code = (
        "import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
        "from lorapool.__main__ import main\n"
        f"sys.exit(main(['serve', {str(config)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert 'pip install "lorapool[server]"' in done.stderr
    # the example config needs no extra: it is read through the lorapool package
    code = code.replace(f"['serve', {str(config)!r}]", "['serve', '--print-example-config']")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "[[adapters]]" in done.stdout, done.stderr


def test_store_retry_policy_comes_from_the_config() -> None:
    config = ServerConfig.model_validate(
        {
            "store": {"retry": {"attempts": 7, "initial": 0.05, "max_delay": 2.0}},
            "keys": {"k": {"tenant": "t"}},
        }
    )
    pool = config.build_pool()
    policy = pool.store._fetcher.retry
    assert (policy.attempts, policy.initial, policy.max_delay) == (7, 0.05, 2.0)
    default = ServerConfig.model_validate({"keys": {"k": {"tenant": "t"}}}).build_pool()
    assert default.store._fetcher.retry.initial == 0.2
    with pytest.raises(ValueError, match="attemps"):
        ServerConfig.model_validate({"store": {"retry": {"attemps": 3}}})


async def test_drain_and_ping_settings_reach_the_app() -> None:
    config = ServerConfig.model_validate(
        {
            "keys": {"sk-a": {"tenant": "a"}},
            "server": {"drain_retry_after": 17, "sse_ping_interval": 2.5},
        }
    )
    pool = AdapterPool(MockBackend())
    app = config.build_app(pool)
    await pool.start()
    try:
        app.state.drain.begin()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            refused = await http.get("/v1/models", headers={"authorization": "Bearer sk-a"})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "17"
    finally:
        await pool.aclose()
    with pytest.raises(ValueError, match="sse_ping_interval"):
        ServerConfig.model_validate({"server": {"sse_ping_interval": 0}})


def test_tracing_is_off_unless_the_config_turns_it_on() -> None:
    assert ServerConfig.model_validate({}).tracing.enabled is False
    on = ServerConfig.model_validate({"tracing": {"enabled": True}})
    assert on.tracing.enabled is True
