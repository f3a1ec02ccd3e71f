"""A third-party backend and source, declared only through entry points, used by name.

The package is written here as an installed distribution would be (a module and its
``*.dist-info`` with ``entry_points.txt``) into a directory put on ``PYTHONPATH``;
lorapool is not changed. The server runs as a real process from a ``server.toml``
naming the backend and configuring the source, and is called over loopback HTTP; the
benchmark runs as ``python -m lorapool bench serve --target <the backend>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorapool import plugins

from .cli import run_bench
from .test_server_example import free_port, start_example

pytestmark = pytest.mark.slow

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

BACKEND, SCHEME, MODULE = "echo-plugin", "vault", "lorapool_plugin_example"

PLUGIN_MODULE = '''
"""A third party's lorapool plugins: a backend and a source."""

import asyncio
import os
from pathlib import Path

from lorapool.abc import Source
from lorapool.errors import SourceNotFound
from lorapool.testing import MockBackend


class EchoBackend(MockBackend):
    """Answers every request with its adapter's id, one token per word."""


class VaultSource(Source):
    """Adapters in directories under ``root``, named ``vault://<directory>``.

    Every file it copies is logged to ``<root>/fetched.log``.
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root or os.environ.get("VAULT_ROOT", "/nonexistent"))

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        src = self.root / uri.removeprefix("vault://") / name
        if not src.is_file():
            raise SourceNotFound(uri)
        data = await asyncio.to_thread(src.read_bytes)
        await asyncio.to_thread(dest.write_bytes, data)
        with (self.root / "fetched.log").open("a") as log:
            log.write(f"{uri} {name}\\n")
        return len(data)
'''


def write_plugin_package(site: Path) -> Path:
    """The plugin package, laid out as ``pip install`` would leave it in ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{MODULE}.py").write_text(PLUGIN_MODULE)
    dist = site / f"{MODULE}-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lorapool-plugin-example\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        f"[lorapool.backends]\n{BACKEND} = {MODULE}:EchoBackend\n\n"
        f"[lorapool.sources]\n{SCHEME} = {MODULE}:VaultSource\n"
    )
    return site


def write_adapter(directory: Path, alpha: int) -> Path:
    """A PEFT LoRA adapter of rank 4 on one layer's q_proj (zeros; ``alpha`` tells them apart)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    shapes = {f"{prefix}.lora_A.weight": [4, 8], f"{prefix}.lora_B.weight": [8, 4]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * offset
    (directory / "adapter_model.safetensors").write_bytes(data)
    return directory


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin package on ``PYTHONPATH`` (child processes) and ``sys.path`` (this one)."""
    site = write_plugin_package(tmp_path / "site")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.syspath_prepend(str(site))
    yield site


async def became_ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    """Poll ``/ready`` until the server answers 200 (True) or its process exits (False)."""
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(600):  # a hang guard (two minutes), not a timing
            if proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/ready")).status_code == 200:
                    return True
            await asyncio.sleep(0.2)
    return False


def test_the_plugins_are_found_by_name_like_builtin_ones(plugin_site: Path) -> None:
    assert BACKEND in plugins.available(plugins.BACKENDS)
    assert plugins.load_backend(BACKEND).__name__ == "EchoBackend"
    assert plugins.load_source(SCHEME).__name__ == "VaultSource"
    assert "torch" in plugins.available(plugins.BACKENDS)  # the built-in ones are still there


async def test_server_toml_serves_through_a_third_party_backend_and_source(
    plugin_site: Path, tmp_path: Path
) -> None:
    vault = tmp_path / "vault"
    write_adapter(vault / "echo-adapter", alpha=8)
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(
        f"""
[backend]
kind = "{BACKEND}"
max_slots = 2
max_rank = 16
max_batch = 4

[store]
disk_dir = "{tmp_path / "disk"}"

[store.sources.{SCHEME}]
root = "{vault}"

[keys]
"sk-acme" = {{ tenant = "acme" }}

[server]
port = {port}
shutdown_timeout = 10

[registration]
tenant_sources = ["{SCHEME}://"]
"""
    )
    log = tmp_path / "server.log"
    proc = start_example(config, log)
    try:
        url = f"http://127.0.0.1:{port}"
        assert await became_ready(url, proc), log.read_text()
        auth = {"Authorization": "Bearer sk-acme"}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            models = (await http.get("/v1/models", headers=auth)).json()
            assert [m["id"] for m in models["data"]] == ["mock"]  # EchoBackend's base model
            body = {"lora_name": "acme/echo", "lora_path": f"{SCHEME}://echo-adapter"}
            loaded = await http.post("/v1/load_lora_adapter", json=body, headers=auth)
            assert loaded.status_code == 200, loaded.text
            request = {"model": "acme/echo", "prompt": "hi", "max_tokens": 3}
            answer = await http.post("/v1/completions", json=request, headers=auth)
            assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["choices"][0]["text"].split() == ["acme/echo"] * 3
        assert result["usage"]["completion_tokens"] == 3
        fetched = (vault / "fetched.log").read_text().split("\n")
        assert f"{SCHEME}://echo-adapter adapter_model.safetensors" in fetched
        os.killpg(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_bench_serve_targets_a_third_party_backend_and_source(
    plugin_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = tmp_path / "vault"
    for i in range(2):
        write_adapter(vault / f"a{i}", alpha=8 + i)
    monkeypatch.setenv("VAULT_ROOT", str(vault))  # the source's default root, in the child
    out = tmp_path / "serve.json"
    run_bench(
        "serve",
        *("--target", BACKEND, "--model", str(tmp_path), "--adapter-dir", str(vault)),
        *("--adapter-uri", f"{SCHEME}://{{name}}"),
        *("--adapters", "2", "--slots", "2", "--duration", "2", "--rate", "4"),
        *("--cache-dir", str(tmp_path / "cache"), "--json", str(out)),
        cwd=tmp_path,
    )
    [run] = json.loads(out.read_text())["runs"]
    assert (run["target"], run["adapters"]) == (BACKEND, 2)
    assert run["completed"] == run["requests"] > 0 and run["errors"] == {}
    assert run["output_tokens_per_s"] > 0 and run["device_loads"] >= 1
    # Every adapter came through the third-party source, file by file.
    fetched = (vault / "fetched.log").read_text().split("\n")
    for i in range(2):
        assert f"{SCHEME}://a{i} adapter_config.json" in fetched
        assert f"{SCHEME}://a{i} adapter_model.safetensors" in fetched
