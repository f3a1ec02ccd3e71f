"""Validating an untrusted PEFT LoRA adapter before it is registered (issue 5).

Everything here reads files defensively and never imports torch:

* only ``adapter_model.safetensors`` is read; pickle files (``.bin``, ``.pt``)
  are refused and never opened;
* the safetensors header is read from its 8-byte length prefix and checked
  against the file's size (``stat``) without reading the data section;
* ``adapter_config.json`` is parsed strictly (types, PEFT options serving
  cannot honour);
* every tensor name must map to a LoRA-able linear of a layer the base model
  has, with the base layer's in/out features and the declared rank, A and B in
  pairs;
* the values are scanned one tensor at a time (numpy, optional) for NaN/Inf
  and for abnormal Frobenius norms;
* the base model's fingerprint and tokenizer hash are compared with what the
  adapter declares;
* sizes are capped and symlinks, absolute paths and ``..`` are refused, also
  in ``.tar``/``.tar.gz``/``.zip`` archives, which are extracted safely.

:func:`validate_adapter` collects every problem into a :class:`ValidationReport`
(the ``lorapool validate`` command prints them all); :meth:`ValidationReport.raise_if_refused`
raises the first refusal as :class:`AdapterValidationError` with a stable
``reason`` code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import statistics
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from pydantic import ValidationError

from .adapters import CONFIG_FILE, WEIGHTS_FILE
from .errors import AdapterValidationError
from .types import Capabilities, LoraConfig

__all__ = [
    "ALLOWED_DTYPES",
    "ARCHIVE_SUFFIXES",
    "REASONS",
    "SIDECAR_FILE",
    "BaseModelSpec",
    "Problem",
    "SafetensorsHeader",
    "TensorInfo",
    "ValidationLimits",
    "ValidationReport",
    "base_fingerprint",
    "check_archive_members",
    "check_member_name",
    "extract_archive",
    "is_norm_outlier",
    "parse_adapter_config",
    "parse_safetensors_header",
    "read_safetensors_header_bytes",
    "read_safetensors_header_file",
    "stamp_adapter",
    "tokenizer_hash",
    "validate_adapter",
]

SIDECAR_FILE = "lorapool.json"
"""Optional file next to the adapter declaring ``base_fingerprint`` and ``tokenizer_sha256``."""

ALLOWED_DTYPES = frozenset({"F32", "F16", "BF16"})
"""Tensor dtypes an adapter may use."""

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
"""Archive kinds :func:`validate_adapter` extracts (safely) before validating."""

REASONS: Mapping[str, str] = {
    "pickle_weights": "weights are a pickle file (.bin/.pt); only safetensors is loaded",
    "not_peft": "not a PEFT LoRA adapter directory",
    "bad_config": "adapter_config.json is malformed or has fields of the wrong type",
    "unsupported_peft_type": "peft_type is not LORA",
    "unsupported_dora": "DoRA (use_dora) is not supported",
    "unsupported_bias": "bias training is not supported",
    "unsupported_modules_to_save": "modules_to_save is not supported",
    "unsupported_option": "a PEFT option serving cannot honour (rank_pattern, fan_in_fan_out...)",
    "unsupported_rank": "rank is above the backend's max rank",
    "unsupported_target": "a target module is not LoRA-able in this backend",
    "unknown_module": "a tensor name does not map to a LoRA-able linear of the base model",
    "layer_out_of_range": "a tensor names a layer the base model does not have",
    "shape_mismatch": "a tensor's shape does not match the base layer's in/out features",
    "rank_mismatch": "a tensor's rank does not match the declared r",
    "unpaired_lora": "a lora_A has no lora_B (or the reverse)",
    "bad_dtype": "a tensor dtype other than F32/F16/BF16",
    "non_finite": "a tensor holds NaN or Inf",
    "norm_anomaly": "a tensor's norm is abnormally large or an outlier among registered adapters",
    "base_mismatch": "the adapter was trained for another base model",
    "tokenizer_mismatch": "the adapter was trained with another tokenizer",
    "too_large": "a size cap (bytes, header bytes, tensor count, archive) is exceeded",
    "unsafe_path": "an absolute path or '..' in a source or archive member",
    "symlink": "a symlinked adapter file, directory or archive member",
    "bad_header": "the safetensors header is malformed",
    "truncated": "the safetensors file is shorter than its header says",
}
"""Every reason code :func:`validate_adapter` can report, with what it means."""

_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_LORA_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+?)"
    r"\.lora_([AB])(?:\.\w+)?\.weight$"
)
_BASE_LINEAR = re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
_ARCH_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "rope_theta",
    "rope_parameters",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
_UNSUPPORTED_OPTIONS = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out=true (transposed weights)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias=true",
    "use_qalora": "QA-LoRA (use_qalora)",
    "trainable_token_indices": "trainable_token_indices",
}
_MIB = 1 << 20


@dataclass(frozen=True)
class ValidationLimits:
    """Caps and thresholds; the defaults fit adapters of models up to ~70B parameters."""

    max_total_bytes: int = 2 << 30
    """Config plus weights, and everything extracted from an archive."""
    max_header_bytes: int = 16 * _MIB
    max_config_bytes: int = 1 * _MIB
    max_tensors: int = 20_000
    max_archive_members: int = 64
    max_tensor_norm: float = 1e4
    """Absolute bound on any tensor's Frobenius norm."""
    outlier_mads: float = 8.0
    """An adapter whose log-norm is this many (scaled) MADs from the population's median is
    an outlier."""
    min_population: int = 8
    """The outlier test needs at least this many registered adapters' norms."""
    scan_values: bool = True
    """Read the tensors (one at a time) for NaN/Inf and norms; needs numpy."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an adapter: a stable ``reason`` code and what to fix."""

    reason: str
    detail: str
    forceable: bool = False
    """``force=True`` accepts the adapter despite this problem (norm and name checks)."""

    def __str__(self) -> str:
        return f"[{self.reason}] {self.detail}"

    def error(self) -> AdapterValidationError:
        """This problem as the exception registration raises."""
        return AdapterValidationError(self.reason, self.detail)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header (offsets relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, checked safetensors header."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    header_bytes: int

    @property
    def data_start(self) -> int:
        """File offset of the data section."""
        return 8 + self.header_bytes

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}``, as :func:`lorapool.adapters.read_safetensors_header` returns."""
        return {name: t.shape for name, t in self.tensors.items()}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _strict_json(raw: bytes, what: str, reason: str) -> Any:
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterValidationError(reason, f"{what} is not valid JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object, width: int = 40) -> str:
    """``repr`` of an untrusted value, bounded (huge ints cannot be printed in full)."""
    if isinstance(value, int) and abs(value) > 10**30:
        return "a very large integer"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_safetensors_header(
    raw: bytes, data_size: int, *, max_tensors: int = ValidationLimits.max_tensors
) -> SafetensorsHeader:
    """Check a safetensors header's JSON (without the 8-byte prefix) against the data size.

    ``data_size`` is the length of the data section (file size - 8 - header
    length). Every tensor must have a known dtype, a non-negative shape and
    ``data_offsets`` that match its size and tile the data section exactly.
    Raises :class:`AdapterValidationError` (``bad_header``, ``truncated``,
    ``too_large``) and nothing else.
    """
    if not raw.lstrip(b" ").startswith(b"{"):
        raise AdapterValidationError(
            "bad_header", "the safetensors header does not start with a JSON object"
        )
    header = _strict_json(raw, "the safetensors header", "bad_header")
    if not isinstance(header, dict):
        raise AdapterValidationError("bad_header", "the safetensors header is not a JSON object")
    metadata_raw = header.pop("__metadata__", {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(v, str) for v in metadata_raw.values()
    ):
        raise AdapterValidationError(
            "bad_header", "__metadata__ must be a JSON object of strings to strings"
        )
    if len(header) > max_tensors:
        raise AdapterValidationError(
            "too_large",
            f"the safetensors file holds {len(header)} tensors, more than the cap of {max_tensors}",
        )
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        tensors[name] = _tensor_info(name, meta)
    spans = sorted((t.begin, t.end, n) for n, t in tensors.items())
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise AdapterValidationError(
                "bad_header",
                f"tensor {name!r} starts at data offset {begin}, expected {position}: the "
                "tensors overlap or leave a hole",
            )
        position = end
    if position > data_size:
        raise AdapterValidationError(
            "truncated",
            f"the header describes {position} bytes of tensor data but the file has "
            f"{data_size}; the file is truncated, download or copy it again",
        )
    if position < data_size:
        raise AdapterValidationError(
            "bad_header",
            f"the file has {data_size - position} bytes after the last tensor; "
            "re-save it with safetensors",
        )
    return SafetensorsHeader(tensors=tensors, metadata=dict(metadata_raw), header_bytes=len(raw))


def _tensor_info(name: str, meta: object) -> TensorInfo:
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise AdapterValidationError(
            "bad_header", f"tensor {name[:200]!r}: entry must have dtype, shape and data_offsets"
        )
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise AdapterValidationError(
            "bad_header", f"tensor {name[:200]!r}: unknown dtype {_short(dtype)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape)
    ):
        raise AdapterValidationError(
            "bad_header", f"tensor {name[:200]!r}: shape must be a list of non-negative ints"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and 0 <= o < 1 << 62 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterValidationError(
            "bad_header", f"tensor {name[:200]!r}: data_offsets must be [begin, end], begin <= end"
        )
    size = math.prod(shape) * _DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != size:
        raise AdapterValidationError(
            "bad_header",
            f"tensor {name[:200]!r}: data_offsets span {offsets[1] - offsets[0]} bytes but a "
            f"{dtype} tensor of shape {shape} needs {size}",
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def read_safetensors_header_file(
    path: Path, limits: ValidationLimits | None = None
) -> SafetensorsHeader:
    """Read and check a safetensors file's header without reading its data section.

    Reads the 8-byte length, refuses a header above ``limits.max_header_bytes``
    or past the end of the file before reading it, and checks the tensor offsets
    against the file size from ``fstat``. Raises :class:`AdapterValidationError`
    (``truncated``, ``bad_header``, ``too_large``) or ``OSError``.
    """
    limits = limits or ValidationLimits()
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise AdapterValidationError(
                "truncated", f"{path.name} has {size} bytes, fewer than a safetensors header needs"
            )
        (n,) = struct.unpack("<Q", prefix)
        if n > limits.max_header_bytes:
            raise AdapterValidationError(
                "too_large",
                f"{path.name} declares a {n}-byte header, above the cap of "
                f"{limits.max_header_bytes} bytes",
            )
        if n < 2:
            raise AdapterValidationError("bad_header", f"{path.name} declares a {n}-byte header")
        if 8 + n > size:
            raise AdapterValidationError(
                "truncated",
                f"{path.name} declares a {n}-byte header but has only {size - 8} bytes after "
                "the length prefix; the file is truncated",
            )
        raw = f.read(n)
        if len(raw) != n:
            raise AdapterValidationError("truncated", f"{path.name} shrank while being read")
    return parse_safetensors_header(raw, size - 8 - n, max_tensors=limits.max_tensors)


def read_safetensors_header_bytes(data: bytes, limits: ValidationLimits) -> SafetensorsHeader:
    """:func:`read_safetensors_header_file` for a whole file held in memory (same errors)."""
    if len(data) < 8:
        raise AdapterValidationError("truncated", "fewer than 8 bytes: not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > limits.max_header_bytes:
        raise AdapterValidationError("too_large", f"a {n}-byte safetensors header is above the cap")
    if n < 2:
        raise AdapterValidationError("bad_header", f"a {n}-byte safetensors header")
    if 8 + n > len(data):
        raise AdapterValidationError("truncated", "the safetensors header runs past the end")
    return parse_safetensors_header(
        data[8 : 8 + n], len(data) - 8 - n, max_tensors=limits.max_tensors
    )


# -- config -------------------------------------------------------------------------------


def _config_problems(raw: object) -> tuple[LoraConfig | None, list[Problem]]:
    """Strict checks of a decoded ``adapter_config.json``; every problem found."""
    if not isinstance(raw, dict):
        return None, [Problem("bad_config", f"{CONFIG_FILE} is not a JSON object")]
    problems: list[Problem] = []
    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        problems.append(
            Problem(
                "unsupported_peft_type",
                f"peft_type {_short(peft_type, 60)} is not supported; only LORA adapters are",
            )
        )
    r = raw.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 65536):
        problems.append(
            Problem("bad_config", f"r must be an integer between 1 and 65536, got {_short(r)}")
        )
    alpha = raw.get("lora_alpha")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1e6):
        problems.append(
            Problem(
                "bad_config",
                f"lora_alpha must be a positive number up to 1e6, got {_short(alpha)}",
            )
        )
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear" and not targets.isidentifier():
            problems.append(
                Problem(
                    "bad_config",
                    f"target_modules is the pattern {targets[:60]!r}; list the module names "
                    '(e.g. ["q_proj", "v_proj"])',
                )
            )
        targets = [targets]
    elif (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        problems.append(
            Problem("bad_config", "target_modules must be a non-empty list of module names")
        )
        targets = None
    for key in ("use_rslora", "use_dora", "inference_mode"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], bool):
            problems.append(Problem("bad_config", f"{key} must be true or false"))
    if raw.get("use_dora") is True:
        problems.append(
            Problem(
                "unsupported_dora",
                "DoRA adapters (use_dora=true) are not supported; retrain with use_dora=false",
            )
        )
    bias = raw.get("bias", "none")
    if bias != "none":
        problems.append(
            Problem(
                "unsupported_bias",
                f"bias={_short(bias)} is not supported; train with bias='none'",
            )
        )
    mts = raw.get("modules_to_save")
    if mts not in (None, [], ()):
        problems.append(
            Problem(
                "unsupported_modules_to_save",
                f"modules_to_save={_short(mts, 80)} is not supported; a LoRA adapter must only "
                "add low-rank deltas (retrain without modules_to_save)",
            )
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(key) not in (None, False, {}, [], 0):
            problems.append(
                Problem("unsupported_option", f"{what} is not supported; retrain without it")
            )
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(Problem("bad_config", "base_model_name_or_path must be a string"))
    if problems:
        return None, problems
    try:
        config = LoraConfig.model_validate(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "target_modules": sorted(targets or ()),
                "use_rslora": bool(raw.get("use_rslora") or False),
                "base_model_name_or_path": base,
            }
        )
    except ValidationError as exc:  # pragma: no cover - the checks above are stricter
        return None, [Problem("bad_config", f"{CONFIG_FILE}: {exc.errors()[0]['msg']}")]
    return config, []


def parse_adapter_config(data: bytes | str) -> LoraConfig:
    """Parse ``adapter_config.json`` strictly; raise the first problem.

    Raises :class:`AdapterValidationError` (``bad_config``,
    ``unsupported_peft_type``, ``unsupported_dora``, ``unsupported_bias``,
    ``unsupported_modules_to_save``, ``unsupported_option``) and nothing else.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    config, problems = _config_problems(_strict_json(raw, CONFIG_FILE, "bad_config"))
    if problems or config is None:
        raise (problems[0] if problems else Problem("bad_config", "no config")).error()
    return config


