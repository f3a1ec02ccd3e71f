"""TGIBackend against a real TGI server with SmolLM2 and real PEFT adapters loaded at launch.

Skipped unless ``LORAPOOL_TGI_URL`` points at a TGI (3.3) server started with the test
adapters. The adapters are the integration tests' (made once under the lorapool cache,
``~/.cache/lorapool`` by default): create them and the model, then start TGI on a GPU
with them mounted::

    pytest -q tests/integration/test_backend_conformance.py  # models/ and test-adapters/
    A=/data/test-adapters
    docker run --rm --gpus all --shm-size 1g -p 8080:80 -v ~/.cache/lorapool:/data \\
        -e LORA_ADAPTERS=r8-attn=$A/r8-attn,r16-all=$A/r16-all,r32-attn=$A/r32-attn \\
        ghcr.io/huggingface/text-generation-inference:3.3.6 \\
        --model-id /data/models/SmolLM2-135M-Instruct --dtype bfloat16 \\
        --max-input-tokens 512 --max-total-tokens 1024
    LORAPOOL_TGI_URL=http://localhost:8080 pytest -m gpu tests/gpu/test_tgi.py

TGI has no ``ignore_eos``. The suite streams its fixed-length requests from the first
adapter, ``r8-attn``, which (in float32 on CPU) does not reach EOS within 64 tokens of
its prompt; the base model ends at once there, which the suite allows. TGI's batched
bfloat16 kernels are not batch-invariant, so mixed batches are compared on their first
``PREFIX`` tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.backends.tgi import TGIBackend
from lorapool.errors import LoadError
from lorapool.testing import check_backend

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

URL = os.environ.get("LORAPOOL_TGI_URL")
if not URL:
    pytest.skip("set LORAPOOL_TGI_URL to a TGI started with LORA_ADAPTERS", allow_module_level=True)
pytest.importorskip("torch")  # to make the adapters (peft) if they are not cached yet


SERVED = ("r8-attn", "r16-all", "r32-attn")  # LORA_ADAPTERS of the command above
NOT_SERVED = "r16-qv-rslora"
STORY = "Once upon a time"  # base, r8-attn and r16-qv-rslora all differ, none ends early
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PREFIX = int(os.environ.get("LORAPOOL_GPU_PREFIX_TOKENS", "4"))


def backend(model_dir: Path) -> TGIBackend:
    assert URL is not None
    return TGIBackend(URL, adapters=list(SERVED), max_rank=32, model_path=model_dir)


async def test_tgi_backend_passes_the_conformance_suite(
    adapters: dict[str, Path], model_dir: Path
) -> None:
    served = {n: adapters[n] for n in SERVED}
    report = await check_backend(lambda: backend(model_dir), served, prefix_tokens=PREFIX)
    assert report.checks == [
        "capabilities",
        "streaming",
        "mixed",
        "cancellation",
        "unload-drain",
        "errors",
        "sampling",
        "close",
    ]  # every check; no more adapters than slots: TGI has one slot per static adapter
    from lorapool.backends.tgi import TGI_SAMPLING

    assert set(report.accepted) == TGI_SAMPLING  # each served; every other one refused


async def test_lorapool_refuses_what_tgi_would_answer_with_the_base_model(
    adapters: dict[str, Path], model_dir: Path
) -> None:
    assert URL is not None
    async with httpx.AsyncClient(base_url=URL, timeout=60) as client:

        async def raw(adapter_id: str | None) -> str:
            parameters: dict[str, object] = {"max_new_tokens": 12, "do_sample": False}
            if adapter_id is not None:
                parameters["adapter_id"] = adapter_id
            response = await client.post(
                "/generate", json={"inputs": STORY, "parameters": parameters}
            )
            response.raise_for_status()
            return str(response.json()["generated_text"])

        # TGI itself: an adapter id it was not started with gets the base model's answer.
        assert await raw(NOT_SERVED) == await raw(None)
        assert await raw(SERVED[0]) != await raw(None)

    async with AdapterPool(backend(model_dir)) as pool:
        await pool.register(NOT_SERVED, str(adapters[NOT_SERVED]), tenant="t")
        with pytest.raises(LoadError, match="LORA_ADAPTERS"):
            await pool.complete(STORY, adapter=NOT_SERVED, tenant="t", params=GREEDY)
        await pool.register(SERVED[0], str(adapters[SERVED[0]]), tenant="t")
        served = await pool.complete(STORY, adapter=SERVED[0], tenant="t", params=GREEDY)
        assert served.text.strip() and served.usage.completion_tokens == len(served.token_ids)
