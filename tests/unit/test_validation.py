"""Adapter validation: a corpus of bad adapters, each refused with its reason code.

The readers' own tests are ``test_formats_*.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorapool.errors import AdapterValidationError
from lorapool.formats import SIDECAR_FILE, BaseModelSpec, ValidationLimits
from lorapool.types import Capabilities
from lorapool.validation import REASONS, is_norm_outlier, validate_adapter

# A tiny Llama-family base: hidden 8, 2 heads of 4, 1 kv head, intermediate 16, 2 layers.
BASE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "vocab_size": 32,
    "tie_word_embeddings": True,
}
SHAPES = {  # module: (in, out)
    "q_proj": (8, 8),
    "k_proj": (8, 4),
    "v_proj": (8, 4),
    "o_proj": (8, 8),
    "gate_proj": (8, 16),
    "up_proj": (8, 16),
    "down_proj": (16, 8),
}
PREFIX = "base_model.model.model.layers"
RANK = 2

Tensor = np.ndarray[Any, Any] | tuple[str, list[int], bytes]


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file: numpy arrays, or ``(dtype, shape, raw bytes)`` for other dtypes."""
    header: dict[str, object] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, t in tensors.items():
        if isinstance(t, tuple):
            dtype, shape, raw = t
        else:
            dtype = {"float32": "F32", "float16": "F16", "float64": "F64"}[str(t.dtype)]
            shape, raw = list(t.shape), t.astype(t.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def bf16(values: np.ndarray[Any, Any]) -> tuple[str, list[int], bytes]:
    """A BF16 tensor (numpy has no bfloat16): the high halves of float32s."""
    halves = (values.astype("<f4").view("<u4") >> 16).astype("<u2")
    return ("BF16", list(values.shape), halves.tobytes())


def lora_tensors(
    modules: tuple[str, ...] = ("q_proj", "v_proj"), layers: int = 2, r: int = RANK
) -> dict[str, Tensor]:
    rng = np.random.default_rng(0)
    out: dict[str, Tensor] = {}
    for layer in range(layers):
        for module in modules:
            fan_in, fan_out = SHAPES[module]
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"{PREFIX}.{layer}.{group}.{module}"
            out[f"{name}.lora_A.weight"] = rng.standard_normal((r, fan_in)).astype("float32")
            out[f"{name}.lora_B.weight"] = 0.1 * rng.standard_normal((fan_out, r)).astype("float32")
    return out


def write_adapter(
    d: Path,
    config: dict[str, object] | None = None,
    tensors: dict[str, Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, object] = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": "org/tiny-base",
    }
    cfg.update(config or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    data = safetensors_bytes(lora_tensors() if tensors is None else tensors, metadata)
    (d / "adapter_model.safetensors").write_bytes(data)
    return d


def write_base(d: Path, config: dict[str, Any] | None = None, tokenizer: str = "tok-v1") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {**BASE_CONFIG, **(config or {})}
    (d / "config.json").write_text(json.dumps(cfg))
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    weights: dict[str, Tensor] = {"model.embed_tokens.weight": np.zeros((v, h), "float32")}
    for layer in range(cfg["num_hidden_layers"]):
        weights[f"model.layers.{layer}.input_layernorm.weight"] = np.zeros(h, "float32")
        for module, (fan_in, fan_out) in SHAPES.items():
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"model.layers.{layer}.{group}.{module}.weight"
            weights[key] = np.zeros((fan_out, fan_in), "float32")
    (d / "model.safetensors").write_bytes(safetensors_bytes(weights))
    (d / "tokenizer.json").write_text(json.dumps({"model": tokenizer}))
    return d


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base(tmp_path_factory.mktemp("base") / "tiny-base")


@pytest.fixture(scope="module")
def base(base_dir: Path) -> BaseModelSpec:
    return BaseModelSpec.from_dir(base_dir)


CAPS = Capabilities(
    max_slots=4,
    max_rank=8,
    max_batch=4,
    base_model="tiny-base",
    target_modules=frozenset(SHAPES),
)


# -- the corpus ---------------------------------------------------------------------------

Case = Callable[[Path, BaseModelSpec], Path]


def _cfg(**changes: object) -> Case:
    return lambda tmp, base: write_adapter(tmp / "a", changes)


def _tensors(edit: Callable[[dict[str, Tensor]], None], **config: object) -> Case:
    def build(tmp: Path, base: BaseModelSpec) -> Path:
        tensors = lora_tensors()
        edit(tensors)
        return write_adapter(tmp / "a", config, tensors)

    return build


def _rename(old: str, new: str) -> Callable[[dict[str, Tensor]], None]:
    def edit(t: dict[str, Tensor]) -> None:
        t[new] = t.pop(old)

    return edit


def _set(name: str, value: Tensor) -> Callable[[dict[str, Tensor]], None]:
    def edit(t: dict[str, Tensor]) -> None:
        t[name] = value

    return edit


QA0 = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
QB0 = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
QM0 = f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector"
DORA_CAPS = dataclasses.replace(CAPS, dora=True)


def dora_tensors(modules: tuple[str, ...] = ("q_proj", "v_proj")) -> dict[str, Tensor]:
    """:func:`lora_tensors` with each module's DoRA magnitude, named as PEFT saves it."""
    out = lora_tensors(modules)
    for name in [n for n in out if n.endswith(".lora_B.weight")]:
        fan_out = out[name].shape[0]  # type: ignore[union-attr]
        magnitude = np.linspace(0.5, 1.5, fan_out, dtype="float32")
        out[name.replace(".lora_B.weight", ".lora_magnitude_vector")] = magnitude
    return out


def _dora(edit: Callable[[dict[str, Tensor]], None] = lambda t: None, **config: object) -> Case:
    """A DoRA adapter (``use_dora=true``, magnitudes included) after ``edit``."""

    def build(tmp: Path, base: BaseModelSpec) -> Path:
        tensors = dora_tensors()
        edit(tensors)
        return write_adapter(tmp / "a", {"use_dora": True, **config}, tensors)

    return build


def _pickle(tmp: Path, base: BaseModelSpec) -> Path:
    d = write_adapter(tmp / "a")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickle")
    return d


def _no_config(tmp: Path, base: BaseModelSpec) -> Path:
    d = write_adapter(tmp / "a")
    (d / "adapter_config.json").unlink()
    return d


def _config_text(text: str) -> Case:
    def build(tmp: Path, base: BaseModelSpec) -> Path:
        d = write_adapter(tmp / "a")
        (d / "adapter_config.json").write_text(text)
        return d

    return build


def _weights_bytes(edit: Callable[[bytes], bytes]) -> Case:
    def build(tmp: Path, base: BaseModelSpec) -> Path:
        d = write_adapter(tmp / "a")
        path = d / "adapter_model.safetensors"
        path.write_bytes(edit(path.read_bytes()))
        return d

    return build


def _raw_header(header: dict[str, object], data: bytes) -> Callable[[bytes], bytes]:
    encoded = json.dumps(header).encode()
    return lambda _: struct.pack("<Q", len(encoded)) + encoded + data


def _sidecar(**fields: str) -> Case:
    def build(tmp: Path, base: BaseModelSpec) -> Path:
        d = write_adapter(tmp / "a")
        (d / SIDECAR_FILE).write_text(json.dumps(fields))
        return d

    return build


def _metadata(**fields: str) -> Case:
    return lambda tmp, base: write_adapter(tmp / "a", metadata=fields)


def _symlinked_file(tmp: Path, base: BaseModelSpec) -> Path:
    d = write_adapter(tmp / "a")
    real = tmp / "elsewhere.safetensors"
    (d / "adapter_model.safetensors").rename(real)
    (d / "adapter_model.safetensors").symlink_to(real)
    return d


def _symlinked_dir(tmp: Path, base: BaseModelSpec) -> Path:
    d = write_adapter(tmp / "a")
    (tmp / "link").symlink_to(d, target_is_directory=True)
    return tmp / "link"


def _tar(extra: Callable[[tarfile.TarFile], None]) -> Case:
    def build(tmp: Path, base: BaseModelSpec) -> Path:
        d = write_adapter(tmp / "a")
        archive = tmp / "adapter.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(d, arcname="adapter")
            extra(tf)
        return archive

    return build


def _tar_file(name: str) -> Callable[[tarfile.TarFile], None]:
    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))

    return add