# -- base model ---------------------------------------------------------------------------


def base_fingerprint(config: Mapping[str, Any], tensors: Mapping[str, Sequence[int]]) -> str:
    """sha256 of a base model's architecture fields and its tensor names and shapes."""
    arch = {k: config.get(k) for k in _ARCH_FIELDS}
    body = {"arch": arch, "tensors": sorted([n, list(s)] for n, s in tensors.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(model_dir: Path) -> str | None:
    """sha256 of the tokenizer files present in ``model_dir`` (``None`` when there are none)."""
    digest = hashlib.sha256()
    found = False
    for name in _TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(_MIB):
                    digest.update(chunk)
    return digest.hexdigest() if found else None


def _weight_headers(model_dir: Path) -> dict[str, tuple[int, ...]]:
    limits = ValidationLimits(max_header_bytes=256 * _MIB, max_tensors=1_000_000)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        raw = json.loads(index.read_text())
        files = sorted(set(raw.get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        if "/" in name or name.startswith("."):
            raise ValueError(f"weight file {name!r} in the index is not a plain file name")
        shapes.update(read_safetensors_header_file(model_dir / name, limits).shapes)
    return shapes


@dataclass(frozen=True)
class BaseModelSpec:
    """What validation needs to know about the base model, without loading its weights."""

    name: str
    module_shapes: Mapping[str, tuple[int, int]]
    """``{module: (in_features, out_features)}`` of the LoRA-able linears of a decoder layer."""
    num_layers: int
    fingerprint: str | None = None
    tokenizer_sha256: str | None = None
    aliases: frozenset[str] = frozenset()
    """Other names the base goes by (compared with ``base_model_name_or_path``)."""

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> BaseModelSpec:
        """Describe a local Hugging Face checkpoint from ``config.json``, its safetensors
        header(s) and tokenizer files; no weight is read.

        LoRA-able modules are the 2-D ``layers.N.self_attn.*``/``layers.N.mlp.*``
        weights of the checkpoint; without safetensors files they are derived
        from ``config.json`` (Llama-family layout).
        """
        path = Path(model_dir).expanduser()
        config = json.loads((path / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'config.json'} is not a JSON object")
        shapes = _weight_headers(path)
        modules: dict[str, tuple[int, int]] = {}
        layers: set[int] = set()
        for tensor, shape in shapes.items():
            m = _BASE_LINEAR.match(tensor)
            if m is None or len(shape) != 2:
                continue
            layers.add(int(m.group(1)))
            out_f, in_f = shape
            modules.setdefault(m.group(3), (in_f, out_f))
        if not modules:
            modules = _llama_shapes(config)
        num_layers = int(config.get("num_hidden_layers") or (max(layers) + 1 if layers else 0))
        aliases = {path.name}
        for key in ("_name_or_path", "_model_name_or_path"):
            if isinstance(config.get(key), str) and config[key]:
                aliases.add(config[key])
        return cls(
            name=path.name,
            module_shapes=modules,
            num_layers=num_layers,
            fingerprint=base_fingerprint(config, shapes),
            tokenizer_sha256=tokenizer_hash(path),
            aliases=frozenset(aliases),
        )


def _llama_shapes(raw: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    h = int(raw["hidden_size"])
    i = int(raw["intermediate_size"])
    heads = int(raw["num_attention_heads"])
    kv = int(raw.get("num_key_value_heads") or heads)
    hd = int(raw.get("head_dim") or h // heads)
    return {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _name_key(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def stamp_adapter(adapter_dir: str | Path, base: BaseModelSpec) -> Path:
    """Declare ``base`` as the adapter's base model: write :data:`SIDECAR_FILE` next to it.

    Run it where the adapter is trained (or in an onboarding pipeline) so that
    registration refuses the adapter on any other base model or tokenizer,
    even one with the same module names and shapes. Returns the file written.
    """
    d = Path(adapter_dir).expanduser()
    if not (d / CONFIG_FILE).is_file():
        raise AdapterValidationError("not_peft", f"{d} holds no {CONFIG_FILE}; nothing to stamp")
    if base.fingerprint is None:
        raise ValueError(f"the base model {base.name!r} has no fingerprint to stamp")
    body = {"base_model": base.name, "base_fingerprint": base.fingerprint}
    if base.tokenizer_sha256 is not None:
        body["tokenizer_sha256"] = base.tokenizer_sha256
    target = d / SIDECAR_FILE
    target.write_text(json.dumps(body, indent=2) + "\n")
    return target


# -- paths and archives -------------------------------------------------------------------


def check_member_name(name: str) -> None:
    """Refuse an archive member (or relative source) name that could escape its directory."""
    if not name or "\0" in name or "\\" in name:
        raise AdapterValidationError("unsafe_path", f"member name {name[:200]!r} is not allowed")
    pure = PurePosixPath(name)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise AdapterValidationError(
            "unsafe_path", f"member {name[:200]!r} is an absolute path; archives must be relative"
        )
    if ".." in pure.parts:
        raise AdapterValidationError(
            "unsafe_path",
            f"member {name[:200]!r} contains '..'; archives must not leave their root",
        )


def check_archive_members(names: Iterable[str], *, max_members: int | None = None) -> None:
    """Refuse a list of archive member names with any unsafe one, duplicates, or too many."""
    cap = ValidationLimits.max_archive_members if max_members is None else max_members
    seen: set[str] = set()
    for count, name in enumerate(names, 1):
        if count > cap:
            raise AdapterValidationError(
                "too_large", f"the archive has more than {cap} members; an adapter needs two"
            )
        check_member_name(name)
        key = str(PurePosixPath(name))
        if key in seen:
            raise AdapterValidationError("unsafe_path", f"member {name[:200]!r} appears twice")
        seen.add(key)


def _copy_capped(src: IO[bytes], dest: Path, budget: int, name: str) -> int:
    written = 0
    with dest.open("xb") as out:
        while chunk := src.read(_MIB):
            written += len(chunk)
            if written > budget:
                raise AdapterValidationError(
                    "too_large", f"archive member {name!r} takes the archive above its size cap"
                )
            out.write(chunk)
    return written


def extract_archive(archive: Path, dest: Path, limits: ValidationLimits | None = None) -> Path:
    """Extract a ``.tar``/``.tar.gz``/``.zip`` adapter archive into ``dest`` safely.

    Member names are checked with :func:`check_archive_members`; links,
    devices and other special members are refused; the extracted bytes are
    counted against ``limits.max_total_bytes`` as they are written (a
    compressed bomb stops at the cap). Returns the directory that holds
    ``adapter_config.json`` (the root or its single top-level folder).
    """
    limits = limits or ValidationLimits()
    budget = limits.max_total_bytes
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            check_archive_members(
                [i.filename for i in infos], max_members=limits.max_archive_members
            )
            for info in infos:
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise AdapterValidationError(
                        "symlink", f"archive member {info.filename!r} is a symlink"
                    )
                target = dest / info.filename
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src:
                    budget -= _copy_capped(src, target, budget, info.filename)
    else:
        with tarfile.open(archive, "r:*") as tf:
            members = []
            for count, member in enumerate(tf, 1):
                if count > limits.max_archive_members:
                    raise AdapterValidationError(
                        "too_large",
                        f"the archive has more than {limits.max_archive_members} members",
                    )
                members.append(member)
            check_archive_members([m.name for m in members], max_members=limits.max_archive_members)
            for member in members:
                if member.issym() or member.islnk():
                    raise AdapterValidationError(
                        "symlink", f"archive member {member.name!r} is a link"
                    )
                target = dest / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise AdapterValidationError(
                        "unsafe_path", f"archive member {member.name!r} is not a regular file"
                    )
                if member.size > budget:
                    raise AdapterValidationError(
                        "too_large", f"archive member {member.name!r} is above the size cap"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tf.extractfile(member)
                if data is None:  # pragma: no cover - isfile() members always have data
                    continue
                with data:
                    budget -= _copy_capped(data, target, budget, member.name)
    roots = sorted(p.parent for p in dest.rglob(CONFIG_FILE))
    if len(roots) != 1:
        raise AdapterValidationError(
            "not_peft",
            f"the archive holds {len(roots)} {CONFIG_FILE} files; it must hold exactly one adapter",
        )
    return roots[0]


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


# -- values -------------------------------------------------------------------------------


def _tensor_values(f: BinaryIO, header: SafetensorsHeader, info: TensorInfo) -> Iterator[Any]:
    """The tensor's values as float arrays, in chunks of about 4 MiB."""
    import numpy as np

    item = _DTYPE_SIZES[info.dtype]
    step = max(item, (4 * _MIB) // item * item)
    f.seek(header.data_start + info.begin)
    left = info.nbytes
    while left > 0:
        chunk = f.read(min(step, left))
        if not chunk:
            raise AdapterValidationError("truncated", "the file shrank while being read")
        left -= len(chunk)
        if info.dtype == "BF16":
            yield (np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif info.dtype == "F16":
            yield np.frombuffer(chunk, dtype="<f2")
        else:
            yield np.frombuffer(chunk, dtype="<f4")


def _scan_tensor(f: BinaryIO, header: SafetensorsHeader, info: TensorInfo) -> tuple[bool, float]:
    """``(all finite, Frobenius norm)`` of one tensor, reading only its bytes."""
    import numpy as np

    finite = True
    total = 0.0
    for values in _tensor_values(f, header, info):
        as64 = values.astype(np.float64)
        if not bool(np.isfinite(as64).all()):
            finite = False
            as64 = as64[np.isfinite(as64)]
        total += float(np.dot(as64, as64))
    return finite, math.sqrt(total)


def is_norm_outlier(value: float, population: Sequence[float], k: float) -> bool:
    """Whether ``value`` is more than ``k`` scaled MADs from the median, in log space.

    The MAD is scaled by 1.4826 (a standard deviation for normal data) and
    floored at 0.05 decades so a population of near-identical norms does not
    flag every small difference.
    """
    logs = [math.log10(p) for p in population if p > 0 and math.isfinite(p)]
    if not logs or value <= 0 or not math.isfinite(value):
        return not math.isfinite(value)
    med = statistics.median(logs)
    mad = statistics.median(abs(x - med) for x in logs) * 1.4826
    return abs(math.log10(value) - med) > k * max(mad, 0.05)


# -- the report ---------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """Everything :func:`validate_adapter` found about one adapter."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    config: LoraConfig | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    """Per-tensor Frobenius norms (empty when values were not scanned)."""
    notes: list[str] = field(default_factory=list)
    """Checks that were skipped, and problems accepted with ``force``."""
    forced: bool = False
    size_bytes: int = 0

    @property
    def norm(self) -> float | None:
        """The adapter's norm for the outlier test: the RMS of its per-tensor norms."""
        if not self.norms:
            return None
        values = list(self.norms.values())
        return math.sqrt(sum(v * v for v in values) / len(values))

    @property
    def refusals(self) -> list[Problem]:
        """Problems that refuse the adapter (all but the forceable ones under ``force``)."""
        return [p for p in self.problems if not (self.forced and p.forceable)]

    @property
    def ok(self) -> bool:
        """Whether the adapter is accepted."""
        return not self.refusals

    @property
    def reasons(self) -> list[str]:
        """The reason codes of every problem found, in order, without repeats."""
        return list(dict.fromkeys(p.reason for p in self.problems))

    def raise_if_refused(self) -> None:
        """Raise the first refusal as :class:`AdapterValidationError`."""
        if self.refusals:
            raise self.refusals[0].error()

    def add(self, reason: str, detail: str, *, forceable: bool = False) -> None:
        """Record a problem."""
        self.problems.append(Problem(reason, detail, forceable))


def validate_adapter(
    path: str | Path,
    *,
    base: BaseModelSpec | None = None,
    caps: Capabilities | None = None,
    limits: ValidationLimits | None = None,
    force: bool = False,
    population_norms: Sequence[float] = (),
) -> ValidationReport:
    """Check an adapter directory (or ``.tar``/``.tar.gz``/``.zip`` archive); report every problem.

    ``base`` enables the module/layer/shape, fingerprint and tokenizer checks
    (without it only the adapter's internal consistency is checked, and a note
    says so). ``caps`` adds the backend's max rank and LoRA-able modules.
    ``population_norms`` are the :attr:`ValidationReport.norm` of adapters
    already registered, for the outlier test. ``force`` accepts norm anomalies
    and base-name mismatches (never unsafe files). Raises only
    :class:`lorapool.errors.SourceNotFound` when ``path`` does not exist;
    everything else is a :class:`Problem` in the report.
    """
    from .errors import SourceNotFound

    limits = limits or ValidationLimits()
    source = Path(path).expanduser()
    report = ValidationReport(path=source, forced=force)
    if source.is_symlink():
        report.add(
            "symlink", f"{source} is a symlink; pass the real directory (symlinks are refused)"
        )
        return report
    if not source.exists():
        raise SourceNotFound(str(source))
    if _is_archive(source):
        with tempfile.TemporaryDirectory(prefix="lorapool-validate-") as tmp:
            try:
                root = extract_archive(source, Path(tmp), limits)
            except AdapterValidationError as exc:
                report.add(exc.reason, exc.detail)
                return report
            except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
                report.add("not_peft", f"{source.name} is not a readable archive: {exc}")
                return report
            _validate_dir(root, report, base, caps, limits, population_norms)
        return report
    if not source.is_dir():
        report.add(
            "not_peft",
            f"{source} is a file; pass the adapter directory or a .tar/.tar.gz/.zip archive",
        )
        return report
    _validate_dir(source, report, base, caps, limits, population_norms)
    return report


def _validate_dir(
    d: Path,
    report: ValidationReport,
    base: BaseModelSpec | None,
    caps: Capabilities | None,
    limits: ValidationLimits,
    population: Sequence[float],
) -> None:
    for entry in sorted(d.iterdir()):
        if entry.name.lower().endswith(_PICKLE_SUFFIXES):
            report.add(
                "pickle_weights",
                f"{entry.name} is a pickle file, which lorapool never loads; re-save the adapter "
                "with safetensors (save_pretrained(..., safe_serialization=True)) and remove it",
            )
    config_path, weights_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    usable = True
    for p in (config_path, weights_path, d / SIDECAR_FILE):
        if p.is_symlink():
            report.add("symlink", f"{p.name} is a symlink; copy the real file into the adapter")
            usable = False
        elif p.name != SIDECAR_FILE and not p.is_file():
            report.add("not_peft", f"no {p.name} in {d}; save the adapter with save_pretrained")
            usable = False
    if not usable:
        return
    size = config_path.stat().st_size + weights_path.stat().st_size
    report.size_bytes = size
    if size > limits.max_total_bytes:
        report.add(
            "too_large", f"the adapter has {size} bytes, above the cap of {limits.max_total_bytes}"
        )
        return
    if config_path.stat().st_size > limits.max_config_bytes:
        report.add("too_large", f"{CONFIG_FILE} is above {limits.max_config_bytes} bytes")
    else:
        try:
            raw = _strict_json(config_path.read_bytes(), CONFIG_FILE, "bad_config")
            report.config, problems = _config_problems(raw)
            report.problems.extend(problems)
        except AdapterValidationError as exc:
            report.add(exc.reason, exc.detail)
    try:
        header = read_safetensors_header_file(weights_path, limits)
    except AdapterValidationError as exc:
        report.add(exc.reason, exc.detail)
        return
    report.tensors = dict(header.tensors)
    _check_tensors(header, report, base, caps)
    _check_base(d, header, report, base)
    if limits.scan_values:
        _check_values(weights_path, header, report, limits, population)
    else:
        report.notes.append("values not scanned (scan_values=False): no NaN/Inf or norm checks")
    if report.forced:
        for problem in report.problems:
            if problem.forceable:
                report.notes.append(f"accepted with --force: {problem}")


def _check_tensors(
    header: SafetensorsHeader,
    report: ValidationReport,
    base: BaseModelSpec | None,
    caps: Capabilities | None,
) -> None:
    cfg = report.config
    r = cfg.r if cfg is not None else None
    if caps is not None and r is not None and r > caps.max_rank:
        report.add(
            "unsupported_rank",
            f"rank {r} is above the backend's max_rank {caps.max_rank}; raise max_rank or "
            "retrain with a smaller r",
        )
    if not header.tensors:
        report.add("not_peft", f"{WEIGHTS_FILE} holds no tensors")
        return
    seen: dict[tuple[int, str], set[str]] = {}
    bad_dtypes: set[str] = set()
    for name, info in header.tensors.items():
        if info.dtype not in ALLOWED_DTYPES:
            bad_dtypes.add(info.dtype)
        m = _LORA_NAME.match(name)
        if m is None:
            report.add(
                "unknown_module",
                f"tensor {name[:200]!r} is not a lora_A/lora_B weight of a decoder layer's "
                "self_attn or mlp linear",
            )
            continue
        layer, module, side = int(m.group(1)), m.group(3), m.group(4)
        seen.setdefault((layer, module), set()).add(side)
        if len(info.shape) != 2:
            report.add("shape_mismatch", f"tensor {name!r} has shape {info.shape}; LoRA is 2-D")
            continue
        rank_dim = info.shape[0] if side == "A" else info.shape[1]
        if r is not None and rank_dim != r:
            report.add(
                "rank_mismatch",
                f"tensor {name!r} has rank {rank_dim} but adapter_config.json says r={r}",
            )
        if base is None:
            continue
        if module not in base.module_shapes:
            report.add(
                "unknown_module",
                f"tensor {name!r} targets {module!r}, not a LoRA-able linear of "
                f"{base.name}; it has {sorted(base.module_shapes)}",
            )
            continue
        if layer >= base.num_layers:
            report.add(
                "layer_out_of_range",
                f"tensor {name!r} names layer {layer}; {base.name} has {base.num_layers} "
                "layers: the adapter was trained for another base model",
            )
        fan_in, fan_out = base.module_shapes[module]
        other = info.shape[1] if side == "A" else info.shape[0]
        want = fan_in if side == "A" else fan_out
        if other != want:
            report.add(
                "shape_mismatch",
                f"tensor {name!r} has shape {info.shape}; {module} of {base.name} has "
                f"{'in' if side == 'A' else 'out'}_features={want}",
            )
    if bad_dtypes:
        report.add(
            "bad_dtype",
            f"tensor dtypes {sorted(bad_dtypes)} are not allowed; save the adapter in "
            f"{sorted(ALLOWED_DTYPES)}",
        )
    for (layer, module), sides in sorted(seen.items()):
        if sides != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            report.add(
                "unpaired_lora", f"layer {layer} {module} has no {missing}; A and B come in pairs"
            )
    modules = {module for _, module in seen}
    if caps is not None and caps.target_modules:
        unsupported = sorted(modules - caps.target_modules)
        if unsupported:
            report.add(
                "unsupported_target",
                f"target modules {unsupported} are not LoRA-able in this backend; supported: "
                f"{sorted(caps.target_modules)}",
            )
    if base is None:
        report.notes.append("no base model given: module, layer and shape checks skipped")


def _check_base(
    d: Path, header: SafetensorsHeader, report: ValidationReport, base: BaseModelSpec | None
) -> None:
    declared_fp = header.metadata.get("lorapool.base_fingerprint")
    declared_tok = header.metadata.get("lorapool.tokenizer_sha256")
    sidecar = d / SIDECAR_FILE
    if sidecar.is_file():
        if sidecar.stat().st_size > ValidationLimits.max_config_bytes:
            report.add("too_large", f"{SIDECAR_FILE} is too large")
            return
        try:
            side = _strict_json(sidecar.read_bytes(), SIDECAR_FILE, "bad_config")
        except AdapterValidationError as exc:
            report.add(exc.reason, exc.detail)
            return
        if not isinstance(side, dict):
            report.add("bad_config", f"{SIDECAR_FILE} is not a JSON object")
            return
        fp, tok = side.get("base_fingerprint"), side.get("tokenizer_sha256")
        if fp is not None and not isinstance(fp, str):
            report.add("bad_config", f"{SIDECAR_FILE}: base_fingerprint must be a string")
        if tok is not None and not isinstance(tok, str):
            report.add("bad_config", f"{SIDECAR_FILE}: tokenizer_sha256 must be a string")
        declared_fp = fp if isinstance(fp, str) else declared_fp
        declared_tok = tok if isinstance(tok, str) else declared_tok
    if base is None:
        if declared_fp or declared_tok:
            report.notes.append("no base model given: fingerprint and tokenizer checks skipped")
        return
    if declared_fp and base.fingerprint and declared_fp != base.fingerprint:
        report.add(
            "base_mismatch",
            f"the adapter declares base fingerprint {declared_fp[:16]}..., {base.name} has "
            f"{base.fingerprint[:16]}...: it was trained for another base model",
        )
    if declared_tok and base.tokenizer_sha256 and declared_tok != base.tokenizer_sha256:
        report.add(
            "tokenizer_mismatch",
            f"the adapter declares tokenizer {declared_tok[:16]}..., {base.name} has "
            f"{base.tokenizer_sha256[:16]}...: it was trained with another tokenizer",
        )
    declared_name = report.config.base_model_name_or_path if report.config else None
    if declared_name and not declared_fp:
        names = {_name_key(n) for n in (base.name, *base.aliases)}
        if _name_key(declared_name) not in names:
            report.add(
                "base_mismatch",
                f"base_model_name_or_path is {declared_name!r} but the base model is "
                f"{base.name!r}; use an adapter trained for it, or --force/force=True if it "
                "is the same model under another name",
                forceable=True,
            )


def _check_values(
    weights: Path,
    header: SafetensorsHeader,
    report: ValidationReport,
    limits: ValidationLimits,
    population: Sequence[float],
) -> None:
    try:
        import numpy  # noqa: F401
    except ImportError:
        report.notes.append("numpy is not installed: NaN/Inf and norm checks skipped")
        return
    non_finite: list[str] = []
    with weights.open("rb") as f:
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
            if info.dtype not in ALLOWED_DTYPES:
                continue
            try:
                finite, norm = _scan_tensor(f, header, info)
            except AdapterValidationError as exc:
                report.add(exc.reason, exc.detail)
                return
            if not finite:
                non_finite.append(name)
            report.norms[name] = norm
            if norm > limits.max_tensor_norm:
                report.add(
                    "norm_anomaly",
                    f"tensor {name!r} has Frobenius norm {norm:.3g}, above the bound "
                    f"{limits.max_tensor_norm:.3g}; check the training run",
                    forceable=True,
                )
    if non_finite:
        report.add(
            "non_finite",
            f"{len(non_finite)} tensors hold NaN or Inf (first: {non_finite[0]!r}); the "
            "training diverged, use an earlier checkpoint",
        )
    overall = report.norm
    if overall is not None and len(population) >= limits.min_population:
        if is_norm_outlier(overall, population, limits.outlier_mads):
            med = statistics.median(population)
            report.add(
                "norm_anomaly",
                f"the adapter's norm {overall:.3g} is an outlier among registered adapters "
                f"(median {med:.3g}); check it, or register it with force=True",
                forceable=True,
            )
    elif population:
        report.notes.append(
            f"outlier test skipped: {len(population)} registered norms, "
            f"{limits.min_population} needed"
        )
