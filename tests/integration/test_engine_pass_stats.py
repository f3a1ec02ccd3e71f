"""The torch engine counts, at every forward pass, the distinct adapters in it
(``Capabilities.pass_stats``, ``Backend.adapters_per_pass``): base-only passes as 0."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lorapool import AdapterPool, SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


async def test_every_pass_is_counted_by_its_distinct_adapters(
    backend: Any, adapters: dict[str, Path]
) -> None:
    assert backend.capabilities.pass_stats
    async with AdapterPool(backend) as pool:
        await pool.register("a", str(adapters["r8-attn"]), tenant="acme")
        await pool.register("b", str(adapters["r16-all"]), tenant="acme")
        await pool.complete("Hello", tenant="acme", params=PARAMS)  # the base model alone
        base_only = backend.adapters_per_pass()
        assert set(base_only) == {0} and base_only[0] >= 2  # a prefill, then decode steps
        await pool.pin("acme/a", tenant="acme")
        await pool.pin("acme/b", tenant="acme")
        await asyncio.gather(
            *(
                pool.complete(f"Story {i}:", adapter=adapter, tenant="acme", params=PARAMS)
                for i, adapter in enumerate(["acme/a", "acme/b", None, "acme/a", "acme/b"])
            )
        )
        passes = backend.adapters_per_pass()
        stats = backend.stats
        assert sum(passes.values()) == stats.steps + stats.prefill_steps
        assert max(passes) == 2  # both adapters in one pass (the base rows add none)
        assert passes is not stats.distinct_adapters  # a copy, safe to read elsewhere
