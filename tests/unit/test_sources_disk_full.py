"""A full disk while a source writes is DiskFull (the source is fine), never a retried
source error. ``/dev/full`` is a real device that fails every write with ENOSPC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorapool.errors import DiskFull, SourceError
from lorapool.sources import LocalSource
from lorapool.sources._files import open_for_writing
from lorapool.sources.caps import FetchLimit

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


def _full(tmp_path: Path) -> Path:
    dest = tmp_path / "dest"
    dest.symlink_to("/dev/full")
    return dest


async def test_a_write_to_a_full_disk_is_disk_full(tmp_path: Path) -> None:
    with pytest.raises(DiskFull, match="no space left"):
        async with open_for_writing(
            _full(tmp_path), "s3://b/k", FetchLimit(1 << 20, "test cap")
        ) as out:
            await out.write(b"x" * 100_000)  # past the buffer: the write itself fails


async def test_a_local_copy_to_a_full_disk_is_disk_full_not_a_source_error(
    tmp_path: Path,
) -> None:
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"y" * 200_000)
    with pytest.raises(DiskFull) as full:
        await LocalSource().fetch(str(src), "adapter_model.safetensors", _full(tmp_path))
    assert not isinstance(full.value, SourceError)
