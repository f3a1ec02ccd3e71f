"""Scale-out on a local Ray cluster: 2 PoolReplica replicas (TorchBackend, the real model, CPU)
behind the OpenAI ingress, driven by the official ``openai`` client and by handles.

Ray starts once for the module. Proves: correct answers per adapter; adapter-affine routing
(device loads per replica with multiplexed routing vs without it, in the same run); an adapter
registered through one replica served by the other; a killed replica restarted by Ray and
serving again.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from lorapool import AdapterPool, SamplingParams  # noqa: E402
from lorapool.integrations.ray_serve import RegistrySpec, build_app  # noqa: E402
from lorapool.registry import Registry  # noqa: E402
from lorapool.server import ApiKeys, Caller, Registration  # noqa: E402

from .servers import CREDENTIALS, CountingMotoServer, upload  # noqa: E402

APP = "lorapool-test"
SLOTS = 2
NAMES = ["r8-attn", "r16-all", "r32-attn", "r16-qv-rslora"]
PROMPT = "The three primary colours are"
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
KEYS = ApiKeys({"key-acme": "acme", "key-admin": Caller("platform", admin=True)})


def torch_pool(model_dir: str, s3_endpoint: str, registry: Registry) -> AdapterPool:
    """Each replica's pool: TorchBackend with SLOTS device slots, adapters from the bucket."""
    import torch

    from lorapool import TieredStore
    from lorapool.backends.torch import TorchBackend
    from lorapool.sources import S3Source

    torch.set_num_threads(1)  # two replicas share two cores
    backend = TorchBackend(model_dir, max_slots=SLOTS, max_rank=32, max_batch=4, max_seq_len=320)
    store = TieredStore(
        host_bytes="256MiB", sources={"s3": S3Source(endpoint_url=s3_endpoint, **CREDENTIALS)}
    )
    return AdapterPool(backend, store=store, registry=registry)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bucket(adapters: dict[str, Path]) -> Iterator[CountingMotoServer]:
    """The adapters in a real S3 bucket (moto on loopback) that every replica reads."""
    import asyncio

    server = CountingMotoServer()
    server.start()
    try:
        for name in NAMES:
            asyncio.run(upload(server, "adapters", name, adapters[name]))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(model_dir: Path, bucket: CountingMotoServer) -> Iterator[dict[str, Any]]:
    import functools

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas can't import tests
    port = _free_port()
    ray.init(
        address="local",  # always a fresh cluster, never one a developer left running
        num_cpus=6,  # logical: lets 2 replicas + ingress + Serve's actors schedule on 2 cores
        include_dashboard=False,
        namespace="lorapool-tests",
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            functools.partial(torch_pool, str(model_dir), bucket.endpoint),
            auth=KEYS,
            replicas=2,
            registry=RegistrySpec(name=f"lorapool-registry-{port}"),
            replica_options={"ray_actor_options": {"num_cpus": 1}},
            ingress_options={"ray_actor_options": {"num_cpus": 0.5}},
            registration=Registration(admin_sources=("s3://adapters/",)),
        )
        handle = serve.run(app, name=APP, route_prefix="/")
        pools = serve.get_deployment_handle("LoraPool", app_name=APP)
        yield {
            "url": f"http://127.0.0.1:{port}",
            "ingress": handle,
            "pools": pools,
            "bucket": bucket,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(cluster: dict[str, Any], key: str) -> Any:
    return openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key=key, max_retries=0, timeout=120)


