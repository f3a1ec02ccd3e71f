"""Fixtures for integration tests: real model, real adapters, a started TorchBackend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .servers import CountingMotoServer

torch = pytest.importorskip("torch")

from lorapool.testing.adapters import ALL_LINEAR, ATTENTION  # noqa: E402

# name -> (rank, target modules, use_rslora)
ADAPTER_SPECS: dict[str, tuple[int, tuple[str, ...], bool]] = {
    "r8-attn": (8, ATTENTION, False),
    "r16-all": (16, ALL_LINEAR, False),
    "r32-attn": (32, ATTENTION, False),
    "r16-qv-rslora": (16, ("q_proj", "v_proj"), True),
    "r32-all": (32, ALL_LINEAR, False),
}


@pytest.fixture
def s3_server() -> Iterator[CountingMotoServer]:
    """moto's S3 server on a free loopback port, counting the requests it gets."""
    from .servers import CountingMotoServer

    server = CountingMotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_dir(lorapool_cache: Path) -> Path:
    from lorapool.backends.torch import ensure_demo_model

    return ensure_demo_model(lorapool_cache)


@pytest.fixture(scope="session")
def hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def adapters(lorapool_cache: Path, model_dir: Path) -> dict[str, Path]:
    """Real PEFT adapters written by peft's save_pretrained, made once and cached."""
    from lorapool.testing import make_random_adapter

    root = lorapool_cache / "test-adapters"
    out: dict[str, Path] = {}
    base = None
    for seed, (name, (rank, targets, rslora)) in enumerate(ADAPTER_SPECS.items()):
        path = root / name
        if not (path / "adapter_model.safetensors").is_file():
            if base is None:
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            make_random_adapter(
                path, base, rank=rank, target_modules=targets, seed=seed + 1, use_rslora=rslora
            )
        out[name] = path
    return out


@pytest.fixture
async def backend(model_dir: Path) -> AsyncIterator[Any]:
    from lorapool.backends.torch import TorchBackend

    b = TorchBackend(model_dir, max_slots=6, max_rank=32, max_batch=8, max_seq_len=256)
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()
