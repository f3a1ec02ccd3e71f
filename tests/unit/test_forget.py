"""Forget's logic with test doubles: the in-flight tracker's drain and cancel, and the pool's
forget over MockBackend and a remote-looking local source (the real model, PEFT adapters
and S3 are tests/integration/test_forget.py)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.errors import (
    AccessDenied,
    AdapterForgotten,
    AdapterNotFound,
    InvalidRequest,
    SourceNotDeletable,
)
from lorapool.lifecycle.forget import InFlight
from lorapool.sources import LocalSource
from lorapool.testing import MockBackend
from lorapool.types import Chunk

from .test_store import make_adapters


def _chunk(i: int) -> Chunk:
    return Chunk(text=f"t{i}", token_ids=(i,))


class _Stream:
    """A request's stream: ``n`` chunks, each after ``gate`` is set; records its closing."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.gate = asyncio.Event()
        self.closed = False

    async def run(self) -> AsyncGenerator[Chunk, None]:
        try:
            for i in range(self.n):
                await self.gate.wait()
                yield _chunk(i)
        finally:
            self.closed = True


async def test_drain_waits_for_the_request_to_finish() -> None:
    tracker, stream = InFlight(), _Stream(3)
    tracked = tracker.track("acme/a", stream.run())
    got: list[Chunk] = []

    async def consume() -> None:
        async for chunk in tracked:
            got.append(chunk)

    consumer = asyncio.create_task(consume())
    stop = asyncio.create_task(tracker.stop(["acme/a"], "drain"))
    await asyncio.sleep(0)
    assert not stop.done()
    stream.gate.set()
    assert await asyncio.wait_for(stop, 10) == (1, 0)
    await consumer
    assert len(got) == 3 and tracker.count("acme/a") == 0


async def test_cancel_while_waiting_ends_the_request_with_the_typed_error() -> None:
    tracker, stream = InFlight(), _Stream(5)
    tracked = tracker.track("acme/a", stream.run())
    stream.gate.set()
    first = await tracked.__anext__()
    assert first.token_ids == (0,)
    stream.gate.clear()  # the next chunk waits
    errors: list[BaseException] = []

    async def consume() -> None:
        try:
            async for _ in tracked:
                pass
        except AdapterForgotten as exc:
            errors.append(exc)
        await asyncio.sleep(0)  # the task goes on: it was not left cancelled

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    assert await asyncio.wait_for(tracker.stop(["acme/a"], "cancel"), 10) == (0, 1)
    await asyncio.wait_for(consumer, 10)
    assert not consumer.cancelled()
    assert stream.closed
    assert isinstance(errors[0], AdapterNotFound) and errors[0].produced == 1
    assert tracker.count("acme/a") == 0


async def test_cancel_between_chunks_closes_the_stream_at_once() -> None:
    tracker, stream = InFlight(), _Stream(5)
    tracked = tracker.track("acme/a", stream.run())
    stream.gate.set()
    await tracked.__anext__()
    await tracked.__anext__()
    # the caller is not reading now: the stream is closed from the forget's side
    assert await asyncio.wait_for(tracker.stop(["acme/a"], "cancel"), 10) == (0, 1)
    assert stream.closed
    with pytest.raises(AdapterForgotten) as caught:
        await tracked.__anext__()
    assert caught.value.produced == 2


async def test_a_cancel_from_elsewhere_stays_a_cancellation() -> None:
    tracker, stream = InFlight(), _Stream(5)
    tracked = tracker.track("acme/a", stream.run())

    async def consume() -> None:
        async for _ in tracked:
            pass

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert stream.closed and tracker.count("acme/a") == 0


class _Remote(LocalSource):
    """Local files under a remote-looking scheme (``remote://<path>``): kept in the disk tier."""

    def local_path(self, uri: str) -> Path | None:
        return None

    async def fetch(self, uri: str, name: str, dest: Path) -> int:
        return await super().fetch(uri.removeprefix("remote://"), name, dest)

    def can_delete(self, uri: str) -> bool:
        return False  # as an http(s) source


def _pool(tmp_path: Path, backend: MockBackend) -> AdapterPool:
    store = TieredStore(disk_dir=tmp_path / "disk", sources={"remote": _Remote()})
    return AdapterPool(backend, store=store)


def _files_named(root: Path, sha: str) -> list[Path]:
    return [p for p in root.rglob("*") if sha in p.name]


