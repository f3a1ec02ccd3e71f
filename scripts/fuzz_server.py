"""Fuzz the OpenAI-compatible server against its own OpenAPI document (schemathesis).

    python scripts/fuzz_server.py [--max-examples 50]

A real server on 127.0.0.1 (uvicorn, TorchBackend over the demo model, one real PEFT
adapter registered) gets, for every operation of ``GET /openapi.json``'s document, up to
``--max-examples`` requests that fit the schema and as many that break it (schemathesis'
positive and negative modes; Hypothesis derandomized, so every run sends the same
requests). Most generated bodies name the base model or the adapter, so the engine runs,
not only the validation in front of it; about half get an unpaired surrogate in one of
their strings (JSON's ``"\\ud800"``, which schemathesis never generates). A server error
is a 500, a stream carrying an ``internal_error`` event, or a request the server never
answered; the script prints

    schemathesis: <N> examples, <K> server errors

and exits 1 when K is not 0 (each one is printed, with the server's logged traceback
above it). ``make test`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Err

from lorapool import AdapterPool, TieredStore
from lorapool.backends.torch import TorchBackend, ensure_demo_model
from lorapool.cache import default_cache_dir
from lorapool.server import ApiKeys, create_app
from lorapool.server.openapi import openapi_document

KEY = "key-fuzz"
TENANT = "fuzz"
ADAPTER = "fuzz/a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _adapter(model: Path) -> Path:
    """A real PEFT adapter (peft's save_pretrained, random weights), made once and cached."""
    path = default_cache_dir() / "fuzz-adapter"
    if not (path / "adapter_model.safetensors").is_file():
        from lorapool.testing import make_random_adapter

        make_random_adapter(path, model, rank=8, seed=7)
    return path


@dataclass
class Server:
    """The server under test, on its own thread and event loop."""

    model: Path
    adapter: Path
    root: Path
    port: int = field(default_factory=_free_port)
    base: str = ""
    ready: threading.Event = field(default_factory=threading.Event)
    failed: list[BaseException] = field(default_factory=list)
    _server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        threading.Thread(target=self._run, name="fuzzed-server", daemon=True).start()
        if not self.ready.wait(600) or self.failed:
            raise RuntimeError(f"the server did not start: {self.failed}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start()
            self.failed.append(exc)
            self.ready.set()

    async def _serve(self) -> None:
        backend = TorchBackend(
            self.model, max_slots=2, max_rank=16, max_batch=4, max_seq_len=MAX_SEQ_LEN
        )
        store = TieredStore(disk_dir=self.root / "disk", disk_bytes="100MiB")
        pool = AdapterPool(backend, store=store, registry=self.root / "registry.sqlite")
        app = create_app(pool, auth=ApiKeys({KEY: TENANT}), default_max_tokens=GENERATED)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        serving = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if serving.done():
                await serving  # raises what stopped it
            await asyncio.sleep(0.05)
        await pool.register(ADAPTER.split("/")[1], str(self.adapter), tenant=TENANT)
        self.base = backend.capabilities.base_model
        self.ready.set()
        await serving


@dataclass
class Tally:
    """What the fuzzing saw."""

    examples: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    """Typed 5xx answers (502, 503, ...): not server errors, but worth a look."""
    skipped: list[str] = field(default_factory=list)


MAX_SEQ_LEN = 64
GENERATED = 2
"""The most tokens a request the fuzzing aims at the engine generates: the engine's path is
what is fuzzed (tokenizing, sampling parameters, stop strings, streaming), not its speed."""


def _aim(body: Any, choice: int, server: Server) -> Any:
    """Point a generated body at something real: the base model, the adapter, its files."""
    if not isinstance(body, dict) or choice == 0:
        return body
    if "model" in body:
        body["model"] = server.base if choice == 1 else ADAPTER
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value <= MAX_SEQ_LEN:
            body[name] = min(value, GENERATED)  # longer than the context: left to be refused
    if "lora_path" in body and choice == 1:
        body["lora_path"] = str(server.adapter)
    if "lora_name" in body and choice == 2:
        body["lora_name"] = ADAPTER.split("/")[1]
    return body


def _plant_surrogate(body: Any, spot: int) -> None:
    """Append an unpaired surrogate to one string of ``body`` (the ``spot``-th, cyclically).

    Schemathesis never generates one (it cannot be encoded as UTF-8), but JSON carries it as
    ``"\\ud800"``, and clients send it: every field must refuse it, not fail on it.
    """
    spots: list[tuple[Any, Any]] = []
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            pairs = list(item.items())
        elif isinstance(item, list):
            pairs = list(enumerate(item))
        else:
            continue
        for key, value in pairs:
            if isinstance(value, str):
                spots.append((item, key))
            else:
                stack.append(value)
    if spots:
        container, key = spots[spot % len(spots)]
        container[key] += "\ud800"


def _server_error(response: requests.Response) -> bool:
    if response.status_code == 500:
        return True
    streamed = response.headers.get("content-type", "").startswith("text/event-stream")
    return streamed and '"type":"internal_error"' in response.text


@dataclass
class Fuzzer:
    """Sends generated requests to ``server`` and tallies the answers."""

    server: Server
    max_examples: int
    tally: Tally = field(default_factory=Tally)
    session: requests.Session = field(default_factory=requests.Session)

    def operation(self, operation: Any, mode: GenerationMode) -> None:
        """Up to ``max_examples`` requests for one operation in one mode."""
        label = f"{operation.label} ({mode.value})"
        strategy = st.tuples(
            operation.as_strategy(generation_mode=mode),
            st.integers(0, 3),
            st.one_of(st.none(), st.integers(0, 15)),
        )

        @given(strategy)
        @settings(
            max_examples=self.max_examples,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(drawn: tuple[Any, int, int | None]) -> None:
            case, choice, spot = drawn
            case.body = _aim(case.body, choice, self.server)
            self.send(label, case, spot)

        started, before = time.perf_counter(), self.tally.examples
        try:
            run()
        except Unsatisfiable:  # nothing to generate (negative, for a GET without input)
            self.tally.skipped.append(label)
            return
        seconds = time.perf_counter() - started
        print(f"  {label}: {self.tally.examples - before} examples in {seconds:.1f} s")

    def send(self, label: str, case: Any, spot: int | None) -> None:
        """One request (with a surrogate planted at ``spot``, unless ``None``); a 500 or no
        answer is recorded as a server error."""
        tally = self.tally
        tally.examples += 1
        headers = {"Authorization": f"Bearer {KEY}"}
        # Sent by requests itself, the surrogate planted after schemathesis serialized the
        # case: schemathesis checks bodies as UTF-8 and would refuse it before sending.
        request = case.as_transport_kwargs(base_url=self.server.url, headers=headers)
        if spot is not None and "json" in request:
            request["json"] = copy.deepcopy(request["json"])
            _plant_surrogate(request["json"], spot)
        try:
            response = self.session.request(**request, timeout=300)
        except requests.RequestException as exc:
            tally.errors.append(f"{label}: no answer ({exc}) to {request.get('json')!r:.300}")
            return
        status = response.status_code
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        answer = f"{label}: {status} {response.text[:300]!r} for {request.get('json')!r:.300}"
        if _server_error(response):
            tally.errors.append(answer)
        elif status >= 500:
            tally.unavailable.append(answer)


def fuzz(server: Server, max_examples: int) -> Tally:
    """Every operation of the document, positive then negative, ``max_examples`` each."""
    schema = schemathesis.openapi.from_dict(openapi_document())
    fuzzer = Fuzzer(server, max_examples)
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # the document itself is wrong: that is a failure too
            raise result.err()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzzer.operation(result.ok(), mode)
    return fuzzer.tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=50, help="per operation and mode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)  # a 500's traceback
    model = ensure_demo_model()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorapool-fuzz-") as root:
        server = Server(model, _adapter(model), Path(root))
        server.start()
        try:
            tally = fuzz(server, args.max_examples)
        finally:
            server.stop()
    seconds = time.perf_counter() - started
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items()))
    for answer in tally.unavailable:
        print(f"typed 5xx: {answer}")
    for error in tally.errors:
        print(f"server error: {error}")
    print(f"schemathesis: statuses {{{statuses}}} in {seconds:.0f} s")
    if tally.skipped:
        print(f"schemathesis: nothing to generate for {', '.join(tally.skipped)}")
    print(f"schemathesis: {tally.examples} examples, {len(tally.errors)} server errors")
    return 1 if tally.errors else 0


if __name__ == "__main__":
    sys.exit(main())
