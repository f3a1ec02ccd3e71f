"""Forget on VLLMBackend (issue 29): after ``pool.forget`` vLLM holds no LoRA of the adapter
(neither in a slot nor in its CPU LoRA cache of warm adapters: ``engine_loras()``), and
the prefix-cache blocks computed with it are gone.

Runs in the vLLM venv (``pytest -m vllm``, see tests/integration/test_vllm.py); in the main
venv vllm is not installed and it skips.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import AdapterNotFound

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

vllm = pytest.importorskip("vllm")

SLOTS = 2
NAMES = ("r8-attn", "r16-all", "r32-attn")
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
LONG = " ".join(f"Item {i}: a line of the shipping manifest for the harbour." for i in range(12))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(model_dir: Path) -> AsyncIterator[Any]:
    """One AsyncLLM: SLOTS slots + the zero adapter, room for one warm adapter more."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=8,
        enable_lora=True,
        max_loras=SLOTS + 1,
        max_lora_rank=32,
        max_cpu_loras=SLOTS + 2,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        disable_log_stats=True,
        enable_prefix_caching=True,
        seed=0,
    )
    llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
    try:
        yield llm
    finally:
        await asyncio.to_thread(llm.shutdown)


async def test_forget_takes_the_adapter_out_of_vllm(engine: Any, adapters: dict[str, Path]) -> None:
    from lorapool.backends.vllm import VLLMBackend

    backend = VLLMBackend(engine, max_slots=SLOTS)
    async with AdapterPool(backend) as pool:
        assert backend.capabilities.prefix_cache
        for name in NAMES:
            await pool.register(name, str(adapters[name]), tenant="acme")
        for name in NAMES:  # three adapters over two slots: the first is evicted, kept warm
            await pool.complete(LONG, adapter=name, tenant="acme", params=GREEDY)
        (warm,) = backend.warm_adapters()
        assert backend.slot_of("acme/r32-attn") is not None  # the last one used
        assert warm != "acme/r32-attn"
        again = await pool.complete(LONG, adapter="r32-attn", tenant="acme", params=GREEDY)
        assert again.usage.cached_tokens > 0  # vLLM cached blocks computed with it
        held = await backend.engine_loras()

        warm_report = await pool.forget(warm, tenant="acme")
        slot_report = await pool.forget("r32-attn", tenant="acme")

        left = await backend.engine_loras()
        assert len(held - left) == 2 and left <= held  # exactly those two LoRAs left vLLM
        assert backend.warm_adapters() == []
        for adapter_id in (warm, "acme/r32-attn"):
            assert backend.lora_name(adapter_id) is None and backend.slot_of(adapter_id) is None
            assert not pool.store.on_host(adapter_id)
            with pytest.raises(AdapterNotFound):
                await pool.complete("hi", adapter=adapter_id, tenant="acme", params=GREEDY)
        assert "device" in slot_report.purges[0].tiers["acme/r32-attn"]
        for report in (warm_report, slot_report):
            assert "vLLM prefix cache (reset whole)" in report.purges[0].engine
        # The blocks computed with it are gone: the same tenant, id and bytes again miss.
        await pool.register("r32-attn", str(adapters["r32-attn"]), tenant="acme")
        fresh = await pool.complete(LONG, adapter="r32-attn", tenant="acme", params=GREEDY)
        assert fresh.usage.cached_tokens == 0
        # The adapter that was not forgotten still serves.
        kept = next(n for n in NAMES if f"acme/{n}" not in (warm, "acme/r32-attn"))
        assert (await pool.complete(LONG, adapter=kept, tenant="acme", params=GREEDY)).text
