"""examples/openai_server.py as a real process: config file, JSON logs, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from lorapool.server.config import load_config  # noqa: E402

from .serving import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_builds_what_it_says() -> None:
    config = load_config(ROOT / "examples" / "server.toml")
    scheduler = config.build_scheduler()
    assert scheduler.tier_of("acme") == "gold" and scheduler.tier_of("globex") == "free"
    assert scheduler.tiers["gold"].cold_start == "wait"  # fallback is an opt-in
    assert scheduler.tiers["free"].requests_per_s == 2
    auth = config.build_auth()
    assert {c.tenant for c in auth._keys.values()} == {"acme", "globex", "platform"}  # type: ignore[attr-defined]


def write_config(
    tmp: Path,
    model_dir: Path,
    port: int,
    keys: dict[str, str],
    store: str,
    max_batch: int = 4,
    server: str = "",
    sources: tuple[str, ...] = (),
) -> Path:
    """A server.toml for the example: TorchBackend, 2 slots, ``keys`` -> tenants.

    Tenants may register adapters from ``sources`` (``[registration] tenant_sources``).
    """
    lines = "\n".join(f'"{k}" = {{ tenant = "{t}" }}' for k, t in keys.items())
    config = tmp / "server.toml"
    config.write_text(
        f"""
[backend]
kind = "torch"
model = "{model_dir}"
max_slots = 2
max_rank = 32
max_batch = {max_batch}
options = {{ max_seq_len = 512 }}

[store]
{store}

[keys]
{lines}

[server]
port = {port}
shutdown_timeout = 600
{server}

[registration]
tenant_sources = {json.dumps(list(sources))}
"""
    )
    return config


def start_example(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python examples/openai_server.py CONFIG`` in its own process group."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "openai_server.py"), str(config)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # Two malloc arenas, as docs/operations.md recommends for the server: glibc's
            # default (8 per core) lets RSS creep as worker threads come and go.
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_ARENA_MAX": "2"},
        )  # fmt: skip


async def test_served_from_a_config_file_logs_json_and_drains_on_sigterm(
    tmp_path: Path, model_dir: Path, adapters: dict[str, Path]
) -> None:
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:
        metrics_port = free_port()
    config = write_config(
        tmp_path,
        model_dir,
        port,
        {"sk-acme": "acme"},
        f'disk_dir = "{tmp_path / "disk"}"',
        server=f"metrics_port = {metrics_port}",
        sources=(str(adapters["r8-attn"].parent),),
    )
    log = tmp_path / "server.log"
    proc = start_example(config, log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.5)
            auth = {"Authorization": "Bearer sk-acme"}
            body = {"lora_name": "acme/pirate", "lora_path": str(adapters["r8-attn"])}
            assert (
                await http.post("/v1/load_lora_adapter", json=body, headers=auth)
            ).status_code == 200

        async with httpx.AsyncClient() as http:  # the separate metrics port
            scraped = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200 and "lorapool_resident_adapters" in scraped.text
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-acme", max_retries=0)
        secret = "my secret prompt text"
        stream = await client.completions.create(
            model="acme/pirate", prompt=secret, max_tokens=48, temperature=0, stream=True,
            extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
            user="end-user-7",
        )  # fmt: skip
        pieces, usage = [], None
        async for event in stream:
            pieces.extend(c.text for c in event.choices)
            usage = event.usage or usage
            if len(pieces) == 2:
                os.killpg(proc.pid, signal.SIGTERM)  # shut down with this stream in flight
        assert usage is not None and usage.completion_tokens == 48  # the stream finished whole
        await client.close()
        # A drained shutdown is a clean exit (lorapool.server.run.serve does not re-raise
        # the signal as plain uvicorn does).
        assert await asyncio.to_thread(proc.wait, 600) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    assert requests and requests[-1]["tenant"] == "acme"
    assert requests[-1]["adapter"] == "acme/pirate"
    assert requests[-1]["completion_tokens"] == 48 and requests[-1]["outcome"] == "ok"
    assert "ttft_s" in requests[-1] and "served_by" in requests[-1]
    assert requests[-1]["user"] == "end-user-7"  # OpenAI's end-user id, for the operator
    assert secret not in log.read_text()  # no prompt text in the logs by default
