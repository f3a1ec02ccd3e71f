"""Caps enforced while reading, and registration validating the bytes it hashed.

Local adapters and local archives through a real TieredStore over MockBackend:
an oversized file is refused before it is hashed, archive bombs are refused
before (or while) they expand and leave nothing on disk, and a local directory
changed between staging and validation cannot slip through.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.errors import AdapterValidationError, LoadError
from lorapool.formats import ADAPTER_FILES, WEIGHTS_FILE, ValidationLimits, sha256_of_files
from lorapool.formats import peft as peft_format
from lorapool.store import Staged
from lorapool.testing import MockBackend

from .test_formats_peft import make_dir
from .test_store import FlakySource, make_adapters

MIB = 1 << 20
GIB = 1 << 30
CAP = ValidationLimits().max_total_bytes
ONE = SamplingParams(max_tokens=1)


def leftovers(disk: Path) -> list[Path]:
    """Whatever the staging area still holds."""
    return list((disk / ".tmp").rglob("*"))


def zeros_deflated(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of zeros, about 1 KiB per MiB, made in
    milliseconds: after a full flush the compressor restarts, so every MiB compresses
    to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(b"\0" * MIB) + c.flush(zlib.Z_FULL_FLUSH)
    return piece * mib + b"\x03\x00"  # an empty final block


def write_zip(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip of ``(name, payload, method, crc32, declared size)`` entries, written by hand
    so that a member may declare any size and carry any (pre-compressed) payload."""
    body = bytearray()
    central = bytearray()
    for name, payload, method, crc, size in entries:
        raw = name.encode()
        offset = len(body)
        body += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 33, crc, len(payload), size, len(raw), 0
        )
        body += raw + payload
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            method,
            0,
            33,
            crc,
            len(payload),
            size,
            len(raw),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += raw
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0
    )
    path.write_bytes(bytes(body + central + end))


def stored(directory: Path) -> list[tuple[str, bytes, int, int, int]]:
    """The adapter's files as stored zip entries."""
    out = []
    for name in ADAPTER_FILES:
        data = (directory / name).read_bytes()
        out.append((name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)))
    return out


def assert_too_large(err: pytest.ExceptionInfo[AdapterValidationError], *names: str) -> None:
    """A ``too_large`` refusal whose message names the cap (each of ``names`` in it)."""
    assert err.value.reason == "too_large", str(err.value)
    for name in names:
        assert name in str(err.value), (name, str(err.value))


