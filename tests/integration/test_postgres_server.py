"""The example server with ``registry = "postgresql://..."`` (issue 31, item 2): two
server processes on one database behind no balancer but the test, the openai client
alternating between them: an adapter loaded through one answers the same through the
other, an unload through the other is refused by both at once, and both servers'
changes are in one verified audit chain in the database; a tenant's rate limit
(``rate_limits = "shared"``) holds over both servers together. Also the config's checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from lorapool.registry import Registry
from lorapool.registry.postgres import PostgresRegistryStore
from lorapool.server.config import ServerConfig

from .postgres_server import PostgresServer, fresh_schema, postgres

__all__ = ["postgres"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from .serving import free_port  # noqa: E402
from .test_server_example import start_example, write_config  # noqa: E402


def test_the_config_takes_a_postgres_url(postgres: PostgresServer, tmp_path: Path) -> None:
    schema = fresh_schema()
    config = ServerConfig(registry=postgres.dsn, registry_schema=schema)
    registry = config.build_registry()
    assert isinstance(registry, Registry) and isinstance(registry.store, PostgresRegistryStore)
    assert registry.store.schema == schema
    registry.close()
    sqlite = str(tmp_path / "r.sqlite")
    assert ServerConfig(registry=sqlite).build_registry() == sqlite
    with pytest.raises(ValueError, match="postgresql:// registry only"):
        ServerConfig(registry=sqlite, registry_schema="other")
    with pytest.raises(ValueError, match="schema"):
        ServerConfig(registry=postgres.dsn, registry_schema="Bad-Name")
    with pytest.raises(ValueError, match="needs a postgresql:// registry"):
        ServerConfig(registry=sqlite, rate_limits="shared")


def _tail(log: Path) -> str:
    return _tail(log)


async def _ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            try:
                if (await http.get("/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, _tail(log)
            assert time.monotonic() < deadline, _tail(log)
            await asyncio.sleep(0.5)


async def test_two_servers_on_one_database_answer_alike(
    postgres: PostgresServer,
    tmp_path: Path,
    model_dir: Path,
    adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = fresh_schema()
    monkeypatch.setenv("LORAPOOL_REGISTRY", postgres.dsn)
    monkeypatch.setenv("LORAPOOL_REGISTRY_SCHEMA", schema)
    # globex's limit (3 requests, then one per 1000 s) is counted over both servers
    monkeypatch.setenv("LORAPOOL_RATE_LIMITS", "shared")
    limited = {"requests_per_s": 0.001, "request_burst": 3}
    monkeypatch.setenv("LORAPOOL_TIERS", json.dumps({"limited": limited, "default": {}}))
    monkeypatch.setenv("LORAPOOL_DEFAULT_TIER", "default")
    monkeypatch.setenv("LORAPOOL_TENANT_TIERS", json.dumps({"globex": "limited"}))
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for name in ("one", "two"):
            home = tmp_path / name
            home.mkdir()
            port = free_port()
            config = write_config(
                home,
                model_dir,
                port,
                {"sk-acme": "acme", "sk-globex": "globex"},
                f'disk_dir = "{home / "disk"}"',
                sources=(str(adapters["r8-attn"].parent),),
            )
            procs.append(start_example(config, home / "server.log"))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc, name in zip(urls, procs, ("one", "two"), strict=True):
            await _ready(url, proc, tmp_path / name / "server.log")

        auth = {"Authorization": "Bearer sk-acme"}
        body = {"lora_name": "pirate", "lora_path": str(adapters["r8-attn"])}
        async with httpx.AsyncClient(base_url=urls[0]) as http:
            loaded = await http.post("/v1/load_lora_adapter", json=body, headers=auth)
        assert loaded.status_code == 200, loaded.text

        clients = [
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-acme", max_retries=0)
            for url in urls
        ]
        prompts = ["Tell me about the sea", "The best food is", "One, two, three,"]
        answers: dict[str, list[str]] = {p: [] for p in prompts}
        for i in range(2 * len(prompts)):  # alternating servers, each prompt on both
            prompt = prompts[i % len(prompts)]
            client = clients[(i + i // len(prompts)) % 2]
            done = await client.completions.create(
                model="pirate", prompt=prompt, max_tokens=12, temperature=0
            )
            answers[prompt].append(done.choices[0].text)
        for prompt, texts in answers.items():
            assert len(texts) == 2 and texts[0] == texts[1], (prompt, texts)

        # unloaded through the second: refused by both (the first learns it by NOTIFY)
        async with httpx.AsyncClient(base_url=urls[1]) as http:
            gone = await http.post(
                "/v1/unload_lora_adapter", json={"lora_name": "pirate"}, headers=auth
            )
        assert gone.status_code == 200, gone.text
        for client in clients:
            deadline = time.monotonic() + 5  # a hang guard: NOTIFY takes milliseconds
            while True:
                try:
                    await client.completions.create(
                        model="pirate", prompt=prompts[0], max_tokens=1, temperature=0
                    )
                except openai.NotFoundError:
                    break
                assert time.monotonic() < deadline, "the unload did not reach the other server"
        async with httpx.AsyncClient() as http:
            base_model = (await http.get(f"{urls[0]}/ready")).json()["model"]
        limited_clients = [
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-globex", max_retries=0)
            for url in urls
        ]
        served, refused = 0, 0
        for i in range(8):  # alternating: 4 requests to each server
            try:
                await limited_clients[i % 2].completions.create(
                    model=base_model, prompt="Hi", max_tokens=1, temperature=0
                )
                served += 1
            except openai.RateLimitError:
                refused += 1
        assert (served, refused) == (3, 5)  # per replica it would be 6 served
        for client in clients + limited_clients:
            await client.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    store = PostgresRegistryStore(postgres.dsn, schema=schema, listen=False)
    try:
        registry = Registry(store)
        assert registry.audit.verify() >= 2
        actions = [(e.action, e.adapter) for e in registry.audit.entries(tenant="acme")]
        assert ("register", "acme/pirate") in actions and ("unregister", "acme/pirate") in actions
        assert "acme/pirate" not in registry
    finally:
        store.close()
