"""PEFT adapter directories and ``adapter_config.json``, read without torch: errors say what
is wrong."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorapool.errors import AdapterValidationError, NotAPeftAdapter, SourceNotFound
from lorapool.formats import (
    PICKLE_SUFFIXES,
    check_supported,
    inspect_adapter_dir,
    parse_adapter_config,
    read_safetensors_header,
)
from lorapool.types import Capabilities
from lorapool.validation import REASONS, validate_adapter

CAPS = Capabilities(
    max_slots=4,
    max_rank=16,
    max_batch=8,
    base_model="m",
    target_modules=frozenset({"q_proj", "v_proj"}),
)


def _safetensors(tensors: dict[str, list[int]]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def make_dir(
    tmp: Path, config: dict[str, object] | None = None, tensors: dict[str, list[int]] | None = None
) -> Path:
    d = tmp / "adapter"
    d.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    t = tensors or {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [4, 8],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [8, 4],
    }
    (d / "adapter_model.safetensors").write_bytes(_safetensors(t))
    return d


def test_reads_config_header_and_hash(tmp_path: Path) -> None:
    files = inspect_adapter_dir(make_dir(tmp_path))
    assert files.config.r == 4 and files.config.scaling == 2.0
    assert files.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 8)
    assert len(files.sha256) == 64
    data = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert read_safetensors_header(data) == files.tensors
    check_supported(files, CAPS)


def test_hash_changes_with_content(tmp_path: Path) -> None:
    d = make_dir(tmp_path)
    first = inspect_adapter_dir(d).sha256
    make_dir(tmp_path, {"lora_alpha": 16})
    assert inspect_adapter_dir(d).sha256 != first


def test_rslora_scaling() -> None:
    from lorapool.types import LoraConfig

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"], use_rslora=True)
    assert cfg.scaling == pytest.approx(32 / 4)


def test_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound):
        inspect_adapter_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceNotFound, match="not a directory"):
        inspect_adapter_dir(tmp_path / "file")


def test_not_peft(tmp_path: Path) -> None:
    with pytest.raises(NotAPeftAdapter, match=r"adapter_config\.json"):
        inspect_adapter_dir(tmp_path)
    d = make_dir(tmp_path)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(NotAPeftAdapter, match="not valid JSON"):
        inspect_adapter_dir(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(NotAPeftAdapter, match="r"):
        inspect_adapter_dir(d)


def test_pickle_weights_refused(tmp_path: Path) -> None:
    d = make_dir(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterValidationError) as info:
        inspect_adapter_dir(d)
    assert info.value.reason == "pickle_weights"


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_one_pickle_list(tmp_path: Path, suffix: str) -> None:
    """Inspection and validation refuse the same pickle weight files."""
    d = make_dir(tmp_path)
    (d / "adapter_model.safetensors").rename(d / f"adapter_model{suffix}")
    with pytest.raises(AdapterValidationError) as info:
        inspect_adapter_dir(d)
    assert info.value.reason == "pickle_weights"
    assert "pickle_weights" in validate_adapter(d).reasons


def test_header_reader_uses_the_strict_checks(tmp_path: Path) -> None:
    d = make_dir(tmp_path)
    data = (d / "adapter_model.safetensors").read_bytes()
    assert read_safetensors_header(data)[f"{PREFIX}.lora_A.weight"] == (4, 8)
    (d / "adapter_model.safetensors").write_bytes(data[:-4])
    with pytest.raises(AdapterValidationError) as info:
        inspect_adapter_dir(d)
    assert info.value.reason == "truncated"


def test_config_above_the_cap_is_not_read(tmp_path: Path) -> None:
    d = make_dir(tmp_path)
    (d / "adapter_config.json").write_text(" " * (1 << 20) + "{}")
    with pytest.raises(AdapterValidationError) as info:
        inspect_adapter_dir(d)
    assert info.value.reason == "too_large"


def test_other_peft_type_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterValidationError) as info:
        inspect_adapter_dir(make_dir(tmp_path, {"peft_type": "IA3"}))
    assert info.value.reason == "unsupported_peft_type"


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"r": 32}, "unsupported_rank"),
        ({"use_dora": True}, "unsupported_dora"),
        ({"bias": "all"}, "unsupported_bias"),
        ({"modules_to_save": ["lm_head"]}, "unsupported_modules_to_save"),
    ],
)
def test_unsupported_configs(tmp_path: Path, config: dict[str, object], reason: str) -> None:
    files = inspect_adapter_dir(make_dir(tmp_path, config))
    with pytest.raises(AdapterValidationError) as info:
        check_supported(files, CAPS)
    assert info.value.reason == reason


def test_dora_refused_only_by_a_backend_without_dora(tmp_path: Path) -> None:
    files = inspect_adapter_dir(
        make_dir(
            tmp_path,
            {"use_dora": True},
            {
                f"{PREFIX}.lora_A.weight": [4, 8],
                f"{PREFIX}.lora_B.weight": [8, 4],
                f"{PREFIX}.lora_magnitude_vector": [8],
            },
        )
    )
    assert files.config.use_dora
    with pytest.raises(AdapterValidationError, match="does not serve DoRA") as info:
        check_supported(files, CAPS)
    assert info.value.reason == "unsupported_dora"
    check_supported(files, dataclasses.replace(CAPS, dora=True))
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}
    assert parse_adapter_config(json.dumps(config)).use_dora


def test_unknown_target_module(tmp_path: Path) -> None:
    files = inspect_adapter_dir(
        make_dir(
            tmp_path,
            tensors={
                "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": [4, 8],
                "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": [8, 4],
            },
        )
    )
    with pytest.raises(AdapterValidationError, match="gate_proj") as info:
        check_supported(files, CAPS)
    assert info.value.reason == "unsupported_target"


# -- adapter_config.json properties ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
config_keys = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "target_modules",
        "use_rslora",
        "use_dora",
        "peft_type",
        "bias",
        "modules_to_save",
        "rank_pattern",
        "base_model_name_or_path",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_config_parser_bytes(data: bytes) -> None:
    with contextlib.suppress(AdapterValidationError):
        parse_adapter_config(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(config_keys | st.text(max_size=8), json_values, max_size=10) | json_values)
def test_config_parser_json(value: object) -> None:
    try:
        config = parse_adapter_config(json.dumps(value))
    except AdapterValidationError as exc:
        assert exc.reason in REASONS
    else:
        assert isinstance(value, dict) and config.r == value["r"]
