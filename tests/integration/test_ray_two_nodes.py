"""Ray Serve on two nodes (issue 31, item 4): a Ray head node and a second node started
on this machine with Ray's cluster utilities (``ray.cluster_utils.Cluster``), each with
one ``lorapool_replica`` resource, so the two PoolReplica replicas land one per node;
the registry is PostgreSQL (a real server started by the test), shared by both nodes;
adapters come from one S3 bucket (moto on loopback).

Proves: adapter-affine routing across the nodes (both nodes' replicas load adapters;
once the four adapters fit the 2 x 2 slots, repeated requests load nothing); the
second node removed mid-run: the requests in flight on it fail or complete (none
hangs, none answers wrongly), the head node keeps serving every adapter; a replacement
node joins, Ray starts a replacement replica there, and it serves every adapter after
fetching it from the bucket (it registered nothing and held no copy).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from lorapool import AdapterPool, SamplingParams  # noqa: E402
from lorapool.integrations.ray_serve import RegistrySpec, build_app  # noqa: E402
from lorapool.registry import Registry  # noqa: E402
from lorapool.registry.postgres import PostgresRegistryStore  # noqa: E402
from lorapool.server import ApiKeys, Caller, Registration  # noqa: E402

from .postgres_server import PostgresServer, fresh_schema, postgres  # noqa: E402
from .servers import CREDENTIALS, CountingMotoServer, upload  # noqa: E402

__all__ = ["postgres"]

APP = "lorapool-two-nodes"
SLOTS = 2
NAMES = ["r8-attn", "r16-all", "r32-attn", "r16-qv-rslora"]
PROMPT = "The three primary colours are"
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
KEYS = ApiKeys({"key-acme": "acme", "key-admin": Caller("platform", admin=True)})
NODE = {"num_cpus": 3, "resources": {"lorapool_replica": 1}, "object_store_memory": 80 << 20}


def pg_pool(model_dir: str, s3: str, dsn: str, schema: str, given: Registry) -> AdapterPool:
    """A replica's pool: TorchBackend, adapters from the bucket, the PostgreSQL registry
    (the registry RegistrySpec opened, a throwaway local file, is closed unused)."""
    import torch

    from lorapool import TieredStore
    from lorapool.backends.torch import TorchBackend
    from lorapool.sources import S3Source

    given.close()
    torch.set_num_threads(1)
    backend = TorchBackend(model_dir, max_slots=SLOTS, max_rank=32, max_batch=4, max_seq_len=320)
    store = TieredStore(
        host_bytes="256MiB", sources={"s3": S3Source(endpoint_url=s3, **CREDENTIALS)}
    )
    return AdapterPool(
        backend, store=store, registry=Registry(PostgresRegistryStore(dsn, schema=schema))
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bucket(adapters: dict[str, Path]) -> Iterator[CountingMotoServer]:
    server = CountingMotoServer()
    server.start()
    try:
        for name in NAMES:
            asyncio.run(upload(server, "adapters", name, adapters[name]))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def two_nodes(
    model_dir: Path,
    bucket: CountingMotoServer,
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas can't import tests
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        second = cluster.add_node(**NODE)
        ray.init(
            address=cluster.address,
            namespace="lorapool-two-nodes",
            log_to_driver=False,
            runtime_env={
                "env_vars": {
                    "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                    "OMP_WAIT_POLICY": "PASSIVE",
                }
            },
        )
        port = _free_port()
        # one HTTP proxy, on the head: two nodes on one machine cannot both take the port
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        schema = fresh_schema()
        make_pool = functools.partial(
            pg_pool, str(model_dir), bucket.endpoint, postgres.dsn, schema
        )
        unused = tmp_path_factory.mktemp("ray") / "unused.sqlite"
        app = build_app(
            make_pool,
            auth=KEYS,
            replicas=2,
            registry=RegistrySpec(kind="sqlite", path=str(unused)),
            replica_options={
                "ray_actor_options": {"num_cpus": 1, "resources": {"lorapool_replica": 1}},
                "health_check_period_s": 1,
                "health_check_timeout_s": 10,
            },
            ingress_options={
                "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.01}}
            },
            registration=Registration(admin_sources=("s3://adapters/",)),
        )
        serve.run(app, name=APP, route_prefix="/")
        yield {
            "cluster": cluster,
            "second": second,
            "url": f"http://127.0.0.1:{port}",
            "pools": serve.get_deployment_handle("LoraPool", app_name=APP),
            "bucket": bucket,
        }
    finally:
        with_timeout = threading.Thread(target=lambda: (serve.shutdown(), ray.shutdown()))
        with_timeout.start()
        with_timeout.join(120)
        cluster.shutdown()


def _node_of(actor_name: str) -> str:
    """The id of the node an alive actor runs on (Ray's GCS actor table)."""
    from ray._private import state

    for info in state.actors().values():
        if info.get("Name") == actor_name and info.get("State") == "ALIVE":
            return str(info["Address"]["NodeID"])
    raise AssertionError(f"no alive actor {actor_name}")


def _replicas(pools: Any, want: int = 2, tries: int = 60) -> dict[str, dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        info = pools.info.remote().result(timeout_s=60)
        seen[info["replica"]] = info
        if len(seen) >= want:
            break
    assert len(seen) >= want, f"only reached replicas {sorted(seen)}"
    return seen


def _client(url: str, key: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _complete(client: Any, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0.0)
    return str(out.choices[0].text)


def test_two_nodes_affine_routing_and_a_node_lost_and_replaced(
    two_nodes: dict[str, Any],
) -> None:
    url, pools, bucket = two_nodes["url"], two_nodes["pools"], two_nodes["bucket"]
    cluster = two_nodes["cluster"]
    admin, acme = _client(url, "key-admin"), _client(url, "key-acme")
    for name in NAMES:
        admin.post(
            "/load_lora_adapter",
            body={"lora_name": name, "lora_path": f"s3://adapters/{name}", "shared": True},
            cast_to=str,
        )
    infos = _replicas(pools)
    nodes = {r: _node_of(i["actor"]) for r, i in infos.items()}
    assert len(set(nodes.values())) == 2, f"replicas not on two nodes: {nodes}"
    base = next(iter(infos.values()))["base_model"]

    # The answers through the endpoint (a replica on either node): distinct per adapter.
    expected = {name: _complete(acme, name) for name in NAMES}
    expected[base] = _complete(acme, base)
    assert len(set(expected.values())) == len(expected), expected

    # Affine routing across the nodes: the 4 adapters settle in the 2 x 2 slots.
    for name in NAMES * 2:
        assert _complete(acme, name) == expected[name]
    loads = {r: i["device_loads"] for r, i in _replicas(pools).items()}
    assert all(n > 0 for n in loads.values()), f"one node served no adapter: {loads}"
    for name in NAMES * 3:
        assert _complete(acme, name) == expected[name]
    again = {r: i["device_loads"] for r, i in _replicas(pools).items()}
    extra = sum(again.values()) - sum(loads.values())
    print(f"\ntwo nodes: device loads {loads}; 12 more affine requests loaded {extra}")
    assert extra <= 1, f"affine requests kept loading adapters: {loads} -> {again}"

    # Remove the second node with requests in flight.
    outcomes: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        client = _client(url, "key-acme")
        i = 0
        while not stop.is_set():
            name = NAMES[i % len(NAMES)]
            i += 1
            try:
                text = _complete(client, name)
                outcomes.append("ok" if text == expected[name] else f"WRONG {name}: {text!r}")
            except openai.APIError as exc:
                outcomes.append(f"failed: {type(exc).__name__}")

    senders = [threading.Thread(target=traffic) for _ in range(2)]
    for t in senders:
        t.start()
    time.sleep(2)
    survivor_node = next(n for n in nodes.values() if n != two_nodes["second"].node_id)
    cluster.remove_node(two_nodes["second"], allow_graceful=False)
    time.sleep(8)
    stop.set()
    for t in senders:
        t.join(180)
        assert not t.is_alive(), "a request hung after the node was removed"
    assert not [o for o in outcomes if o.startswith("WRONG")], outcomes
    print(f"requests while the node went away: {len(outcomes)}, outcomes {sorted(set(outcomes))}")

    # The head node keeps serving every adapter.
    deadline = time.monotonic() + 120
    for name in [*NAMES, base]:
        while True:
            try:
                assert _complete(acme, name) == expected[name]
                break
            except openai.APIError:
                assert time.monotonic() < deadline, "the head node stopped serving"
                time.sleep(1)
    fetched = {name: bucket.gets(f"/adapters/{name}/") for name in NAMES}

    # A replacement node joins; Ray starts the missing replica there.
    cluster.add_node(**NODE)
    deadline = time.monotonic() + 240
    while True:
        try:
            now = _replicas(pools, tries=20)
        except Exception:  # a replica being replaced
            now = {}
        fresh = [r for r in now if r not in infos]
        if len(now) == 2 and fresh:
            break
        assert time.monotonic() < deadline, "Ray did not start a replacement replica"
        time.sleep(2)
    fresh_id = fresh[0]
    fresh_node = _node_of(now[fresh_id]["actor"])
    assert fresh_node not in {survivor_node, two_nodes["second"].node_id}
    assert now[fresh_id]["registered"] == 0 and now[fresh_id]["device_loads"] == 0
    # Every adapter through the replacement: requests without the model id are spread
    # over both replicas; keep sending each until the fresh one holds it.
    for name in NAMES:
        for _ in range(40):
            done = pools.complete.remote(PROMPT, adapter=name, tenant="acme", params=GREEDY)
            assert done.result(timeout_s=120).text == expected[name]
            held = _replicas(pools)[fresh_id]["resident"]
            if f"platform/{name}" in held:
                break
        else:
            raise AssertionError(f"the replacement replica never served {name}")
    refetched = {name: bucket.gets(f"/adapters/{name}/") - n for name, n in fetched.items()}
    assert all(n > 0 for n in refetched.values()), f"not fetched from the bucket: {refetched}"
