"""Engine throughput: TorchBackend base-only vs 1/4/16 distinct adapters vs PEFT's mixed batch.

Same model, same prompts, same output length, one process. Configurations
run interleaved for several rounds and each keeps its best round, so slow
phases of a noisy machine hit every configuration alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

PROMPTS = [
    "Summarise this support ticket: my order arrived late and the box was damaged.",
    "Write a short poem about the ocean at night.",
    "Explain what a hash table is to a new programmer.",
    "List three tips for staying focused while working from home.",
    "What are the main causes of inflation?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Give me a recipe idea that uses rice, eggs and spinach.",
    "Why do cats purr?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorapool bench engine``."""
    parser.add_argument("--batch", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    parser.add_argument("--adapters", default="1,4,16", help="distinct adapters per batch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT reference")
    parser.add_argument("--cache-dir", default=None, help="model and adapter cache")
    parser.add_argument("--json", default=None, help="write the results here as JSON")


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def _torch_rounds(
    args: argparse.Namespace, model_dir: Path, adapters: list[Path]
) -> dict[str, float]:
    from lorapool import AdapterPool, SamplingParams
    from lorapool.backends.torch import TorchBackend

    counts = [int(c) for c in args.adapters.split(",") if c]
    backend = TorchBackend(
        model_dir,
        max_slots=max(counts),
        max_rank=args.rank,
        max_batch=args.batch,
        max_seq_len=128 + args.max_tokens,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    best: dict[str, float] = {}
    async with AdapterPool(backend) as pool:
        for i, path in enumerate(adapters):
            await pool.register(f"bench/a{i}", str(path), tenant="bench")

        async def one_round(k: int) -> float:
            names = (
                [None] * args.batch if k == 0 else [f"bench/a{j % k}" for j in range(args.batch)]
            )
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    pool.complete(
                        _chat(PROMPTS[j % len(PROMPTS)]),
                        adapter=names[j],
                        tenant="bench",
                        params=params,
                    )
                    for j in range(args.batch)
                )
            )
            elapsed = time.perf_counter() - start
            return sum(r.usage.completion_tokens for r in results) / elapsed

        await one_round(max(counts))  # warm up: load every adapter into its slot
        configs = [0, *counts]
        for r in range(args.rounds):
            for k in configs:
                label = "base" if k == 0 else f"{k} adapters"
                tps = await one_round(k)
                best[label] = max(best.get(label, 0.0), tps)
                print(f"  round {r + 1}: torch {label:<12} {tps:8.1f} tok/s", file=sys.stderr)
        stats = backend.stats
        best["_max_distinct_per_step"] = float(max(stats.distinct_adapters, default=0))
    return best


def _peft_round(args: argparse.Namespace, model_dir: Path, adapters: list[Path], k: int) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model: Any = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i in range(1, k):
        model.load_adapter(str(adapters[i]), adapter_name=f"a{i}")
    model.eval()
    texts = [
        tok.apply_chat_template(
            _chat(PROMPTS[j % len(PROMPTS)]), add_generation_prompt=True, tokenize=False
        )
        for j in range(args.batch)
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    names = [f"a{j % k}" for j in range(args.batch)]
    best = 0.0
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
        print(f"  round {r + 1}: peft {k} adapters   {tps:8.1f} tok/s", file=sys.stderr)
        best = max(best, tps)
    return best


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


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON if asked."""
    import torch

    from lorapool.backends.torch import default_cache_dir, ensure_demo_model

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    model_dir = ensure_demo_model(cache)
    counts = [int(c) for c in args.adapters.split(",") if c]
    adapters = _make_adapters(cache, model_dir, max(counts), args.rank)
    print(
        f"engine benchmark: batch {args.batch}, {args.max_tokens} tokens each, rank {args.rank} "
        f"all-linear, {args.rounds} rounds (best kept), torch {torch.__version__} "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    results = asyncio.run(_torch_rounds(args, model_dir, adapters))
    if not args.no_peft:
        results[f"peft {max(counts)} adapters"] = _peft_round(
            args, model_dir, adapters, max(counts)
        )
    base = results["base"]
    peft = results.get(f"peft {max(counts)} adapters")
    rows: list[dict[str, Any]] = []
    print(f"\n{'configuration':<22}{'tok/s':>10}{'x base':>10}{'x peft':>10}")
    for label, tps in results.items():
        if label.startswith("_"):
            continue
        vs_peft = tps / peft if peft else float("nan")
        name = label if label.startswith("peft") else f"torch {label}"
        print(f"{name:<22}{tps:>10.1f}{tps / base:>10.2f}{vs_peft:>10.2f}")
        rows.append(
            {"configuration": name, "tok_per_s": tps, "x_base": tps / base, "x_peft": vs_peft}
        )
    print(f"\nmax distinct adapters in one step: {int(results['_max_distinct_per_step'])}")
    if args.json:
        meta = {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "args": vars(args),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0
