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


async def test_a_slot_handed_off_on_torch_backend_resumes_with_the_same_output(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    """The hand-off scenario (tests/integration/handoff.py) on TorchBackend: the stopped
    request starts again as a preempted sequence returns, with its solo greedy output."""
    from lorapool import AdapterPool, FairScheduler
    from lorapool.backends.torch import TorchBackend
    from lorapool.scheduler import HandoffConfig, PlacesConfig

    from .handoff import check_handoff

    names = ("r8-attn", "r16-all", "r32-attn")
    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=8, max_seq_len=256)
    scheduler = FairScheduler(
        places=PlacesConfig(light_window=0), handoff=HandoffConfig(slot_wait=0.05)
    )
    async with AdapterPool(backend, scheduler=scheduler) as pool:
        for n in names:
            await pool.register(n, str(adapters[n]), tenant=n)
        await check_handoff(pool, scheduler, names)
