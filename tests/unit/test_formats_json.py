"""JSON the readers parse: deep nesting and oversized config files are refused with typed
errors, cheaply (no ``RecursionError``, no reading a huge file into memory)."""

from __future__ import annotations

import contextlib
import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from lorapool.errors import AdapterValidationError
from lorapool.formats import (
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    SIDECAR_FILE,
    BaseModelSpec,
    ValidationLimits,
    inspect_adapter_dir,
    parse_adapter_config,
    read_config_file,
    read_safetensors_header_bytes,
    read_sidecar,
)
from lorapool.formats._json import json_depth, load_json
from lorapool.validation import validate_adapter

from .test_formats_peft import make_dir

DEEP = 100_000


def _deep(depth: int) -> bytes:
    return b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "a": ' + (
        b"[" * depth + b"]" * depth + b"}"
    )


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"1", 0),
        (b"[]", 1),
        (b'{"a": [[1], {"b": []}]}', 4),
        (b'{"a[[[[": "]]]{{\\"[[["}', 1),  # brackets in strings, an escaped quote
        (b'["\\\\", [["\\\\\\""]]]', 3),
        (_deep(DEEP), DEEP + 1),
    ],
)
def test_json_depth(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth
    if depth < 900:
        parsed = json.loads(raw)
        assert parsed is not None or raw == b"null"


def test_deep_json_is_refused_with_the_callers_reason() -> None:
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert load_json(ok, "x", "bad_config") is not None
    too_deep = b"[" + ok + b"]"
    with pytest.raises(AdapterValidationError) as info:
        load_json(too_deep, "x", "bad_config")
    assert info.value.reason == "bad_config" and "nests" in info.value.detail


def test_deep_config_refused_by_every_reader(tmp_path: Path) -> None:
    """A config nested 100,000 deep is a typed refusal everywhere, never RecursionError."""
    d = make_dir(tmp_path)
    (d / "adapter_config.json").write_bytes(_deep(DEEP))
    with pytest.raises(AdapterValidationError) as info:
        parse_adapter_config(_deep(DEEP))
    assert info.value.reason == "bad_config"
    with pytest.raises(AdapterValidationError) as info:
        inspect_adapter_dir(d)  # what registration runs first
    assert "nests" in info.value.detail
    assert validate_adapter(d).reasons == ["bad_config"]
    (d / SIDECAR_FILE).write_bytes(_deep(DEEP))
    with pytest.raises(AdapterValidationError) as info:
        read_sidecar(d / SIDECAR_FILE)
    assert info.value.reason == "bad_config"
    header = b'{"__metadata__": {"a": ' + b"[" * DEEP + b"]" * DEEP + b"}}"
    data = struct.pack("<Q", len(header)) + header
    with pytest.raises(AdapterValidationError) as info:
        read_safetensors_header_bytes(data, ValidationLimits())
    assert info.value.reason == "bad_header"
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_bytes(b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(AdapterValidationError):
        BaseModelSpec.from_dir(base)


def _sparse(path: Path, size: int) -> None:
    """``path`` holding a small valid config padded with zeros to ``size`` bytes (a sparse
    file: no memory or disk is spent on the zeros)."""
    with path.open("r+b") as f:
        f.truncate(size)


def _peak_bytes(read: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(AdapterValidationError):
            read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_config_one_byte_above_the_cap_is_refused_unread(tmp_path: Path) -> None:
    assert ValidationLimits().max_config_bytes == MAX_CONFIG_BYTES == 1 << 20
    d = make_dir(tmp_path)
    config = d / "adapter_config.json"
    text = config.read_bytes()
    config.write_bytes(text + b" " * (MAX_CONFIG_BYTES - len(text)))
    assert read_config_file(config) == config.read_bytes()  # exactly the cap: read
    inspect_adapter_dir(d)
    _sparse(config, MAX_CONFIG_BYTES + 1)
    with pytest.raises(AdapterValidationError) as info:
        read_config_file(config)
    assert info.value.reason == "too_large"
    assert f"{MAX_CONFIG_BYTES + 1} bytes" in info.value.detail
    assert str(MAX_CONFIG_BYTES) in info.value.detail


@pytest.mark.parametrize("reader", ["read_config_file", "inspect", "validate"])
def test_huge_config_is_not_read(tmp_path: Path, reader: str) -> None:
    """A 300 MB config (sparse) is refused from its size: nothing near its size is allocated."""
    d = make_dir(tmp_path)
    config = d / "adapter_config.json"
    _sparse(config, 300 << 20)
    readers: dict[str, Callable[[], object]] = {
        "read_config_file": lambda: read_config_file(config),
        "inspect": lambda: inspect_adapter_dir(d),
        "validate": lambda: validate_adapter(d),
    }
    opened: list[int] = []
    real_open = Path.open

    def counting_open(self: Path, *args: object, **kwargs: object) -> object:
        f = real_open(self, *args, **kwargs)  # type: ignore[call-overload]
        if self.name == "adapter_config.json":
            real_read = f.read

            def read(n: int = -1) -> bytes:
                data: bytes = real_read(n)
                opened.append(len(data))
                return data

            f.read = read
        return f

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "open", counting_open)
        peak = _peak_bytes(readers[reader])
    assert sum(opened) == 0, f"{reader} read {sum(opened)} bytes of the config"
    assert peak < 8 << 20, f"{reader} allocated {peak} bytes"
    if reader == "validate":
        assert validate_adapter(d).reasons == ["too_large"]
    elif reader == "inspect":
        with pytest.raises(AdapterValidationError) as info:
            inspect_adapter_dir(d)
        assert info.value.reason == "too_large"