def _tar_symlink(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("adapter/README.md")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    tf.addfile(info)


def _zip_absolute(tmp: Path, base: BaseModelSpec) -> Path:
    d = write_adapter(tmp / "a")
    archive = tmp / "adapter.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in d.iterdir():
            zf.write(f, f.name)
        zf.writestr("/tmp/evil", b"x")
    return archive


def _too_many_tensors(tmp: Path, base: BaseModelSpec) -> Path:
    return write_adapter(tmp / "a", tensors=lora_tensors(modules=tuple(SHAPES)))


NAN = np.full((RANK, 8), np.nan, "float32")
INF = np.full((RANK, 8), np.inf, "float32")

CORPUS: dict[str, tuple[Case, set[str], dict[str, Any]]] = {
    # id: (builder, expected reasons exactly, extra validate_adapter kwargs)
    "pickle": (_pickle, {"pickle_weights"}, {}),
    "no-config": (_no_config, {"not_peft"}, {}),
    "config-not-json": (_config_text("{not json"), {"bad_config"}, {}),
    "config-list": (_config_text("[1, 2]"), {"bad_config"}, {}),
    "config-r-string": (_cfg(r="2"), {"bad_config"}, {}),
    "config-alpha-negative": (_cfg(lora_alpha=-1), {"bad_config"}, {}),
    "config-nan-alpha": (_config_text('{"r": 2, "lora_alpha": NaN}'), {"bad_config"}, {}),
    "config-duplicate-key": (
        _config_text('{"r": 2, "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}'),
        {"bad_config"},
        {},
    ),
    "ia3": (_cfg(peft_type="IA3"), {"unsupported_peft_type"}, {}),
    "dora-on-a-backend-without-dora": (_dora(), {"unsupported_dora"}, {"caps": CAPS}),
    "dora-without-magnitudes": (_cfg(use_dora=True), {"unpaired_magnitude"}, {}),
    "dora-magnitude-without-lora": (
        _dora(lambda t: (t.pop(QA0), t.pop(QB0))),
        {"unpaired_magnitude"},
        {},
    ),
    "magnitude-without-dora": (
        _tensors(_set(QM0, np.ones(8, "float32"))),
        {"magnitude_without_dora"},
        {},
    ),
    "dora-magnitude-length": (_dora(_set(QM0, np.ones(9, "float32"))), {"shape_mismatch"}, {}),
    "dora-magnitude-2d": (_dora(_set(QM0, np.ones((8, 1), "float32"))), {"shape_mismatch"}, {}),
    "dora-magnitude-two-names": (
        _dora(_set(f"{QM0}.weight", np.ones(8, "float32"))),
        {"ambiguous_tensor_names"},
        {},
    ),
    "dora-magnitude-other-adapter": (
        _dora(_rename(QM0, f"{QM0}.other.weight")),
        {"unknown_module", "unpaired_magnitude"},
        {},
    ),
    "dora-magnitude-nan": (_dora(_set(QM0, np.full(8, np.nan, "float32"))), {"non_finite"}, {}),
    "bias": (_cfg(bias="lora_only"), {"unsupported_bias"}, {}),
    "modules-to-save": (_cfg(modules_to_save=["lm_head"]), {"unsupported_modules_to_save"}, {}),
    "rank-pattern": (_cfg(rank_pattern={"q_proj": 4}), {"unsupported_option"}, {}),
    "rank-above-max": (
        _tensors(lambda t: t.update(lora_tensors(r=16)), r=16),
        {"unsupported_rank"},
        {"caps": CAPS},
    ),
    "target-not-in-backend": (
        lambda tmp, base: write_adapter(tmp / "a"),
        {"unsupported_target"},
        {"caps": Capabilities(1, 8, 1, "tiny-base", frozenset({"q_proj"}))},
    ),
    "unknown-module": (
        _tensors(_rename(QA0, f"{PREFIX}.0.self_attn.x_proj.lora_A.weight")),
        {"unknown_module", "unpaired_lora"},
        {},
    ),
    "not-a-lora-name": (
        _tensors(_set("lm_head.weight", np.zeros((4, 4), "float32"))),
        {"unknown_module"},
        {},
    ),
    "layer-out-of-range": (
        _tensors(
            lambda t: t.update(
                {
                    k.replace("layers.1.", "layers.7."): t.pop(k)
                    for k in [k for k in t if ".layers.1." in k]
                }
            )
        ),
        {"layer_out_of_range"},
        {},
    ),
    "shape-mismatch": (
        _tensors(_set(QA0, np.zeros((RANK, 9), "float32"))),
        {"shape_mismatch"},
        {},
    ),
    "rank-mismatch": (
        _tensors(
            lambda t: t.update({QA0: np.zeros((3, 8), "float32"), QB0: np.zeros((8, 3), "float32")})
        ),
        {"rank_mismatch"},
        {},
    ),
    "unpaired": (_tensors(lambda t: t.pop(QB0)), {"unpaired_lora"}, {}),
    "f64": (_tensors(_set(QA0, np.zeros((RANK, 8), "float64"))), {"bad_dtype"}, {}),
    "i32": (_tensors(_set(QA0, ("I32", [RANK, 8], b"\0" * 64))), {"bad_dtype"}, {}),
    "nan-f32": (_tensors(_set(QA0, NAN)), {"non_finite"}, {}),
    "inf-f16": (_tensors(_set(QA0, INF.astype("float16"))), {"non_finite"}, {}),
    "inf-bf16": (_tensors(_set(QA0, bf16(INF))), {"non_finite"}, {}),
    "norm-above-bound": (
        _tensors(_set(QA0, np.full((RANK, 8), 1e4, "float32"))),
        {"norm_anomaly"},
        {},
    ),
    "norm-outlier": (
        _tensors(_set(QB0, np.full((8, RANK), 100.0, "float32"))),
        {"norm_anomaly"},
        {"population_norms": [1.5 + 0.01 * i for i in range(10)]},
    ),
    "fingerprint-sidecar": (_sidecar(base_fingerprint="0" * 64), {"base_mismatch"}, {}),
    "fingerprint-metadata": (
        _metadata(**{"lorapool.base_fingerprint": "f" * 64}),
        {"base_mismatch"},
        {},
    ),
    "base-name": (_cfg(base_model_name_or_path="meta-llama/Llama-3-8B"), {"base_mismatch"}, {}),
    "tokenizer": (_sidecar(tokenizer_sha256="1" * 64), {"tokenizer_mismatch"}, {}),
    "too-many-bytes": (
        lambda tmp, base: write_adapter(tmp / "a"),
        {"too_large"},
        {"limits": ValidationLimits(max_total_bytes=100)},
    ),
    "header-too-large": (
        lambda tmp, base: write_adapter(tmp / "a"),
        {"too_large"},
        {"limits": ValidationLimits(max_header_bytes=64)},
    ),
    "too-many-tensors": (
        _too_many_tensors,
        {"too_large"},
        {"limits": ValidationLimits(max_tensors=10)},
    ),
    "symlinked-file": (_symlinked_file, {"symlink"}, {}),
    "symlinked-dir": (_symlinked_dir, {"symlink"}, {}),
    "tar-dotdot": (_tar(_tar_file("../evil")), {"unsafe_path"}, {}),
    "tar-absolute": (_tar(_tar_file("/etc/evil")), {"unsafe_path"}, {}),
    "tar-symlink": (_tar(_tar_symlink), {"symlink"}, {}),
    "zip-absolute": (_zip_absolute, {"unsafe_path"}, {}),
    "header-not-json": (
        _weights_bytes(lambda b: struct.pack("<Q", 5) + b"{oops"),
        {"bad_header"},
        {},
    ),
    "header-overlap": (
        _weights_bytes(
            _raw_header(
                {
                    QA0: {"dtype": "F32", "shape": [RANK, 8], "data_offsets": [0, 64]},
                    QB0: {"dtype": "F32", "shape": [8, RANK], "data_offsets": [32, 96]},
                },
                b"\0" * 96,
            )
        ),
        {"bad_header"},
        {},
    ),
    "header-wrong-span": (
        _weights_bytes(
            _raw_header({QA0: {"dtype": "F32", "shape": [RANK, 8], "data_offsets": [0, 60]}}, b"")
        ),
        {"bad_header"},
        {},
    ),
    "truncated-data": (_weights_bytes(lambda b: b[:-10]), {"truncated"}, {}),
    "truncated-header": (_weights_bytes(lambda b: b[:20]), {"truncated"}, {}),
    "empty-weights": (_weights_bytes(lambda b: b""), {"truncated"}, {}),
    # PEFT parity: what PEFT would not load as named is refused, never served differently
    "untargeted": (
        _tensors(
            lambda t: t.update(
                {
                    f"{PREFIX}.0.mlp.gate_proj.lora_A.weight": np.zeros((RANK, 8), "float32"),
                    f"{PREFIX}.0.mlp.gate_proj.lora_B.weight": np.zeros((16, RANK), "float32"),
                }
            )
        ),
        {"untargeted_tensors"},
        {},
    ),
    "excluded": (_cfg(exclude_modules=["v_proj"]), {"untargeted_tensors"}, {}),
    "outside-layers-to-transform": (_cfg(layers_to_transform=[0]), {"untargeted_tensors"}, {}),
    "ambiguous-names": (
        _tensors(_set(QA0.replace(".lora_A.", ".lora_A.default."), np.zeros((RANK, 8), "f4"))),
        {"ambiguous_tensor_names"},
        {},
    ),
    "missing-module": (
        _tensors(lambda t: [t.pop(f"{PREFIX}.1.self_attn.v_proj.lora_{s}.weight") for s in "AB"]),
        {"missing_tensors"},
        {},
    ),
    "all-linear-but-attention-only": (
        _cfg(target_modules="all-linear"),
        {"missing_tensors"},
        {},
    ),
    "no-peft-prefix": (
        _tensors(
            lambda t: t.update({k.removeprefix("base_model.model."): t.pop(k) for k in [QA0, QB0]})
        ),
        {"unknown_module"},
        {},
    ),
    "other-adapter-name": (
        _tensors(_rename(QA0, QA0.replace(".lora_A.", ".lora_A.other."))),
        {"unknown_module", "unpaired_lora"},
        {},
    ),
    "wrong-parent": (
        _tensors(lambda t: t.update({k.replace("self_attn", "mlp"): t.pop(k) for k in [QA0, QB0]})),
        {"unknown_module"},
        {},
    ),
    "target-regex": (_cfg(target_modules=r".*\.q_proj"), {"bad_config"}, {}),
    "pissa-init": (_cfg(init_lora_weights="pissa"), {"unsupported_option"}, {}),
    # combinations: every problem is reported, not just the first
    "dora-and-nan-and-unpaired": (
        _dora(lambda t: (t.pop(QB0), t.update({QA0: NAN}))),
        {"unsupported_dora", "unpaired_lora", "non_finite"},
        {"caps": CAPS},
    ),
    "pickle-and-shape": (
        lambda tmp, base: (
            _tensors(_set(QA0, np.zeros((RANK, 9), "float32")))(tmp, base),
            (tmp / "a" / "adapter_model.pt").write_bytes(b"x"),
        )[0],
        {"pickle_weights", "shape_mismatch"},
        {},
    ),
    "base-and-tokenizer": (
        _sidecar(base_fingerprint="0" * 64, tokenizer_sha256="1" * 64),
        {"base_mismatch", "tokenizer_mismatch"},
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_adapter_refused_with_its_reason(
    case: str, tmp_path: Path, base: BaseModelSpec
) -> None:
    build, reasons, kwargs = CORPUS[case]
    path = build(tmp_path, base)
    report = validate_adapter(path, base=base, **kwargs)
    assert not report.ok
    assert set(report.reasons) == reasons, [str(p) for p in report.problems]
    assert reasons <= set(REASONS)
    with pytest.raises(AdapterValidationError) as info:
        report.raise_if_refused()
    assert info.value.reason in reasons
    assert info.value.detail


def test_corpus_covers_every_reason() -> None:
    covered = set().union(*(reasons for _, reasons, _ in CORPUS.values()))
    assert covered == set(REASONS)


def test_good_adapter_accepted(tmp_path: Path, base: BaseModelSpec) -> None:
    d = write_adapter(tmp_path / "a", {"base_model_name_or_path": "/models/tiny-base"})
    (d / SIDECAR_FILE).write_text(
        json.dumps(
            {"base_fingerprint": base.fingerprint, "tokenizer_sha256": base.tokenizer_sha256}
        )
    )
    (d / "README.md").write_text("hello")
    population = [1.0 + 0.05 * i for i in range(10)]
    report = validate_adapter(d, base=base, caps=CAPS, population_norms=population)
    assert report.ok, [str(p) for p in report.problems]
    assert report.problems == [] and report.notes == []
    report.raise_if_refused()
    assert report.config is not None and report.config.r == RANK
    assert len(report.tensors) == 8 and len(report.norms) == 8
    assert report.norm is not None and 0 < report.norm < 10


@pytest.mark.parametrize(
    ("config", "modules", "layers"),
    [
        ({"target_modules": "all-linear"}, tuple(SHAPES), 2),
        ({"layers_to_transform": [1], "layers_pattern": "layers"}, ("q_proj", "v_proj"), 1),
        ({"exclude_modules": ["model.layers.0.self_attn.v_proj"]}, ("q_proj",), 2),
        ({"init_lora_weights": "gaussian"}, ("q_proj", "v_proj"), 2),
    ],
)
def test_peft_target_options_accepted(
    tmp_path: Path,
    base: BaseModelSpec,
    config: dict[str, object],
    modules: tuple[str, ...],
    layers: int,
) -> None:
    """An adapter holding exactly the modules PEFT wraps under these options is accepted."""
    tensors = lora_tensors(modules=modules, layers=2)
    if layers == 1:
        tensors = {k: v for k, v in tensors.items() if ".layers.1." in k}
    if "exclude_modules" in config:
        tensors.update({k: v for k, v in lora_tensors(("v_proj",)).items() if ".layers.1." in k})
    report = validate_adapter(write_adapter(tmp_path / "a", config, tensors), base=base)
    assert report.ok, [str(p) for p in report.problems]


@pytest.mark.parametrize("caps", [DORA_CAPS, None], ids=["dora-backend", "no-backend"])
@pytest.mark.parametrize("suffix", ["", ".weight", ".default.weight"])
def test_dora_adapter_accepted(
    tmp_path: Path, base: BaseModelSpec, caps: Capabilities | None, suffix: str
) -> None:
    """A DoRA adapter as PEFT saves it (and under the other names PEFT loads its
    magnitudes by) passes when the backend serves DoRA, or when no backend is given."""
    tensors = {
        (f"{k}{suffix}" if k.endswith("lora_magnitude_vector") else k): v
        for k, v in dora_tensors().items()
    }
    d = write_adapter(tmp_path / "a", {"use_dora": True}, tensors)
    report = validate_adapter(d, base=base, caps=caps)
    assert report.ok, [str(p) for p in report.problems]
    assert report.config is not None and report.config.use_dora
    assert report.targets is not None and report.targets.dora
    assert len(report.norms) == 12
    # the magnitudes do not count in the adapter's norm: it is the plain LoRA's
    plain = validate_adapter(write_adapter(tmp_path / "plain"), base=base, caps=caps)
    assert report.norm == plain.norm


def test_good_bf16_and_f16_adapter_accepted(tmp_path: Path, base: BaseModelSpec) -> None:
    tensors: dict[str, Tensor] = {
        k: (bf16(v) if "lora_A" in k else v.astype("float16"))
        for k, v in lora_tensors().items()
        if isinstance(v, np.ndarray)
    }
    assert validate_adapter(write_adapter(tmp_path / "a", tensors=tensors), base=base).ok


def test_without_base_checks_are_skipped_and_said(tmp_path: Path) -> None:
    tensors = lora_tensors()
    _rename(QA0, f"{PREFIX}.40.self_attn.q_proj.lora_A.weight")(tensors)
    report = validate_adapter(write_adapter(tmp_path / "a", tensors=tensors), base=None)
    assert set(report.reasons) == {"unpaired_lora"}  # layer 40 is not checked without a base
    assert any("no base model" in n for n in report.notes)


def test_force_accepts_norm_outlier_and_base_name_only(tmp_path: Path, base: BaseModelSpec) -> None:
    tensors = lora_tensors()
    tensors[QB0] = np.full((8, RANK), 100.0, "float32")
    d = write_adapter(tmp_path / "a", {"base_model_name_or_path": "other/model"}, tensors)
    population = [1.5] * 10
    report = validate_adapter(d, base=base, population_norms=population)
    assert set(report.reasons) == {"norm_anomaly", "base_mismatch"} and not report.ok
    forced = validate_adapter(d, base=base, population_norms=population, force=True)
    assert forced.ok and len(forced.notes) == 2
    (d / SIDECAR_FILE).write_text(json.dumps({"base_fingerprint": "0" * 64}))
    assert not validate_adapter(d, base=base, force=True).ok  # a wrong fingerprint is final


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_good_archives_accepted(tmp_path: Path, base: BaseModelSpec, kind: str) -> None:
    d = write_adapter(tmp_path / "a")
    archive = tmp_path / f"adapter.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in d.iterdir():
                zf.write(f, f"adapter/{f.name}")
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tf:
            tf.add(d, arcname=".")
    report = validate_adapter(archive, base=base)
    assert report.ok, [str(p) for p in report.problems]
    assert len(report.tensors) == 8


def test_zip_bomb_stops_at_the_cap(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * (4 << 20))
        zf.writestr("adapter_config.json", b"{}")
    report = validate_adapter(archive, limits=ValidationLimits(max_total_bytes=1 << 20))
    assert report.reasons == ["too_large"]


def test_is_norm_outlier() -> None:
    population = [1.0, 1.1, 0.9, 1.2, 0.95, 1.05, 1.0, 1.15]
    assert not is_norm_outlier(1.3, population, 8.0)
    assert is_norm_outlier(100.0, population, 8.0)
    assert is_norm_outlier(0.001, population, 8.0)
    assert is_norm_outlier(float("inf"), population, 8.0)


def test_base_model_spec_from_dir(tmp_path: Path, base: BaseModelSpec) -> None:
    assert dict(base.module_shapes) == SHAPES
    assert base.num_layers == 2 and base.name == "tiny-base"
    assert base.fingerprint and base.tokenizer_sha256
    same = BaseModelSpec.from_dir(write_base(tmp_path / "copy"))
    assert same.fingerprint == base.fingerprint and same.tokenizer_sha256 == base.tokenizer_sha256
    wider = BaseModelSpec.from_dir(write_base(tmp_path / "wider", {"vocab_size": 64}))
    assert wider.fingerprint != base.fingerprint
    retok = BaseModelSpec.from_dir(write_base(tmp_path / "retok", tokenizer="tok-v2"))
    assert retok.tokenizer_sha256 != base.tokenizer_sha256
    assert retok.fingerprint == base.fingerprint
    # without weights the shapes come from config.json
    (tmp_path / "copy" / "model.safetensors").unlink()
    assert dict(BaseModelSpec.from_dir(tmp_path / "copy").module_shapes) == SHAPES


def test_real_base_model_and_adapter(tmp_path: Path) -> None:
    """The real SmolLM2 base and a real PEFT adapter (skipped when not cached / no torch)."""
    pytest.importorskip("torch")
    from lorapool.cache import default_cache_dir

    model = default_cache_dir() / "models" / "SmolLM2-135M-Instruct"
    adapter = default_cache_dir() / "test-adapters" / "r8-attn"
    if not (model / "model.safetensors").is_file() or not adapter.is_dir():
        pytest.skip("the demo model and test adapters are not cached")
    spec = BaseModelSpec.from_dir(model)
    assert spec.num_layers == 30 and spec.module_shapes["k_proj"] == (576, 192)
    report = validate_adapter(adapter, base=spec)
    assert report.ok, [str(p) for p in report.problems]
    tiny = BaseModelSpec.from_dir(write_base(tmp_path / "tiny-base"))
    wrong = validate_adapter(adapter, base=tiny)
    assert {"layer_out_of_range", "shape_mismatch", "base_mismatch"} <= set(wrong.reasons)


# -- the CLI ------------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "lorapool", "validate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli(tmp_path: Path, base_dir: Path) -> None:
    good = write_adapter(tmp_path / "good")
    done = _cli(good, "--base", base_dir, "--max-rank", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ACCEPTED")

    tensors = lora_tensors()
    tensors[QA0] = np.zeros((RANK, 9), "float32")
    tensors.pop(QB0)
    bad = write_adapter(tmp_path / "bad", {"use_dora": True}, tensors)
    done = _cli(bad, "--base", base_dir)
    assert done.returncode == 1
    assert done.stdout.startswith("REFUSED")
    for reason in ("unpaired_magnitude", "shape_mismatch", "unpaired_lora"):
        assert f"[{reason}]" in done.stdout

    done = _cli(bad)
    assert done.returncode == 1 and "base-model checks" in done.stdout
    assert "[shape_mismatch]" not in done.stdout

    assert _cli(tmp_path / "missing").returncode == 2
    assert _cli(good, "--base", tmp_path / "no-model").returncode == 2
    assert _cli(good, "--max-rank", "zero").returncode == 2
    assert _cli().returncode == 2
