"""Shared fixtures: the real SmolLM2 model and real PEFT adapters, cached across runs.

Both import torch/transformers only when a test asks for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapool.cache import default_cache_dir
from lorapool.testing.adapters import ALL_LINEAR, ATTENTION


@pytest.fixture(scope="session")
def lorapool_cache() -> Path:
    path = default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


# name -> (rank, target modules, use_rslora)
ADAPTER_SPECS: dict[str, tuple[int, tuple[str, ...], bool]] = {
    "r8-attn": (8, ATTENTION, False),
    "r16-all": (16, ALL_LINEAR, False),
    "r32-attn": (32, ATTENTION, False),
    "r16-qv-rslora": (16, ("q_proj", "v_proj"), True),
    "r32-all": (32, ALL_LINEAR, False),
}


@pytest.fixture(scope="session")
def model_dir(lorapool_cache: Path) -> Path:
    from lorapool.backends.torch import ensure_demo_model

    return ensure_demo_model(lorapool_cache)


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
                import torch
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            make_random_adapter(
                path, base, rank=rank, target_modules=targets, seed=seed + 1, use_rslora=rslora
            )
        out[name] = path
    return out
