"""The base model described without loading its weights, and what an adapter declares of it.

:class:`BaseModelSpec` comes from a local Hugging Face checkpoint's
``config.json``, safetensors header(s) and tokenizer files. Its fingerprint is
sha256 over the architecture fields and every tensor name and shape; the
tokenizer hash is sha256 over the tokenizer files. An adapter declares the base
it was trained for in a ``lorapool.json`` sidecar (:func:`stamp_adapter` writes
it; :func:`read_sidecar` reads it) or in its safetensors ``__metadata__``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterValidationError
from ._json import load_json, load_strict
from .limits import CHECKPOINT_LIMITS, MIB, ValidationLimits, read_capped, read_config_file
from .peft import CONFIG_FILE
from .peft_targets import LLAMA_PARENTS
from .safetensors import read_safetensors_header_file

__all__ = [
    "SIDECAR_FILE",
    "BaseModelSpec",
    "base_fingerprint",
    "read_sidecar",
    "stamp_adapter",
    "tokenizer_hash",
]

SIDECAR_FILE = "lorapool.json"
"""Optional file next to the adapter declaring ``base_fingerprint`` and ``tokenizer_sha256``."""

_SIDECAR_FIELDS = ("base_fingerprint", "tokenizer_sha256")
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
                while chunk := f.read(MIB):
                    digest.update(chunk)
    return digest.hexdigest() if found else None


def _read_json(path: Path, cap: int) -> Any:
    data = read_capped(path, cap)
    if data is None:
        raise ValueError(f"{path} is above {cap} bytes")
    return load_json(data, str(path), "bad_config", strict=False)


def _weight_headers(model_dir: Path) -> dict[str, tuple[int, ...]]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        raw = _read_json(index, CHECKPOINT_LIMITS.max_header_bytes)
        files = sorted(set(raw.get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        if "/" in name or name.startswith("."):
            raise ValueError(f"weight file {name!r} in the index is not a plain file name")
        shapes.update(read_safetensors_header_file(model_dir / name, CHECKPOINT_LIMITS).shapes)
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
    module_parents: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_PARENTS))
    """``{module: the decoder-layer child holding it}`` (``q_proj``: ``self_attn``), from the
    checkpoint's tensor names; the Llama-family layout by default."""

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> BaseModelSpec:
        """Describe a local Hugging Face checkpoint from ``config.json``, its safetensors
        header(s) and tokenizer files; no weight is read.

        LoRA-able modules are the 2-D ``layers.N.self_attn.*``/``layers.N.mlp.*``
        weights of the checkpoint; without safetensors files they are derived
        from ``config.json`` (Llama-family layout). Raises ``OSError`` or
        ``ValueError`` (:class:`AdapterValidationError` for a bad safetensors
        header) when the checkpoint cannot be described.
        """
        path = Path(model_dir).expanduser()
        config = _read_json(path / "config.json", CHECKPOINT_LIMITS.max_config_bytes)
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'config.json'} is not a JSON object")
        shapes = _weight_headers(path)
        modules: dict[str, tuple[int, int]] = {}
        parents: dict[str, str] = {}
        layers: set[int] = set()
        for tensor, shape in shapes.items():
            m = _BASE_LINEAR.match(tensor)
            if m is None or len(shape) != 2:
                continue
            layers.add(int(m.group(1)))
            out_f, in_f = shape
            modules.setdefault(m.group(3), (in_f, out_f))
            parents.setdefault(m.group(3), m.group(2))
        if not modules:
            modules = _llama_shapes(config)
            parents = dict(LLAMA_PARENTS)
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
            module_parents=parents,
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


def read_sidecar(
    path: Path, max_bytes: int = ValidationLimits.max_config_bytes
) -> tuple[dict[str, str], list[AdapterValidationError]]:
    """What an adapter's :data:`SIDECAR_FILE` declares, and a problem per field of the wrong type.

    Returns ``{"base_fingerprint": ..., "tokenizer_sha256": ...}`` holding the
    fields that are strings, and a ``bad_config`` problem (returned, not
    raised) for each field that is present but not a string. Raises
    :class:`AdapterValidationError` (``too_large`` above ``max_bytes``,
    ``bad_config`` when it is not a JSON object) or ``OSError``.
    """
    data = read_config_file(path, max_bytes)
    side = load_strict(data, SIDECAR_FILE, "bad_config")
    if not isinstance(side, dict):
        raise AdapterValidationError("bad_config", f"{SIDECAR_FILE} is not a JSON object")
    declared: dict[str, str] = {}
    problems: list[AdapterValidationError] = []
    for key in _SIDECAR_FIELDS:
        value = side.get(key)
        if isinstance(value, str):
            declared[key] = value
        elif value is not None:
            problems.append(
                AdapterValidationError("bad_config", f"{SIDECAR_FILE}: {key} must be a string")
            )
    return declared, problems
