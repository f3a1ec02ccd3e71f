"""SGLangBackend against a real SGLang engine on a CUDA GPU, with SmolLM2 and real PEFT adapters.

Skipped unless a CUDA device is visible and the ``sglang`` package is installed
(``pip install 'lorapool[sglang]'`` in an environment with a CUDA torch)::

    pytest -m gpu tests/gpu/test_sglang.py

One engine is built for the module by an owning ``SGLangBackend`` (the build path:
``enable_lora``, ``max_loras_per_batch = slots + 1``, ``max_lora_rank``, targets) and
adopted by the backends under test. Both engines run in bfloat16; batched bfloat16
kernels are not batch-invariant, so outputs are compared on their first ``PREFIX`` tokens.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lorapool import AdapterPool, SamplingParams
from lorapool.testing import ALL_CHECKS, check_backend

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if importlib.util.find_spec("sglang") is None:
    pytest.skip("needs sglang: pip install 'lorapool[sglang]'", allow_module_level=True)


SLOTS = 2
NAMES = ("r8-attn", "r16-all", "r32-attn")  # one more than the slots
PROMPT = "Write one sentence about the sea."
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PREFIX = int(os.environ.get("LORAPOOL_GPU_PREFIX_TOKENS", "4"))
DTYPE = "bfloat16"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(model_dir: Path) -> AsyncIterator[Any]:
    """One sglang.Engine, built (and shut down) by an SGLangBackend that owns it."""
    from lorapool.backends.sglang import SGLangBackend

    owner = SGLangBackend(
        model_dir,
        max_slots=SLOTS,
        max_rank=32,
        max_batch=16,
        dtype=DTYPE,
        mem_fraction_static=0.4,
        disable_cuda_graph=True,
        random_seed=0,
    )
    await owner.start()
    assert owner.engine.server_args.max_loras_per_batch == SLOTS + 1
    try:
        yield owner.engine
    finally:
        await owner.aclose()


def backend_on(engine: Any) -> Any:
    from lorapool.backends.sglang import SGLangBackend

    return SGLangBackend(engine=engine, max_slots=SLOTS)


async def test_sglang_backend_passes_the_conformance_suite(
    engine: Any, adapters: dict[str, Path]
) -> None:
    report = await check_backend(lambda: backend_on(engine), adapters, prefix_tokens=PREFIX)
    assert report.checks == [c for c in ALL_CHECKS if c != "resume"]  # not offered
    from lorapool.backends.sglang import SGLANG_SAMPLING

    assert set(report.accepted) == SGLANG_SAMPLING  # each served; every other one refused
    # The backend unloaded everything it loaded: SGLang holds no adapter of lorapool's.
    loaded = await engine.async_load_lora_adapter("probe", str(adapters["r8-attn"]))
    assert set(loaded.loaded_adapters) == {"probe"}
    await engine.async_unload_lora_adapter("probe")


async def test_outputs_equal_torch_backend_greedy(
    engine: Any, adapters: dict[str, Path], model_dir: Path
) -> None:
    """SGLang and lorapool's own engine, both bfloat16 on the GPU: the same first tokens."""
    from lorapool.backends.torch import TorchBackend

    results: dict[str, dict[str, tuple[int, ...]]] = {}
    torch_backend = TorchBackend(
        model_dir, max_slots=SLOTS, max_rank=32, max_batch=8, dtype=DTYPE, device="cuda"
    )
    for label, backend in (("sglang", backend_on(engine)), ("torch", torch_backend)):
        async with AdapterPool(backend) as pool:
            for n in NAMES:
                await pool.register(n, str(adapters[n]), tenant="t")
            runs = [pool.complete(PROMPT, adapter=n, tenant="t", params=GREEDY) for n in NAMES]
            runs.append(pool.complete(PROMPT, tenant="t", params=GREEDY))
            done = await asyncio.gather(*runs)
            results[label] = {k: c.token_ids for k, c in zip([*NAMES, "base"], done, strict=True)}
    for key in [*NAMES, "base"]:
        assert len(results["sglang"][key]) == GREEDY.max_tokens, key
        assert results["sglang"][key][:PREFIX] == results["torch"][key][:PREFIX], key
    # The adapters are applied: each changes the base model's output.
    sglang_out = results["sglang"]
    assert all(sglang_out[n] != sglang_out["base"] for n in NAMES)