def _replicas(pools: Any, want: int = 2, tries: int = 60) -> dict[str, dict[str, Any]]:
    """Each replica's info(), by replica id (plain calls are spread over the replicas)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        info = pools.info.remote().result()
        seen[info["replica"]] = info
        if len(seen) >= want:
            break
    assert len(seen) >= want, f"only reached replicas {sorted(seen)}"
    return seen


def _reference(model_dir: Path, adapters: dict[str, Path]) -> dict[str | None, str]:
    """Greedy answers of an in-process pool: what every replica must answer."""
    import asyncio

    from lorapool.backends.torch import TorchBackend

    async def run() -> dict[str | None, str]:
        backend = TorchBackend(model_dir, max_slots=SLOTS, max_rank=32, max_batch=4)
        async with AdapterPool(backend) as pool:
            out: dict[str | None, str] = {}
            for name in NAMES:
                await pool.register(name, str(adapters[name]), tenant="platform", shared=True)
            for name in [None, *NAMES]:
                done = await pool.complete(PROMPT, adapter=name, tenant="acme", params=GREEDY)
                out[name] = done.text
            return out

    return asyncio.run(run())


def _complete(client: Any, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0.0)
    return str(out.choices[0].text)


def test_scale_out_on_ray_serve(
    cluster: dict[str, Any], model_dir: Path, adapters: dict[str, Path]
) -> None:
    expected = _reference(model_dir, adapters)
    assert len(set(expected.values())) == len(expected), "adapters must answer differently"
    admin, acme = _client(cluster, "key-admin"), _client(cluster, "key-acme")
    pools = cluster["pools"]

    # Registered through the ingress from the shared bucket: each lands on one replica.
    for name in NAMES:
        admin.post(
            "/load_lora_adapter",
            body={"lora_name": name, "lora_path": f"s3://adapters/{name}", "shared": True},
            cast_to=str,
        )
    time.sleep(0.3)  # lists catch up within RegistrySpec.refresh (0.2 s); lookups at once
    models = {m.id for m in acme.models.list().data}
    assert {f"platform/{n}" for n in NAMES} <= models  # full ids; tenants use the short names

    # Correct answers for every adapter and the base model, through one endpoint.
    base = _replicas(pools)[next(iter(_replicas(pools)))]["base_model"]
    assert _complete(acme, base) == expected[None]
    for name in NAMES:
        assert _complete(acme, name) == expected[name], name

    # A named tool call through the ingress: the replica's pool constrains the arguments.
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": weather}}
    called = acme.chat.completions.create(
        model=NAMES[0],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0.0,
    )
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), weather)

    # Warm-up, then affine (multiplexed) routing vs plain routing, same replicas, same run.
    rng = random.Random(7)
    sequence = [rng.choice(NAMES) for _ in range(32)]
    for name in NAMES * 2:
        _complete(acme, name)

    def loads() -> int:
        return sum(i["device_loads"] for i in _replicas(pools).values())

    before = loads()
    for name in sequence:  # through the ingress: the adapter is the multiplexed model id
        assert _complete(acme, name) == expected[name]
    affine = loads() - before
    before = loads()
    for name in sequence:  # the same requests without the model id: Ray routes blind
        params = GREEDY
        done = pools.complete.remote(PROMPT, adapter=name, tenant="acme", params=params).result()
        assert done.text == expected[name]
    blind = loads() - before
    print(f"device loads per {len(sequence)} requests: affine {affine}, blind {blind}")
    assert blind >= 8, f"blind routing should thrash 2x{SLOTS} slots over 4 adapters: {blind}"
    assert affine * 4 <= blind, f"affine {affine} vs blind {blind}"

    infos = _replicas(pools)
    assert sum(i["registered"] for i in infos.values()) == len(NAMES)
    for info in infos.values():
        assert info["device_loads"] > 0, info  # both replicas served adapters

    # Kill one replica: Ray starts another; requests succeed after.
    victim = next(iter(infos.values()))
    ray.kill(ray.get_actor(victim["actor"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            now = _replicas(pools, tries=20)
        except (AssertionError, Exception):  # a dead replica is being replaced
            now = {}
        if len(now) == 2 and victim["replica"] not in now:
            break
        assert time.monotonic() < deadline, "Ray did not replace the killed replica"
        time.sleep(2)
    fresh = next(i for r, i in now.items() if r not in infos)
    assert fresh["registered"] == 0 and fresh["device_loads"] == 0
    fetched = cluster["bucket"].gets("/adapters/")
    for name in NAMES * 2:
        assert _complete(acme, name) == expected[name]
    # The new replica registered nothing and had no copy, yet serves adapters registered
    # through the others: it found them in the shared registry and fetched them from the bucket.
    assert _replicas(pools)[fresh["replica"]]["device_loads"] > 0
    assert cluster["bucket"].gets("/adapters/") > fetched