async def test_forget_keeps_a_disk_copy_another_tenant_shares(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 2)
    twin = tmp_path / "twin"
    shutil.copytree(dirs["t/a0"], twin)
    async with _pool(tmp_path, MockBackend()) as pool:
        mine = await pool.register("a", f"remote://{dirs['t/a0']}", tenant="acme")
        other = await pool.register("b", f"remote://{twin}", tenant="globex")
        own = await pool.register("c", f"remote://{dirs['t/a1']}", tenant="acme")
        assert mine.sha256 == other.sha256 != own.sha256
        for name, tenant in (("a", "acme"), ("b", "globex"), ("c", "acme")):
            await pool.complete("hi", adapter=name, tenant=tenant)
        disk = tmp_path / "disk"
        report = await pool.forget(tenant="acme")
        assert set(report.registry) == {"acme/a", "acme/c"}
        (purge,) = report.purges
        assert purge.disk_kept == (mine.sha256,)
        assert [Path(p).name for p in purge.disk_paths] == [own.sha256]
        assert "device" in purge.tiers["acme/a"] and "host" in purge.tiers["acme/c"]
        assert not _files_named(disk, own.sha256)
        assert _files_named(disk, mine.sha256)  # globex's copy
        assert not pool.store.on_host("acme/a") and not pool.store.on_device("acme/a")
        for name in ("a", "c"):
            with pytest.raises(AdapterNotFound):
                await pool.complete("hi", adapter=name, tenant="acme")
        done = await pool.complete("hi", adapter="b", tenant="globex")
        assert done.text
        await pool.forget("b", tenant="globex")
        assert not _files_named(disk, mine.sha256)
        (entry,) = pool.audit.entries(action="forget", tenant="acme")
        assert entry.detail["registry"] == ["acme/a", "acme/c"]


async def test_forget_refuses_what_it_may_not_do_and_changes_nothing(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 1)
    async with _pool(tmp_path, MockBackend()) as pool:
        await pool.register("a", f"remote://{dirs['t/a0']}", tenant="acme", shared=True)
        with pytest.raises(SourceNotDeletable):  # _Remote cannot delete
            await pool.forget("a", tenant="acme", delete_source=True)
        with pytest.raises(AccessDenied):  # shared: globex may use it, not forget it
            await pool.forget("a", tenant="globex")
        with pytest.raises(AdapterNotFound):
            await pool.forget("nothing", tenant="acme")
        with pytest.raises(InvalidRequest):
            await pool.forget("a", tenant="acme", in_flight="later")  # type: ignore[arg-type]
        assert [i.adapter_id for i in pool.list_adapters(tenant="acme")] == ["acme/a"]
        assert (await pool.complete("hi", adapter="a", tenant="acme")).text


async def test_forget_cancels_a_running_request_and_bills_it(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 1)
    backend = MockBackend(token_delay=0.05)
    async with _pool(tmp_path, backend) as pool:
        await pool.register("a", f"remote://{dirs['t/a0']}", tenant="acme")
        params = SamplingParams(max_tokens=400)
        stream = pool.generate("hi", adapter="a", tenant="acme", params=params)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                forgetting = asyncio.create_task(
                    pool.forget("a", tenant="acme", in_flight="cancel")
                )
                break
        with pytest.raises(AdapterForgotten):
            async for _ in stream:
                got += 1
        report = await asyncio.wait_for(forgetting, 30)
        assert report.cancelled == 1
        usage = pool.usage("acme")
        assert usage.failed == 1 and usage.completion_tokens == got
        assert got < 400


