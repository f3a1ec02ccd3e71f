"""Adapter archives: unsafe member names refused, extraction capped as it is written."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from lorapool.errors import AdapterValidationError
from lorapool.formats import (
    CONFIG_FILE,
    ValidationLimits,
    check_archive_members,
    extract_archive,
    is_archive,
)


def test_check_archive_members() -> None:
    check_archive_members(["adapter/", "adapter/adapter_config.json", "./x"])
    for bad in ["../x", "a/../../x", "/abs", "C:\\x", "a\\..\\b", "", "a\0b"]:
        with pytest.raises(AdapterValidationError) as info:
            check_archive_members([bad])
        assert info.value.reason == "unsafe_path"
    with pytest.raises(AdapterValidationError, match="twice"):
        check_archive_members(["a", "./a"])
    with pytest.raises(AdapterValidationError) as info:
        check_archive_members([f"f{i}" for i in range(100)], max_members=10)
    assert info.value.reason == "too_large"


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_extract_returns_the_adapter_folder(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", {f"adapter/{CONFIG_FILE}": json.dumps({}).encode()})
    assert is_archive(archive) and not is_archive(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert extract_archive(archive, out) == out / "adapter"


def test_extract_stops_at_the_byte_cap(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", {CONFIG_FILE: b"{}", "big": b"\0" * 4096})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AdapterValidationError) as info:
        extract_archive(archive, out, ValidationLimits(max_total_bytes=1024))
    assert info.value.reason == "too_large"
    assert not (out / "big").exists()
