"""Unregistering an adapter has the backend forget its content's cached state
(``Backend.forget``, ``Capabilities.prefix_cache``), once no registered adapter has it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from lorapool import AdapterPool
from lorapool.testing import MockBackend
from lorapool.types import Capabilities

from .test_store import make_adapters


@dataclasses.dataclass
class _Caching(MockBackend):
    """A MockBackend that says it keeps a prefix cache, and records what it forgets."""

    prefix_cache: bool = True
    forgotten: list[str] = dataclasses.field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, prefix_cache=self.prefix_cache)

    async def forget(self, sha256: str) -> None:
        self.forgotten.append(sha256)


async def test_unregister_forgets_the_content_when_no_adapter_has_it(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 2)
    twin = tmp_path / "twin"
    shutil.copytree(dirs["t/a0"], twin)  # the same files: the same content
    backend = _Caching()
    async with AdapterPool(backend) as pool:
        a0 = await pool.register("a0", str(dirs["t/a0"]), tenant="acme")
        same = await pool.register("copy", str(twin), tenant="globex")
        a1 = await pool.register("a1", str(dirs["t/a1"]), tenant="acme")
        assert a0.sha256 == same.sha256 != a1.sha256
        await pool.unregister("a0", tenant="acme")
        assert backend.forgotten == []  # globex's copy still has that content
        await pool.unregister("copy", tenant="globex")
        assert backend.forgotten == [a0.sha256]
        await pool.unregister("a1", tenant="acme")
        assert backend.forgotten == [a0.sha256, a1.sha256]


async def test_unregistering_a_versioned_name_forgets_each_version(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 2)
    backend = _Caching()
    async with AdapterPool(backend) as pool:
        v1 = await pool.register("bot", str(dirs["t/a0"]), tenant="acme", version="v1")
        v2 = await pool.register("bot", str(dirs["t/a1"]), tenant="acme", version="v2")
        await pool.unregister("bot", tenant="acme")
        assert sorted(backend.forgotten) == sorted([v1.sha256, v2.sha256])


async def test_a_backend_without_a_prefix_cache_is_not_asked(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 1)
    backend = _Caching(prefix_cache=False)
    async with AdapterPool(backend) as pool:
        await pool.register("a0", str(dirs["t/a0"]), tenant="acme")
        await pool.unregister("a0", tenant="acme")
    assert backend.forgotten == []
