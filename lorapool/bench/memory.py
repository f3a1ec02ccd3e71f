"""The embedded engine's memory model, measured (``lorapool bench engine --memory``, issue 30).

Several TorchBackends, started side by side in one process, run one batch each per round,
round after round (interleaved); every ratio is a median of per-round ratios, so a slow
phase of a noisy machine hits both sides alike. All rows use a batch of ``--batch``
(default 64) requests, greedy, ``--max-tokens`` each, fp32, all-linear adapters:

- base-only, 16 and 64 distinct rank-16 adapters in the batch, with the memory-bound
  limit computed on the same run: ``base_bytes / (base_bytes + adapter bytes read per
  step)``, the best a step that reads every weight once can do;
- 64 distinct adapters of mixed ranks (8/16/32/64, sixteen each) laid out at their own ranks
  (``lora_layout="paged"``) vs the same adapters padded to ``max_rank=64`` over every
  module (``"padded"``, the layout before);
- 16 rank-8 adapters in a pool built with ``max_rank=64`` vs one built with
  ``max_rank=8``, and the first pool's LoRA bytes against the adapters' own bytes;
- 16 DoRA adapters vs 16 LoRA adapters of the same rank;
- the LoRA part's achieved bytes/s (adapter bytes per step over the extra time per step
  the 64-adapter batch takes over base-only) against this machine's memory bandwidth,
  measured in the same run (a large fp32 sum on the engine's thread count).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .prompts import PROMPTS, chat

__all__ = ["run"]

MIXED_RANKS = (8, 16, 32, 64)


@dataclass
class _Row:
    label: str
    pool: str
    names: list[str | None]
    tps: list[float] = field(default_factory=list)
    """End-to-end tokens/s of each round (prefills included)."""
    step: list[float] = field(default_factory=list)
    """Mean decode-step seconds of each round (the engine's own clock, prefills out)."""


def _adapters(cache: Path, model_dir: Path, rank: int, count: int, dora: bool) -> list[Path]:
    """``count`` random all-linear adapters of ``rank`` (DoRA if asked), cached."""
    from lorapool.testing import make_random_adapter
    from lorapool.testing.adapters import ALL_LINEAR

    root = cache / "bench-adapters" / f"r{rank}-all-linear{'-dora' if dora else ''}"
    paths = [root / f"a{i}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        import torch
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for p in missing:
            make_random_adapter(
                p, base, rank=rank, target_modules=ALL_LINEAR, seed=int(p.name[1:]), use_dora=dora
            )
    return paths


def _bandwidth(threads: int) -> float:
    """Bytes/s of a sum over 1 GiB of fp32 with ``threads`` threads: the best of five."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(1 << 28)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - start)
        return x.nbytes / best
    finally:
        torch.set_num_threads(before)


def _base_bytes(model_dir: Path) -> int:
    """Bytes a decode step reads of the base model: every layer's linears and the LM head."""
    from lorapool.backends.torch.model import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    linears = sum(i * o for i, o in cfg.module_shapes().values()) * cfg.num_layers
    return 4 * (linears + cfg.vocab_size * cfg.hidden_size)


def _own_bytes(paths: list[Path]) -> int:
    """The adapters' own weights, in fp32: the bytes of their A and B (and DoRA) tensors."""
    from safetensors import safe_open

    total = 0
    for p in paths:
        with safe_open(str(p / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += 4 * math.prod(f.get_slice(key).get_shape())
    return total


async def _rounds(args: argparse.Namespace, model_dir: Path, cache: Path) -> dict[str, Any]:
    from lorapool import AdapterPool, SamplingParams, TieredStore
    from lorapool.backends.torch import TorchBackend

    r16 = _adapters(cache, model_dir, 16, 64, dora=False)
    dora = _adapters(cache, model_dir, 16, 16, dora=True)
    r8 = _adapters(cache, model_dir, 8, 16, dora=False)
    by_rank = {rank: _adapters(cache, model_dir, rank, 16, False) for rank in MIXED_RANKS}
    mixed = [by_rank[rank][i] for i in range(16) for rank in MIXED_RANKS]  # ranks interleaved
    batch, seq = args.batch, 128 + args.max_tokens

    def backend(max_rank: int, adapters: list[Path], layout: str = "paged") -> Any:
        # The arena sized to what it will hold (padded: every adapter at rank 64 over every
        # module), so four engines fit this machine's memory side by side.
        own = len(adapters) * _own_bytes(by_rank[64][:1]) if layout == "padded" else None
        return TorchBackend(
            model_dir,
            max_slots=len(adapters),
            max_rank=max_rank,
            max_batch=batch,
            max_seq_len=seq,
            dtype="float32",
            threads=args.threads,
            prefix_cache_bytes=0,
            lora_layout=layout,
            lora_bytes=int(1.05 * (own if own is not None else _own_bytes(adapters))) + (1 << 20),
        )

    pools = {
        "r16": (backend(16, r16 + dora), {"a": r16, "d": dora}),
        "m64": (backend(64, mixed + r8), {"m": mixed, "e": r8}),
        "m64-padded": (backend(64, mixed, "padded"), {"m": mixed}),
        "r8": (backend(8, r8), {"e": r8}),
    }

    def spread(prefix: str, k: int) -> list[str | None]:
        return [f"bench/{prefix}{j % k}" for j in range(batch)]

    rows = [
        _Row("base", "r16", [None] * batch),
        _Row("16 adapters r16", "r16", spread("a", 16)),
        _Row("64 adapters r16", "r16", spread("a", 64)),
        _Row("16 DoRA r16", "r16", spread("d", 16)),
        _Row("mixed 8/16/32/64 paged", "m64", spread("m", len(mixed))),
        _Row("mixed 8/16/32/64 padded", "m64-padded", spread("m", len(mixed))),
        _Row("16 r8, max_rank 64", "m64", spread("e", 16)),
        _Row("16 r8, max_rank 8", "r8", spread("e", 16)),
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    opened: dict[str, Any] = {}
    try:
        for key, (b, sets) in pools.items():
            pool = AdapterPool(b, store=TieredStore(host_bytes="1GiB"))
            await pool.__aenter__()
            opened[key] = pool
            for prefix, paths in sets.items():
                for i, path in enumerate(paths):
                    await pool.register(f"bench/{prefix}{i}", str(path), tenant="bench")

        async def one(row: _Row) -> tuple[float, float]:
            pool: Any = opened[row.pool]
            stats = pools[row.pool][0].stats
            steps, decode = stats.steps, stats.decode_seconds
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    pool.complete(
                        chat(PROMPTS[j % len(PROMPTS)]),
                        adapter=name,
                        tenant="bench",
                        params=params,
                    )
                    for j, name in enumerate(row.names)
                )
            )
            tokens: int = sum(r.usage.completion_tokens for r in results)
            elapsed = time.perf_counter() - start
            step = (stats.decode_seconds - decode) / max(stats.steps - steps, 1)
            return tokens / elapsed, step

        for row in rows:  # warm up: every adapter into its slot
            await one(row)
        for r in range(args.rounds):
            for row in rows:
                tps, step = await one(row)
                row.tps.append(tps)
                row.step.append(step)
                print(
                    f"  round {r + 1}: {row.label:<26} {tps:8.1f} tok/s, decode step "
                    f"{step * 1e3:7.1f} ms",
                    file=sys.stderr,
                )
        blocks = {key: await pools[key][0].lora_resident_bytes() for key in opened}
        used = {key: sum(b.values()) for key, b in blocks.items()}
        used["r8 in m64"] = sum(n for a, n in blocks["m64"].items() if a.startswith("bench/e"))
    finally:
        for pool in opened.values():
            await pool.__aexit__(None, None, None)
    return {
        "rows": rows,
        "used": used,
        "own": {
            "r16x64": _own_bytes(r16),
            "r8x16": _own_bytes(r8),
            "mixed": _own_bytes(mixed),
            "dora": _own_bytes(dora),
        },
    }


def _ratio(rows: dict[str, _Row], num: str, den: str, *, decode: bool = True) -> float:
    """Median over rounds of ``num``'s throughput over ``den``'s: of decode steps (the
    inverse ratio of step times, same batch) or end to end (tokens/s, prefills in)."""
    if decode:
        pairs = zip(rows[den].step, rows[num].step, strict=True)
    else:
        pairs = zip(rows[num].tps, rows[den].tps, strict=True)
    return statistics.median(a / b for a, b in pairs)


PAIRS = {
    "16 adapters / base": ("16 adapters r16", "base", 0.90),
    "64 adapters / base": ("64 adapters r16", "base", 0.80),
    "mixed paged / padded": ("mixed 8/16/32/64 paged", "mixed 8/16/32/64 padded", 1.5),
    "r8: max_rank 64 / max_rank 8": ("16 r8, max_rank 64", "16 r8, max_rank 8", 0.95),
    "16 DoRA / 16 LoRA": ("16 DoRA r16", "16 adapters r16", None),
}
"""Each ratio: its rows and its target (issue 30)."""


def run(args: argparse.Namespace, model_dir: Path, cache: Path) -> dict[str, Any]:
    """Run the rows, print the table and the ratios against the targets; the results."""
    import torch

    if args.batch is None:
        args.batch = 64
    print(
        f"memory benchmark: batch {args.batch}, {args.max_tokens} tokens each, fp32, "
        f"{args.rounds} interleaved rounds (medians), torch {torch.__version__}",
        file=sys.stderr,
    )
    got = asyncio.run(_rounds(args, model_dir, cache))
    rows = {row.label: row for row in got["rows"]}
    bandwidth = _bandwidth(args.threads or torch.get_num_threads())
    base_bytes = _base_bytes(model_dir)
    own = got["own"]
    per16 = own["r16x64"] / 64
    limits = {
        "16 adapters / base": base_bytes / (base_bytes + 16 * per16),
        "64 adapters / base": base_bytes / (base_bytes + 64 * per16),
    }
    step_base = statistics.median(rows["base"].step)
    step_64 = statistics.median(rows["64 adapters r16"].step)
    lora_rate = 64 * per16 / max(step_64 - step_base, 1e-9)
    r8_memory = got["used"]["r8 in m64"]
    r8_own = own["r8x16"]
    results: dict[str, dict[str, Any]] = {}
    for label, (num, den, target) in PAIRS.items():
        results[label] = {
            "decode": _ratio(rows, num, den),
            "end_to_end": _ratio(rows, num, den, decode=False),
            "target": target,
            "limit": limits.get(label),
        }
    print(f"\n{'row':<28} {'tok/s':>9} {'decode step ms':>15}   (medians)")
    for row in got["rows"]:
        print(
            f"{row.label:<28} {statistics.median(row.tps):>9.1f} "
            f"{statistics.median(row.step) * 1e3:>15.1f}"
        )
    print(
        f"\n{'ratio':<30} {'decode':>7} {'end-to-end':>11} {'target':>8} {'memory-bound limit':>19}"
    )
    for label, r in results.items():
        t = f">= {r['target']:.2f}" if r["target"] is not None else "-"
        lim = f"{r['limit']:.3f}" if r["limit"] is not None else "-"
        print(f"{label:<30} {r['decode']:>7.3f} {r['end_to_end']:>11.3f} {t:>8} {lim:>19}")
    print(
        f"\nLoRA memory of the 16 rank-8 adapters in the max_rank-64 pool: "
        f"{r8_memory / 2**20:.2f} MiB for {r8_own / 2**20:.2f} MiB of their own bytes "
        f"({r8_memory / r8_own:.3f}x; target <= 1.1x); in the max_rank-8 pool "
        f"{got['used']['r8'] / 2**20:.2f} MiB"
    )
    print(
        f"padded pool: {got['used']['m64-padded'] / 2**20:.1f} MiB for the 64 mixed adapters "
        f"of {own['mixed'] / 2**20:.1f} MiB own bytes"
    )
    print(
        f"memory bandwidth (1 GiB fp32 sum, best of 5): {bandwidth / 1e9:.2f} GB/s; "
        f"LoRA part of the 64-adapter decode step: {64 * per16 / 2**20:.1f} MiB read in "
        f"{(step_64 - step_base) * 1e3:.1f} ms more than base-only's step = "
        f"{lora_rate / 1e9:.2f} GB/s = {lora_rate / bandwidth:.2f} of the measured bandwidth"
    )
    print(f"base model bytes per step: {base_bytes / 2**20:.1f} MiB")
    return {
        "rows": [
            {"label": r.label, "tok_s": r.tps, "decode_step_s": r.step} for r in rows.values()
        ],
        "ratios": results,
        "bytes": {"used": got["used"], "own": own, "base_per_step": base_bytes},
        "bandwidth_bytes_s": bandwidth,
        "lora_bytes_s": lora_rate,
    }
