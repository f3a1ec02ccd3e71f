"""lorapool on Ray Serve: N replicas, one OpenAI endpoint, adapter-affine routing.

One machine (starts a local Ray cluster, serves until Ctrl-C)::

    python examples/ray_serve_app.py examples/server.toml --replicas 2

Several machines (``ray start --head`` on one, ``ray start --address=HEAD:6379`` on
the others, the same config file at the same path on each)::

    python examples/ray_serve_app.py examples/server.toml --address auto --replicas 4

``--demo N`` registers N demo adapters through the endpoint, sends mixed
requests with the official ``openai`` client, prints each replica's device
loads and resident adapters, and exits. The same application runs under the
Serve CLI: ``serve run lorapool.integrations.ray_serve:app_builder
config=examples/server.toml replicas=2``. See docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import ray
from ray import serve

from lorapool.integrations.ray_serve import app_builder
from lorapool.server.config import load_config


def demo(url: str, admin_key: str, user_key: str, adapters: int, requests: int) -> None:
    """Register demo adapters through the endpoint and send mixed requests."""
    import openai

    from lorapool.backends.torch import ensure_demo_model
    from lorapool.testing import make_random_adapter

    root = Path("~/.cache/lorapool/ray-demo-adapters").expanduser()
    model = ensure_demo_model()
    base = None
    names = [f"demo-{i}" for i in range(adapters)]
    for seed, name in enumerate(names, start=1):
        path = root / name
        if not (path / "adapter_model.safetensors").is_file():
            if base is None:
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(model)
            make_random_adapter(path, base, rank=8, target_modules=("q_proj", "v_proj"), seed=seed)
    admin = openai.OpenAI(base_url=f"{url}/v1", api_key=admin_key)
    user = openai.OpenAI(base_url=f"{url}/v1", api_key=user_key)
    listed = {m.id for m in admin.models.list().data}
    for name in names:
        if name not in listed:
            body = {"lora_name": name, "lora_path": str(root / name), "shared": True}
            admin.post("/load_lora_adapter", body=body, cast_to=str)
    rng = random.Random(0)
    started = time.perf_counter()
    for i in range(requests):
        name = rng.choice(names)
        out = user.completions.create(model=name, prompt="Hello,", max_tokens=8)
        print(f"{i:3d} {name:8s} -> {out.choices[0].text!r}")
    print(f"{requests} requests in {time.perf_counter() - started:.1f} s")
    pools = serve.get_deployment_handle("LoraPool", app_name="lorapool")
    seen: dict[str, dict[str, object]] = {}
    for _ in range(50):
        info = pools.info.remote().result()
        seen[str(info["replica"])] = info
    for replica, info in sorted(seen.items()):
        print(
            f"replica {replica}: {info['device_loads']} device loads, "
            f"resident {info['resident']} ({info['slots']} slots)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="server TOML file (examples/server.toml)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--address", help="join a running cluster ('auto'); default: start one")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--registry", default="ray", help="'ray' or a SQLite path (one machine)")
    parser.add_argument("--num-gpus", type=float, help="GPUs per replica (VLLMBackend)")
    parser.add_argument("--demo", type=int, metavar="N", help="N demo adapters, then exit")
    parser.add_argument("--requests", type=int, default=24)
    args = parser.parse_args()

    ray.init(address=args.address, namespace="lorapool")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    options = {"config": args.config, "replicas": str(args.replicas), "registry": args.registry}
    if args.num_gpus:
        options["num_gpus"] = str(args.num_gpus)
    serve.run(app_builder(options), name="lorapool", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    print(f"serving on {url}/v1 with {args.replicas} replicas")
    if args.demo:
        keys = load_config(args.config).keys
        admin = next(k for k, v in keys.items() if v.admin)
        user = next(k for k, v in keys.items() if not v.admin)
        try:
            demo(url, admin, user, args.demo, args.requests)
        finally:
            serve.shutdown()
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
