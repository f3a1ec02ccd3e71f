"""The proof a platform team needs: the wheel, a fresh venv, ``lorapool serve``, a drain.

Builds lorapool's wheel, installs it (not editable) with ``[torch,server]`` and ``openai``
into a new ``python -m venv`` (no system site-packages, so nothing of the dev venv
leaks in), and runs ``lorapool serve cfg.toml`` as a process with two real PEFT adapters
in ``[[adapters]]``. Then: ``/ready``; a stream from each adapter with the official
``openai`` client, run by the fresh venv's Python; SIGTERM while a long stream is in
flight: a new request gets 503 with ``Retry-After`` and the stream in flight ends
normally (a ``finish_reason``, then ``data: [DONE]``).

Timeouts are hang guards only, sized for a CI machine several times slower than this one.
The pip cache is shared with the dev venv's installs, and the converted demo model and
the test adapters come from the test suite's cache dir (``lorapool_cache``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from .serving import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]

# torch is pinned to the CPU build this machine's pip finds in its find-links (/opt/wheels):
# unpinned, lorapool[torch]'s "torch>=2.5" resolves to the newest torch on the index,
# whose Linux wheels pull in gigabytes of CUDA libraries.
TORCH = "torch==2.13.0"

CLIENT = r"""
import json, sys
from openai import OpenAI

base, key, adapter = sys.argv[1:4]
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
text, finish = "", None
for chunk in client.chat.completions.create(
    model=adapter,
    messages=[{"role": "user", "content": "Say hello to the new customer."}],
    max_tokens=12,
    stream=True,
):
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
print(json.dumps({"model": chunk.model, "text": text, "finish": finish}))
"""


def _run(cmd: list[str], timeout: float, **kw: Any) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, f"{cmd[:4]}... failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with only the built wheel's ``[torch,server]`` and ``openai`` installed."""
    work = tmp_path_factory.mktemp("clean-install")
    dist = work / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        timeout=900,
    )
    (wheel,) = dist.glob("lorapool-*.whl")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=600)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            TORCH,
            f"{wheel}[torch,server]",
            "openai",
        ],
        timeout=1800,
        env=env,
        cwd=work,
    )
    return venv


def _write_config(tmp: Path, port: int, adapters: dict[str, Path]) -> Path:
    globex_key = tmp / "globex.key"
    globex_key.write_text("sk-globex-clean\n")  # a mounted secret, trailing newline and all
    config = tmp / "cfg.toml"
    config.write_text(
        f"""
[backend]
kind = "torch"            # model: the demo SmolLM2, from the cache dir
max_slots = 3
max_rank = 16
max_batch = 4
options = {{ max_seq_len = 1024 }}

[store]
host_bytes = "256MiB"
disk_dir = "{tmp / "disk"}"

[keys]
"sk-acme-clean" = {{ tenant = "acme" }}
globex = {{ key_file = "{globex_key}", tenant = "globex" }}

[server]
host = "127.0.0.1"
port = {port}
shutdown_timeout = 300

[[adapters]]
name = "support"
source = "{adapters["r8-attn"]}"
tenant = "acme"
preload = true

[[adapters]]
name = "helper"
source = "{adapters["r16-all"]}"
tenant = "globex"
"""
    )
    return config


def _pump(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _wait_ready(base: str, proc: subprocess.Popen[str], log: list[str]) -> None:
    deadline = time.monotonic() + 900  # model load and two registrations, on a slow machine
    while time.monotonic() < deadline:
        assert proc.poll() is None, "lorapool serve exited:\n" + "".join(log[-40:])
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("not ready in 900 s:\n" + "".join(log[-40:]))


def _events(log: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in log:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_wheel_in_a_fresh_venv_serves_two_adapters_and_drains(
    fresh_venv: Path, tmp_path: Path, adapters: dict[str, Path], lorapool_cache: Path
) -> None:
    python, lorapool = fresh_venv / "bin" / "python", fresh_venv / "bin" / "lorapool"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["LORAPOOL_CACHE_DIR"] = str(lorapool_cache)  # the converted demo model is reused

    # installed, not editable: the package lives in the venv, and so does what it ships
    # (run from tmp_path: "python -c" puts the working directory, here the checkout, first)
    code = "import lorapool; print(lorapool.__file__)"
    where = _run([str(python), "-c", code], 300, env=env, cwd=tmp_path)
    assert where.strip().startswith(str(fresh_venv)), where
    example = _run([str(lorapool), "serve", "--print-example-config"], 300, env=env, cwd=tmp_path)
    assert example == (ROOT / "examples" / "server.toml").read_text()
    licenses = list(fresh_venv.glob("lib/python*/site-packages/lorapool-*.dist-info/**/LICENSE"))
    assert licenses and "Apache License" in licenses[0].read_text()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = _write_config(tmp_path, port, adapters)
    proc = subprocess.Popen(
        [str(lorapool), "serve", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    pump = threading.Thread(target=_pump, args=(proc.stderr, log), daemon=True)
    pump.start()
    try:
        _wait_ready(base, proc, log)
        # one JSON log line per [[adapters]] entry, before /ready
        progress = [e for e in _events(log) if "progress" in e]
        assert [(e["progress"], e["adapter"]) for e in progress] == [
            ("1/2", "acme/support"),
            ("2/2", "globex/helper"),
        ], progress

        # the official client, in the fresh venv, streams from each adapter
        for key, model in (("sk-acme-clean", "acme/support"), ("sk-globex-clean", "globex/helper")):
            cmd = [str(python), "-c", CLIENT, f"{base}/v1", key, model]
            out = _run(cmd, 600, env=env, cwd=tmp_path)
            answer = json.loads(out.strip().splitlines()[-1])
            assert answer["model"] == model and answer["text"] and answer["finish"], answer

        # SIGTERM while a long stream is in flight
        body = {
            "model": "acme/support",
            "prompt": "1, 2, 3, 4, 5,",
            "max_tokens": 300,
            "ignore_eos": True,  # long for certain: the drain must find it in flight
            "stream": True,
        }
        headers = {"authorization": "Bearer sk-acme-clean"}
        with (
            httpx.Client(base_url=base, timeout=600) as http,
            http.stream("POST", "/v1/completions", json=body, headers=headers) as stream,
        ):
            assert stream.status_code == 200
            data = []
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    data.append(line[6:])
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the runner begins the drain at the signal
            refused = httpx.post(
                f"{base}/v1/completions",
                json={"model": "acme/support", "prompt": "hi", "max_tokens": 2},
                headers=headers,
                timeout=60,
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers.get("retry-after"), refused.headers
            assert httpx.get(f"{base}/ready", timeout=60).status_code == 503  # out of the balancer
            for line in lines:
                if line.startswith("data: "):
                    data.append(line[6:])
                elif line.startswith("event: error"):
                    raise AssertionError(f"the stream in flight was cut: {line}")
        assert data[-1] == "[DONE]", data[-3:]
        chunks = [json.loads(d) for d in data[:-1]]
        assert "error" not in chunks[-1], chunks[-1]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "length" and not any(finishes[:-1]), finishes[-3:]
        assert proc.wait(timeout=600) == 0, "".join(log[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
