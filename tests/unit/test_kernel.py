"""Building and loading the LoRA CPU kernel: caching, failures, the off switch."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorapool.backends.torch.kernel import (
    DEFAULT_FLAGS,
    KernelUnavailable,
    SgmvKernel,
    build_kernel,
    cpu_kernel,
)

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.fixture
def fresh_cpu_kernel() -> Iterator[None]:
    cpu_kernel.cache_clear()
    yield
    cpu_kernel.cache_clear()


@needs_cc
def test_build_is_cached_per_source_compiler_and_flags(tmp_path: Path) -> None:
    first = build_kernel(tmp_path)
    assert isinstance(first, SgmvKernel)
    assert first.path.parent == tmp_path / "kernels"
    built_at = first.path.stat().st_mtime_ns
    again = build_kernel(tmp_path)
    assert again.path == first.path
    assert again.path.stat().st_mtime_ns == built_at, "a cached build must not be redone"
    portable = build_kernel(tmp_path, flags=(*DEFAULT_FLAGS, "-mno-avx512f"))
    assert portable.path != first.path
    assert not list((tmp_path / "kernels").glob("*.tmp")), "no half-written files left"


def test_missing_compiler_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KernelUnavailable, match="does not run"):
        build_kernel(tmp_path, cc=str(tmp_path / "no-such-cc"))


@needs_cc
def test_failed_build_reports_the_compilers_message(tmp_path: Path) -> None:
    with pytest.raises(KernelUnavailable, match="no-such-option"):
        build_kernel(tmp_path, flags=(*DEFAULT_FLAGS, "-fno-such-option"))
    assert not list((tmp_path / "kernels").glob("*")), "a failed build leaves nothing behind"


def test_off_switch(monkeypatch: pytest.MonkeyPatch, fresh_cpu_kernel: None) -> None:
    monkeypatch.setenv("LORAPOOL_LORA_KERNEL", "0")
    assert cpu_kernel() is None


def test_unbuildable_kernel_falls_back_to_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_cpu_kernel: None
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert cpu_kernel(tmp_path) is None


@needs_cc
def test_auto_builds_the_kernel(tmp_path: Path, fresh_cpu_kernel: None) -> None:
    kernel = cpu_kernel(tmp_path)
    assert kernel is not None
    assert kernel.path.is_file()


@needs_cc
def test_unwritable_cache_is_a_clear_error_and_auto_falls_back(
    tmp_path: Path, fresh_cpu_kernel: None
) -> None:
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    with pytest.raises(KernelUnavailable, match="cannot build"):
        build_kernel(blocked)
    assert cpu_kernel(blocked) is None
