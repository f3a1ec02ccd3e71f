"""The server's log as run by lorapool.server.run.serve, in a real process: every line is
JSON, uvicorn's "Exception in ASGI application" keeps its traceback, no line carries an ANSI
escape, and the request line carries the request id."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from .serving import free_port  # noqa: E402
from .test_server_drain import HANG_GUARD_S, text_of, wait_ready  # noqa: E402

SERVER = textwrap.dedent(
    """
    import sys
    from lorapool.server.config import ServerConfig, load_config
    from lorapool.server.run import serve
    from lorapool.server.served import LocalPool
    from lorapool.testing import MockBackend

    ServerConfig.build_backend = lambda self: MockBackend()
    ready = LocalPool.ready

    async def broken_once_asked(self):
        if sys.argv[2] == "broken":
            raise RuntimeError("health check exploded")
        return await ready(self)

    LocalPool.ready = broken_once_asked
    serve(load_config(sys.argv[1]))
    """
)


def start(script: Path, config: Path, mode: str, log: Path) -> subprocess.Popen[bytes]:
    """The server script in its own process group, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(script), str(config), mode],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


async def test_json_lines_with_tracebacks_and_no_colour(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[keys]\n"key-acme" = {{ tenant = "acme" }}\n[server]\nport = {port}\n')
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    log = tmp_path / "server.log"
    proc = start(script, config, "healthy", log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as http:
            await wait_ready(http, proc, log)
            done = await http.post(
                "/v1/completions",
                json={"model": "mock", "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": "Bearer key-acme", "x-request-id": "trace-me-1"},
            )
            assert done.status_code == 200
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, HANG_GUARD_S) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = text_of(log).splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    request = [r for r in records if r.get("event") == "request"]
    assert request and request[0]["request_id"] == "trace-me-1"
    assert not any("\x1b[" in line or "color_message" in line for line in lines)
    assert any(r["event"].startswith("Started server process") for r in records)


async def test_an_exception_in_the_asgi_app_is_one_json_line_with_its_traceback(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[keys]\n"key-acme" = {{ tenant = "acme" }}\n[server]\nport = {port}\n')
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    log = tmp_path / "server.log"
    proc = start(script, config, "broken", log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as http:
            async with asyncio.timeout(HANG_GUARD_S):
                while True:
                    assert proc.poll() is None, text_of(log)
                    try:
                        response = await http.get("/ready")
                        break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
            assert response.status_code == 500
            assert response.headers["x-request-id"]
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, HANG_GUARD_S) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = text_of(log).splitlines()
    records = [json.loads(line) for line in lines]
    (crash,) = [r for r in records if r["event"].startswith("Exception in ASGI application")]
    assert crash["level"] == "ERROR" and crash["logger"] == "uvicorn.error"
    assert "Traceback" in crash["exc_info"]
    assert "RuntimeError: health check exploded" in crash["exc_info"]
    assert not any("\x1b[" in line for line in lines)