@pytest.fixture
def zip_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes read out of zip members (what extraction decompresses), one entry per read."""
    counted: list[int] = []
    read = zipfile.ZipExtFile.read

    def counting(self: zipfile.ZipExtFile, n: int | None = -1) -> bytes:
        data = read(self, n)
        counted.append(len(data))
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting)
    return counted


# -- local files -------------------------------------------------------------------------


async def test_a_local_file_over_the_cap_is_refused_before_it_is_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_dir(tmp_path)
    os.truncate(adapter / WEIGHTS_FILE, 3 * GIB)  # sparse: costs no disk, reads as zeros
    hashed: list[Path] = []

    def spy(directory: Path, *args: object) -> str:
        hashed.append(directory)
        return "0" * 64

    monkeypatch.setattr(peft_format, "sha256_of_files", spy)
    store = TieredStore(disk_dir=tmp_path / "disk")
    async with AdapterPool(MockBackend(), store=store) as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("t/big", str(adapter), tenant="t")
        assert_too_large(err, str(CAP), "max_total_bytes")
        assert hashed == []  # refused from its size, before a byte was hashed
        assert len(pool.registry) == 0
        assert leftovers(tmp_path / "disk") == []


async def test_registration_validates_and_records_the_bytes_it_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = make_dir(tmp_path / "good")
    bad = make_dir(tmp_path / "bad", {"r": 128})  # above MockBackend's max_rank of 64
    source = tmp_path / "source"
    swap_to: list[Path] = []
    async with AdapterPool(MockBackend()) as pool:
        stage = pool.store.stage

        async def stage_then_change_the_source(uri: str) -> Staged:
            staged = await stage(uri)
            for name in ADAPTER_FILES:  # the source changes between hashing and validation
                shutil.copyfile(swap_to[0] / name, source / name)
            return staged

        monkeypatch.setattr(pool.store, "stage", stage_then_change_the_source)

        # Hashed a bad adapter, then the directory holds a good one: the bad one is validated.
        shutil.copytree(bad, source)
        swap_to.append(good)
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("t/swapped", str(source), tenant="t")
        assert err.value.reason in {"unsupported_rank", "rank_mismatch"}
        assert len(pool.registry) == 0

        # Hashed a good adapter, then the directory holds a bad one: the good one is validated
        # and recorded, and loading the changed directory is refused.
        shutil.rmtree(source)
        shutil.copytree(good, source)
        swap_to[0] = bad
        info = await pool.register("t/good", str(source), tenant="t")
        assert info.sha256 == sha256_of_files(good)
        assert info.config.r == 4
        with pytest.raises(LoadError, match="sha256 mismatch"):
            await pool.complete("x", adapter="t/good", tenant="t", params=ONE)
        assert leftovers(pool.store.disk_dir or tmp_path) == []


# -- archives ----------------------------------------------------------------------------


async def test_a_zip_bomb_over_the_per_adapter_cap_is_refused_before_it_expands(
    tmp_path: Path, zip_reads: list[int]
) -> None:
    adapter = make_dir(tmp_path)
    bomb = tmp_path / "bomb.zip"
    # 3 GiB of zeros in about 3 MiB, declared honestly (the CRC is never reached).
    zeros = ("zeros.dat", zeros_deflated(3 * 1024), zipfile.ZIP_DEFLATED, 0, 3 * GIB)
    write_zip(bomb, [zeros, *stored(adapter)])
    assert bomb.stat().st_size < 4 * MIB
    store = TieredStore(disk_dir=tmp_path / "disk")
    async with AdapterPool(MockBackend(), store=store) as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("t/bomb", str(bomb), tenant="t")
        assert_too_large(err, str(CAP), "max_total_bytes")
        assert sum(zip_reads) == 0  # refused from the declared sizes: nothing expanded
        assert len(pool.registry) == 0
        assert leftovers(tmp_path / "disk") == []


async def test_archive_expansion_is_capped_by_disk_bytes(
    tmp_path: Path, zip_reads: list[int]
) -> None:
    adapter = make_dir(tmp_path)
    bomb = tmp_path / "bomb.zip"
    crc = 0
    for _ in range(64):
        crc = zlib.crc32(b"\0" * MIB, crc)
    write_zip(
        bomb,
        [("zeros.dat", zeros_deflated(64), zipfile.ZIP_DEFLATED, crc, 64 * MIB), *stored(adapter)],
    )
    tar = tmp_path / "padded.tar"
    with tarfile.open(tar, "w") as tf:
        for i in range(4):  # 12 MiB in all, each member alone under the cap
            member = tarfile.TarInfo(f"pad-{i}.dat")
            member.size = 3 * MIB
            tf.addfile(member, io.BytesIO(b"\0" * member.size))
        for name in ADAPTER_FILES:
            tf.add(adapter / name, arcname=name)
    store = TieredStore(disk_dir=tmp_path / "disk", disk_bytes="8MiB")
    async with AdapterPool(MockBackend(), store=store) as pool:
        for archive in (bomb, tar):
            with pytest.raises(AdapterValidationError) as err:
                await pool.register("t/bomb", str(archive), tenant="t")
            assert_too_large(err, "disk_bytes", str(8 * MIB))
            assert len(pool.registry) == 0
            assert leftovers(tmp_path / "disk") == []
        assert sum(zip_reads) == 0
        # The adapter itself fits, as an archive too.
        fine = tmp_path / "fine.zip"
        write_zip(fine, stored(adapter))
        info = await pool.register("t/fine", str(fine), tenant="t")
        assert pool.store.on_disk(info.adapter_id)


async def test_a_zip_whose_headers_lie_expands_no_further_than_declared(
    tmp_path: Path, zip_reads: list[int]
) -> None:
    adapter = make_dir(tmp_path)
    liar = tmp_path / "liar.zip"
    # Declares 1 KiB, holds 64 MiB of deflated zeros.
    write_zip(
        liar,
        [("zeros.dat", zeros_deflated(64), zipfile.ZIP_DEFLATED, 0, 1024), *stored(adapter)],
    )
    store = TieredStore(disk_dir=tmp_path / "disk")
    async with AdapterPool(MockBackend(), store=store) as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("t/liar", str(liar), tenant="t")
        assert err.value.reason == "not_peft" and "not a readable archive" in str(err.value)
        assert sum(zip_reads) <= 1024
        assert len(pool.registry) == 0
        assert leftovers(tmp_path / "disk") == []


# -- loading -----------------------------------------------------------------------------


async def test_a_load_reads_no_more_than_the_registered_size(tmp_path: Path) -> None:
    dirs = make_adapters(tmp_path, 1)
    store = TieredStore(disk_dir=tmp_path / "disk", sources={"flaky": FlakySource()})
    async with AdapterPool(MockBackend(), store=store) as pool:
        info = await pool.register("t/a0", f"flaky://{dirs['t/a0']}", tenant="t")
        await store.unload("t/a0", tiers=("device", "host", "disk"))
        os.truncate(dirs["t/a0"] / WEIGHTS_FILE, 64 * MIB)  # the source now serves more
        with pytest.raises(LoadError) as err:
            await pool.complete("x", adapter="t/a0", tenant="t", params=ONE)
        assert err.value.tier == "source" and "too_large" in str(err.value)
        assert f"size registered for the adapter ({info.size_bytes} bytes)" in str(err.value)
        assert not store.on_disk("t/a0") and store.refs("t/a0") == 0
        assert leftovers(tmp_path / "disk") == []
