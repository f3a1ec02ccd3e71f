"""The backend conformance suite on the embedded TorchBackend with the real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapool.testing import ALL_CHECKS, check_backend

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")


async def test_torch_backend_passes_the_conformance_suite(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    from lorapool.backends.torch import TorchBackend

    report = await check_backend(
        lambda: TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=8, max_seq_len=256),
        {name: adapters[name] for name in ("r8-attn", "r16-all", "r32-attn")},
    )
    assert report.checks == list(ALL_CHECKS)
    assert report.prefix_tokens is None  # exact: mixed batches equal solo runs token for token
