"""The TorchBackend that ``bench engine`` and its ``--contention`` runs measure (one recipe)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["torch_backend"]


def torch_backend(args: argparse.Namespace, model_dir: Path, dtype: str) -> Any:
    """TorchBackend sized for the run's adapter counts, batch and tokens, prefix cache off.

    The cache is off because the benchmarks measure the engine, prefills included, and
    send the same prompts every round.
    """
    from lorapool.backends.torch import TorchBackend

    counts = [int(c) for c in args.adapters.split(",") if c]
    return TorchBackend(
        model_dir,
        max_slots=max(counts),
        max_rank=args.rank,
        max_batch=args.batch,
        max_seq_len=128 + args.max_tokens,
        dtype=dtype,
        threads=args.threads,
        adapt_threads=args.adapt_threads,
        prefix_cache_bytes=0,
    )
