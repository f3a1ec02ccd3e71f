"""Fixtures for integration tests: real model, real adapters, a started TorchBackend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .servers import CountingMotoServer

torch = pytest.importorskip("torch")


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
def hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture
async def backend(model_dir: Path) -> AsyncIterator[Any]:
    from lorapool.backends.torch import TorchBackend

    b = TorchBackend(model_dir, max_slots=6, max_rank=32, max_batch=8, max_seq_len=256)
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()