async def test_the_local_source_deletes_a_directory_without_following_links(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    adapter = make_adapters(tmp_path, 1)["t/a0"]
    (adapter / "README.md").write_text("card")
    (adapter / "link").symlink_to(outside)
    source = LocalSource()
    assert not source.can_delete("/") and not source.can_delete(str(Path.home()))
    assert source.can_delete(str(adapter))
    deleted = await source.delete(str(adapter))
    assert not adapter.exists() and outside.read_text() == "keep me"
    assert str(adapter / "adapter_model.safetensors") in deleted and deleted[-1] == str(adapter)
    assert str(adapter / "link") in deleted


async def test_a_source_another_adapter_reads_is_not_deleted(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 1)
    async with _pool(tmp_path, MockBackend()) as pool:
        await pool.register("a", str(dirs["t/a0"]), tenant="acme")
        await pool.register("b", str(dirs["t/a0"]), tenant="globex")
        with pytest.raises(SourceNotDeletable, match="another registered adapter"):
            await pool.forget("a", tenant="acme", delete_source=True)
        assert (dirs["t/a0"] / "adapter_model.safetensors").is_file()
        assert [i.adapter_id for i in pool.list_adapters(tenant="acme")] == ["acme/a"]
        report = await pool.forget("a", tenant="acme")
        assert report.source == () and (await pool.complete("hi", adapter="b", tenant="globex"))
        report = await pool.forget("b", tenant="globex", delete_source=True)
        assert not dirs["t/a0"].exists() and report.source[-1] == str(dirs["t/a0"].resolve())


async def test_a_source_nested_in_or_around_another_adapters_is_not_deleted(
    tmp_path: Path,
) -> None:
    """Deleting a source deletes everything under it: an adapter read from inside another's
    source directory (or around it) would lose its files."""
    dirs = make_adapters(tmp_path, 1)
    outer = tmp_path / "outer"
    shutil.copytree(dirs["t/a0"], outer)
    shutil.copytree(dirs["t/a0"], outer / "inner")
    async with _pool(tmp_path, MockBackend()) as pool:
        await pool.register("outer", str(outer), tenant="acme")
        await pool.register("inner", str(outer / "inner"), tenant="globex")
        for adapter, tenant in (("outer", "acme"), ("inner", "globex")):
            with pytest.raises(SourceNotDeletable, match="within it"):
                await pool.forget(adapter, tenant=tenant, delete_source=True)
        assert (outer / "inner" / "adapter_model.safetensors").is_file()
        assert (await pool.complete("hi", adapter="inner", tenant="globex")).text


def test_sources_overlap_by_whole_parts() -> None:
    from lorapool.lifecycle.forget import sources_overlap

    assert sources_overlap("s3://b/acme", "s3://b/acme/y")
    assert sources_overlap("s3://b/acme/", "s3://b/acme")
    assert sources_overlap("s3://b/acme/y", "s3://B/acme")
    assert not sources_overlap("s3://b/acme", "s3://b/acme-2")
    assert not sources_overlap("s3://b/acme", "s3://c/acme")
    assert sources_overlap("/srv/a", "file:///srv/a/b")
    assert not sources_overlap("/srv/a", "/srv/ab")
    assert not sources_overlap("https://h/a", "s3://h/a")


async def test_a_source_whose_parent_became_a_link_is_not_deleted(tmp_path: Path) -> None:
    """acme registers acme/m/x, then swaps acme/m for a link to globex's directory: the
    delete would remove globex's x. It is refused before anything changes."""
    dirs = make_adapters(tmp_path, 1)
    mine, theirs = tmp_path / "acme" / "m", tmp_path / "globex"
    shutil.copytree(dirs["t/a0"], mine / "x")
    shutil.copytree(dirs["t/a0"], theirs / "x")
    async with _pool(tmp_path, MockBackend()) as pool:
        await pool.register("x", str(mine / "x"), tenant="acme")
        mine.rename(tmp_path / "acme" / "m-was")
        mine.symlink_to(theirs, target_is_directory=True)
        with pytest.raises(SourceNotDeletable):
            await pool.forget("x", tenant="acme", delete_source=True)
        assert (theirs / "x" / "adapter_model.safetensors").is_file()
        assert [i.adapter_id for i in pool.list_adapters(tenant="acme")] == ["acme/x"]


async def test_a_forget_the_registry_fails_part_way_purges_what_left_it_and_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry refuses the second removal: the first adapter, already out of the
    registry, must not stay on the device, host and disk unreachable and unaudited."""
    from lorapool.errors import RegistryUnavailable

    dirs = make_adapters(tmp_path, 2)
    async with _pool(tmp_path, MockBackend()) as pool:
        first = await pool.register("a", f"remote://{dirs['t/a0']}", tenant="acme")
        await pool.register("c", f"remote://{dirs['t/a1']}", tenant="acme")
        for name in ("a", "c"):
            await pool.complete("hi", adapter=name, tenant="acme")
        remove = pool.registry.remove
        calls = []

        def failing(adapter_id: str, **kwargs: object) -> None:
            calls.append(adapter_id)
            if len(calls) == 2:
                raise RegistryUnavailable(f"remove adapter {adapter_id!r}", "disk full")
            remove(adapter_id, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(pool.registry, "remove", failing)
        with pytest.raises(RegistryUnavailable):
            await pool.forget(tenant="acme")
        assert calls == ["acme/a", "acme/c"]
        assert not pool.store.on_host("acme/a") and not pool.store.on_device("acme/a")
        assert not _files_named(tmp_path / "disk", first.sha256)
        assert pool.store.on_host("acme/c") or pool.store.on_device("acme/c")  # still there
        (entry,) = pool.audit.entries(action="forget")
        assert entry.detail["removed"] == ["acme/a"] and "disk full" in entry.detail["failed"]


class _SlowUnload(MockBackend):
    """Holds each unload until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.unloading = asyncio.Event()
        self.release = asyncio.Event()

    async def unload(self, adapter_id: str) -> None:
        self.unloading.set()
        await self.release.wait()
        await super().unload(adapter_id)


async def test_two_purges_of_one_adapter_at_once_both_say_where_it_was(tmp_path: Path) -> None:
    """A replica's follower and a forget's broadcast may purge one adapter together (CI
    saw the forget's report miss the device tier the follower was emptying): the second
    waits for the first and reports the tiers it emptied, and the adapter is gone once."""
    dirs = make_adapters(tmp_path, 1)
    backend = _SlowUnload()
    async with _pool(tmp_path, backend) as pool:
        info = await pool.register("a", f"remote://{dirs['t/a0']}", tenant="acme")
        await pool.complete("hi", adapter="a", tenant="acme")
        assert pool.store.on_device(info.adapter_id)
        try:
            first = asyncio.create_task(pool.store.purge(info, keep_disk=False))
            await asyncio.wait_for(backend.unloading.wait(), 60)
            second = asyncio.create_task(pool.store.purge(info, keep_disk=False))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not second.done()  # it waits for the first
        finally:
            backend.release.set()
        (tiers, deleted), (again, _) = await asyncio.gather(first, second)
        assert tiers == ["device", "host", "disk"] and again == tiers
        assert deleted is not None and not deleted.exists()
        assert backend.unloads == [info.adapter_id]
        assert not pool.store.on_host(info.adapter_id)
        third, _ = await pool.store.purge(info, keep_disk=False)  # later: nothing left
        assert third == []
