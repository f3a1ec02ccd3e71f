"""AdapterDirs: the files a backend names to an engine stay until the engine has read them."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from lorapool.backends.files import AdapterDirs
from lorapool.formats import CONFIG_FILE, WEIGHTS_FILE
from lorapool.types import LoadedAdapter, LoraConfig


def _adapter(name: str, payload: bytes) -> LoadedAdapter:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",))
    return LoadedAdapter(name, config, payload, hashlib.sha256(payload).hexdigest())


async def test_a_leased_directory_survives_discard_until_the_lease_ends(tmp_path: Path) -> None:
    dirs = AdapterDirs(tmp_path)
    adapter = _adapter("a", b"weights-a")
    async with dirs.lease(adapter) as path:
        assert (path / WEIGHTS_FILE).read_bytes() == b"weights-a"
        assert (path / CONFIG_FILE).is_file()
        assert await dirs.discard_unused(adapter.sha256) is False
        assert (path / WEIGHTS_FILE).is_file()
        async with dirs.lease(adapter):  # nested: the outer lease still counts afterwards
            pass
        assert dirs.leased(adapter.sha256)
        assert await dirs.discard_unused(adapter.sha256) is False
    assert not dirs.leased(adapter.sha256)
    assert await dirs.discard_unused(adapter.sha256) is True
    assert not path.exists()


async def test_discard_of_other_content_goes_ahead_during_a_lease(tmp_path: Path) -> None:
    dirs = AdapterDirs(tmp_path)
    a, b = _adapter("a", b"weights-a"), _adapter("b", b"weights-b")
    b_path = await dirs.dir_of(b)
    async with dirs.lease(a) as a_path:
        assert await dirs.discard_unused(b.sha256) is True
        assert not b_path.exists() and (a_path / WEIGHTS_FILE).is_file()


async def test_an_unload_racing_a_load_of_the_same_content_keeps_the_files(
    tmp_path: Path,
) -> None:
    """The vLLM conformance failure: unload(A) deleting A's files while load(A) had just
    written them and the engine was about to read them."""
    dirs = AdapterDirs(tmp_path)
    adapter = _adapter("a", b"weights-a" * 1000)
    await dirs.dir_of(adapter)  # A is on disk, as while it was in a slot
    engine_reading = asyncio.Event()
    seen: list[bytes] = []

    async def load() -> None:
        async with dirs.lease(adapter) as path:
            engine_reading.set()
            await asyncio.sleep(0.05)  # the engine reads the files some time later
            seen.append((path / WEIGHTS_FILE).read_bytes())

    async def unload() -> None:
        await engine_reading.wait()
        await dirs.discard_unused(adapter.sha256)

    await asyncio.gather(load(), unload())
    assert seen == [adapter.weights]
