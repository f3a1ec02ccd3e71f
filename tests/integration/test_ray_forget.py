"""Forget on Ray Serve (issue 29): 2 PoolReplica replicas (TorchBackend, the real model, CPU)
over one shared registry, adapters from a real S3 bucket (moto on loopback).

Proves: a forget through one replica has every replica purge the adapter before it returns
(each replica's report; neither holds it in a tier or in its disk tier, both answer
``AdapterNotFound``), and another tenant's adapter with the same bytes keeps serving on both.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("starlette")

from lorapool import SamplingParams  # noqa: E402
from lorapool.errors import AdapterNotFound  # noqa: E402
from lorapool.integrations.ray_serve import RegistrySpec, build_app  # noqa: E402
from lorapool.server import ApiKeys  # noqa: E402

from . import test_ray_serve  # noqa: E402
from .servers import CountingMotoServer, upload  # noqa: E402

APP = "lorapool-forget-test"
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def cluster(model_dir: Path, adapters: dict[str, Path]) -> Iterator[dict[str, Any]]:
    import asyncio

    from ray import cloudpickle

    bucket = CountingMotoServer()
    bucket.start()
    # acme's two adapters; globex's twin holds the same bytes as acme's "a".
    for prefix, name in (("acme-a", "r8-attn"), ("acme-b", "r16-all"), ("globex", "r8-attn")):
        asyncio.run(upload(bucket, "adapters", prefix, adapters[name]))
    for module in (__name__, test_ray_serve.__name__):  # replicas can't import tests
        cloudpickle.register_pickle_by_value(sys.modules[module])
    port = test_ray_serve._free_port()
    ray.init(
        address="local",
        num_cpus=6,
        include_dashboard=False,
        namespace="lorapool-tests",
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            functools.partial(test_ray_serve.torch_pool, str(model_dir), bucket.endpoint),
            auth=ApiKeys({}),
            replicas=2,
            registry=RegistrySpec(name=f"lorapool-registry-forget-{port}"),
            replica_options={"ray_actor_options": {"num_cpus": 1}},
            ingress_options={"ray_actor_options": {"num_cpus": 0.5}},
        )
        serve.run(app, name=APP, route_prefix="/")
        yield {
            "pools": serve.get_deployment_handle("LoraPool", app_name=APP),
            "registry": f"lorapool-registry-forget-{port}",
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        bucket.stop()


def _on_every_replica(pools: Any, method: str, *args: Any, **kwargs: Any) -> list[Any]:
    """``method`` run on each replica (Ray Serve's broadcast): results or exceptions."""
    response = pools.broadcast(method, *args, **kwargs)
    results: list[Any] = response.results(timeout_s=600, return_exceptions=True)
    return results


def _cause(result: Any) -> Any:
    """The lorapool error a replica raised (Ray wraps it), else the result itself."""
    return getattr(result, "cause", result)


def test_forget_reaches_every_replica(cluster: dict[str, Any]) -> None:
    pools = cluster["pools"]
    a = pools.register.remote("a", "s3://adapters/acme-a", tenant="acme").result()
    b = pools.register.remote("b", "s3://adapters/acme-b", tenant="acme").result()
    twin = pools.register.remote("twin", "s3://adapters/globex", tenant="globex").result()
    assert twin.sha256 == a.sha256 != b.sha256
    # Every replica serves each adapter once: each holds them on device and disk.
    served = {}
    for name, tenant in (("a", "acme"), ("twin", "globex"), ("b", "acme")):  # b last: on device
        done = _on_every_replica(
            pools, "complete", PROMPT, adapter=name, tenant=tenant, params=GREEDY
        )
        assert len(done) == 2 and len({d.text for d in done}) == 1, done
        served[name] = done[0].text
    infos = _on_every_replica(pools, "info")
    assert len({i["replica"] for i in infos}) == 2
    for holds in _on_every_replica(pools, "holds", b.adapter_id):
        assert "device" in holds
    for info in infos:
        assert list(Path(info["disk_dir"]).glob(f"*{b.sha256}*"))

    report = pools.forget.remote(tenant="acme").result()  # through one replica

    assert set(report.registry) == {"acme/a", "acme/b"}
    assert sorted(p.replica for p in report.purges) == sorted(i["replica"] for i in infos)
    for purge in report.purges:
        assert "device" in purge.tiers[b.adapter_id]
        assert purge.disk_kept == (a.sha256,)  # globex's twin has those bytes
    # Right after the call: no replica holds acme's adapters, none has b's bytes on disk.
    for adapter in (a, b):
        for holds in _on_every_replica(pools, "holds", adapter.adapter_id):
            assert holds == []
    for info in infos:
        assert not list(Path(info["disk_dir"]).glob(f"*{b.sha256}*"))
        assert list(Path(info["disk_dir"]).glob(f"*{a.sha256}*"))  # twin's copy
    # Every replica answers AdapterNotFound; globex's twin still serves on each.
    for name in ("a", "b"):
        refused = _on_every_replica(
            pools, "complete", PROMPT, adapter=name, tenant="acme", params=GREEDY
        )
        assert len(refused) == 2
        assert all(isinstance(_cause(r), AdapterNotFound) for r in refused), refused
    done = _on_every_replica(
        pools, "complete", PROMPT, adapter="twin", tenant="globex", params=GREEDY
    )
    assert [d.text for d in done] == [served["twin"]] * 2
    # One audit log for the cluster, in the registry actor: every replica's entries, chained.
    from lorapool.integrations.ray_serve import RayRegistryStore
    from lorapool.registry.audit import AuditLog

    log = AuditLog(RayRegistryStore(name=cluster["registry"]))
    assert log.persistent
    actions = [(e.action, e.adapter) for e in log.entries()]
    assert actions == [
        ("register", "acme/a"),
        ("register", "acme/b"),
        ("register", "globex/twin"),
        ("forget", None),
    ]
    assert log.verify() == 4
