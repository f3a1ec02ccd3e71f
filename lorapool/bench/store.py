"""Store load paths: disk→host load rate and host→device switch time on TorchBackend.

Disk→host is what the store does when an adapter is on local disk but not in
RAM: read both files and check their sha256 (page cache warm: the files were
read once before timing, as a disk tier in use would be), then let the backend
prepare its host form (TorchBackend: parse with safetensors and lay the
tensors out compactly). The steps are shown separately, in the same rounds.
Host→device is a request's wait when its adapter is in RAM but not in a slot:
``backend.load`` (copy the prepared tensors into the slot on the engine
thread), timed through the store's ``acquire``. Medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``store`` scenario."""
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--cache-dir", default=None, help="model and adapter cache")
    parser.add_argument("--json", default=None, help="write the results as JSON here")


def _adapter(cache: Path, model_dir: Path, rank: int, targets: str) -> Path:
    from lorapool.testing import make_random_adapter
    from lorapool.testing.adapters import ALL_LINEAR, ATTENTION

    modules = ALL_LINEAR if targets == "all-linear" else ATTENTION
    path = cache / "bench-adapters" / f"r{rank}-{targets}" / "a0"
    if not (path / "adapter_model.safetensors").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        make_random_adapter(path, base, rank=rank, target_modules=modules, seed=0)
    return path


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _disk_to_host(path: Path, rounds: int) -> dict[str, list[float]]:
    from safetensors.torch import load

    from lorapool.formats import ADAPTER_FILES, WEIGHTS_FILE, sha256_of_files

    def read() -> None:
        for name in ADAPTER_FILES:
            (path / name).read_bytes()

    def read_verify() -> None:  # what the store does: read, then the registered-sha256 check
        data = {name: (path / name).read_bytes() for name in ADAPTER_FILES}
        digest = hashlib.sha256()
        for name, raw in data.items():
            digest.update(name.encode() + b"\0")
            digest.update(raw)
        digest.hexdigest()

    def read_verify_parse() -> None:
        read_verify()
        load((path / WEIGHTS_FILE).read_bytes())

    sha256_of_files(path)  # warm the page cache
    out: dict[str, list[float]] = {"read": [], "read+sha256": [], "read+sha256+parse": []}
    for _ in range(rounds):
        out["read"].append(_timed(read))
        out["read+sha256"].append(_timed(read_verify))
        out["read+sha256+parse"].append(_timed(read_verify_parse))
    return out


async def _store_rounds(model_dir: Path, adapters: dict[str, Path], rounds: int) -> dict[str, Any]:
    from lorapool import AdapterPool, TieredStore
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=4, max_rank=16, max_batch=4, max_seq_len=128)
    store = TieredStore(host_bytes="1GiB")
    host: dict[str, list[float]] = {name: [] for name in adapters}
    device: dict[str, list[float]] = {name: [] for name in adapters}
    async with AdapterPool(backend, store=store) as pool:
        infos = {
            name: await pool.register(f"bench/{name.replace(' ', '-')}", str(path), tenant="bench")
            for name, path in adapters.items()
        }
        for _ in range(rounds):  # disk -> host through the store: read, verify, prepare
            for name, info in infos.items():
                await store.unload(info.adapter_id, tiers=("device", "host"))
                started = time.perf_counter()
                await store.warm(info, "host", limited=False)
                host[name].append(time.perf_counter() - started)
        for _ in range(rounds):  # host -> device: every adapter stays in RAM
            for name, info in infos.items():
                await store.unload(info.adapter_id, tiers=("device",))
                started = time.perf_counter()
                await store.acquire(info)
                device[name].append(time.perf_counter() - started)
                store.release(info.adapter_id)
    return {"host": host, "device": device}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON if asked."""
    from lorapool.backends.torch import default_cache_dir, ensure_demo_model

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model_dir = ensure_demo_model(cache)
    adapters = {
        "r16 all-linear": _adapter(cache, model_dir, 16, "all-linear"),
        "r8 attention": _adapter(cache, model_dir, 8, "attention"),
    }
    sizes = {
        name: sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        for name, path in adapters.items()
    }
    print(f"store benchmark: {args.rounds} interleaved rounds, medians", file=sys.stderr)
    results: dict[str, Any] = {"sizes": sizes}

    big = "r16 all-linear"
    raw = _disk_to_host(adapters[big], args.rounds)
    stored = asyncio.run(_store_rounds(model_dir, adapters, args.rounds))
    results["disk_to_host"] = raw
    results["store"] = stored

    mb = sizes[big] / 1e6
    print(f"\ndisk -> host, {big} adapter ({mb:.1f} MB), page cache warm")
    print(f"{'path':<34}{'ms':>8}{'GB/s':>8}")
    rows = dict(raw)
    rows["store: read+sha256+prepare"] = stored["host"][big]
    for label, times in rows.items():
        t = statistics.median(times)
        print(f"{label:<34}{t * 1e3:>8.2f}{sizes[big] / t / 1e9:>8.2f}")
    print("\nhost -> device switch on TorchBackend (store.acquire of an adapter in RAM)")
    print(f"{'adapter':<18}{'MB':>8}{'median ms':>11}{'p90 ms':>9}")
    for name, times in stored["device"].items():
        ordered = sorted(times)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        median = statistics.median(times) * 1e3
        print(f"{name:<18}{sizes[name] / 1e6:>8.1f}{median:>11.2f}{p90 * 1e3:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
