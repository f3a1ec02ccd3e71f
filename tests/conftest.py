"""Shared fixtures: the real SmolLM2 model and real PEFT adapters, cached across runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapool.cache import default_cache_dir


@pytest.fixture(scope="session")
def lorapool_cache() -> Path:
    path = default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path
