"""safetensors headers: read from the length prefix under one cap, checked strictly."""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorapool.errors import AdapterValidationError
from lorapool.formats import (
    MAX_HEADER_BYTES,
    BaseModelSpec,
    ValidationLimits,
    inspect_adapter_dir,
    read_safetensors_header,
    read_safetensors_header_bytes,
    read_safetensors_header_file,
)
from lorapool.validation import REASONS, validate_adapter

QA0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _raw(header: Mapping[str, object], data: bytes, declared: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    n = len(encoded) if declared is None else declared
    return struct.pack("<Q", n) + encoded + data


def test_header_reader_never_reads_the_data_section(tmp_path: Path) -> None:
    # A header claiming 1 TiB of data in a tiny file is refused from the header and stat alone.
    header = {QA0: {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, 1 << 40]}}
    path = tmp_path / "x.safetensors"
    path.write_bytes(_raw(header, b"\0" * 16))
    with pytest.raises(AdapterValidationError) as info:
        read_safetensors_header_file(path)
    assert info.value.reason == "truncated"
    # and a huge declared header length is refused before reading it
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(AdapterValidationError) as info:
        read_safetensors_header_file(path)
    assert info.value.reason == "too_large"


def test_one_header_cap_for_every_reader(tmp_path: Path) -> None:
    """A header declared one byte above the cap is refused by every reader, before reading it."""
    assert ValidationLimits().max_header_bytes == MAX_HEADER_BYTES == 16 << 20
    above = _raw({}, b"", declared=MAX_HEADER_BYTES + 1)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    (adapter / "adapter_model.safetensors").write_bytes(above)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    (base / "model.safetensors").write_bytes(above)
    readers: dict[str, Callable[[], object]] = {
        "bytes": lambda: read_safetensors_header_bytes(above, ValidationLimits()),
        "file": lambda: read_safetensors_header_file(adapter / "adapter_model.safetensors"),
        "shapes": lambda: read_safetensors_header(above),
        "shapes-file": lambda: read_safetensors_header(adapter / "adapter_model.safetensors"),
        "inspect": lambda: inspect_adapter_dir(adapter),
        "base-model": lambda: BaseModelSpec.from_dir(base),
    }
    for name, read in readers.items():
        with pytest.raises(AdapterValidationError) as info:
            read()
        assert info.value.reason == "too_large", name
    assert validate_adapter(adapter).reasons == ["too_large"]


# -- properties ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_header_reader_bytes(data: bytes) -> None:
    try:
        read_safetensors_header_bytes(data, ValidationLimits())
    except AdapterValidationError as exc:
        assert exc.reason in REASONS


tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "X"]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-2, 200), max_size=3) | json_values,
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.text(max_size=12), tensor_entries | json_values, max_size=4) | json_values,
    st.binary(max_size=200),
    st.integers(-4, 4),
)
def test_header_reader_file(header: object, data: bytes, skew: int) -> None:
    encoded = json.dumps(header).encode()
    blob = struct.pack("<Q", max(0, len(encoded) + skew)) + encoded + data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(blob)
        try:
            parsed = read_safetensors_header_file(path)
        except AdapterValidationError as exc:
            assert exc.reason in REASONS
        else:
            assert sum(t.nbytes for t in parsed.tensors.values()) == len(blob) - parsed.data_start
