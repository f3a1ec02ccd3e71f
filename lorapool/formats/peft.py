"""A PEFT LoRA adapter directory: its file names, inspecting it, and its digests.

A PEFT adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. :func:`inspect_adapter_dir` parses the config
well enough for serving, reads the safetensors header (tensor names and shapes)
and hashes the files so every later load can be verified; it never imports torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..errors import AdapterValidationError, NotAPeftAdapter, SourceNotFound
from ..types import Capabilities, LoraConfig
from ._json import load_json
from .limits import MIB, PICKLE_SUFFIXES, ValidationLimits, read_config_file
from .safetensors import read_safetensors_header

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterFiles",
    "adapter_digest",
    "check_supported",
    "inspect_adapter_dir",
    "sha256_of_files",
    "unsupported_dora",
]

CONFIG_FILE = "adapter_config.json"
"""The adapter's PEFT configuration."""
WEIGHTS_FILE = "adapter_model.safetensors"
"""The adapter's weights; the only weight file lorapool reads."""
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
"""The files that make an adapter, in the order its digest covers them."""


@dataclass(frozen=True)
class AdapterFiles:
    """A verified-readable adapter directory."""

    path: Path
    config: LoraConfig
    tensors: dict[str, tuple[int, ...]]
    sha256: str
    size_bytes: int


def adapter_digest(files: dict[str, bytes]) -> str:
    """sha256 over an adapter's files in the given order, each prefixed by its name."""
    digest = hashlib.sha256()
    for name, data in files.items():
        digest.update(name.encode() + b"\0")
        digest.update(data)
    return digest.hexdigest()


def sha256_of_files(directory: Path, names: tuple[str, ...] = ADAPTER_FILES) -> str:
    """The :func:`adapter_digest` of the named files of an adapter directory, read in chunks."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with (directory / name).open("rb") as f:
            while chunk := f.read(MIB):
                digest.update(chunk)
    return digest.hexdigest()


def inspect_adapter_dir(source: str | Path, *, label: str | None = None) -> AdapterFiles:
    """Check that ``source`` is a PEFT LoRA adapter directory and describe it.

    Raises :class:`SourceNotFound` when the directory is missing and
    :class:`NotAPeftAdapter` (or another :class:`AdapterValidationError`)
    when it does not hold a usable LoRA adapter. ``label`` names the adapter
    in errors (the URI it was downloaded from) when ``source`` is a staging
    directory. The config and the safetensors header are read under the
    default :class:`ValidationLimits`.
    """
    path = Path(source).expanduser()
    label = str(source) if label is None else label
    if not path.exists():
        raise SourceNotFound(label)
    if not path.is_dir():
        raise SourceNotFound(label, "it is a file, not a directory")
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    if not config_path.is_file():
        raise NotAPeftAdapter(label, f"no {CONFIG_FILE}")
    if not weights_path.is_file():
        pickled = [
            name
            for name in (f"adapter_model{suffix}" for suffix in PICKLE_SUFFIXES)
            if (path / name).exists()
        ]
        if pickled:
            raise AdapterValidationError(
                "pickle_weights",
                f"{label!r} holds {pickled[0]}, a pickle file lorapool never loads; "
                f"re-save the adapter with safetensors (save_pretrained(..., "
                "safe_serialization=True))",
            )
        raise NotAPeftAdapter(label, f"no {WEIGHTS_FILE}")
    config = _read_config(config_path, label)
    try:
        tensors = read_safetensors_header(weights_path)
    except AdapterValidationError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotAPeftAdapter(label, f"{WEIGHTS_FILE} is not a safetensors file: {exc}") from None
    if not any("lora_A" in name for name in tensors):
        raise NotAPeftAdapter(label, f"{WEIGHTS_FILE} holds no lora_A tensors")
    size = config_path.stat().st_size + weights_path.stat().st_size
    return AdapterFiles(
        path=path,
        config=config,
        tensors=tensors,
        sha256=sha256_of_files(path),
        size_bytes=size,
    )


def _read_config(config_path: Path, label: str) -> LoraConfig:
    """``adapter_config.json`` as far as serving needs it (the strict parse is
    :func:`lorapool.formats.parse_adapter_config`).

    The file's size is checked before it is read (:func:`read_config_file`)
    and its nesting depth before it is decoded.
    """
    try:
        data = read_config_file(config_path, ValidationLimits().max_config_bytes)
    except OSError as exc:
        raise NotAPeftAdapter(label, f"{CONFIG_FILE} cannot be read: {exc}") from None
    except AdapterValidationError as exc:
        raise AdapterValidationError(exc.reason, f"{label!r}: {exc.detail}") from None
    try:
        raw = load_json(data, CONFIG_FILE, "not_peft", strict=False)
    except AdapterValidationError as exc:
        raise NotAPeftAdapter(label, exc.detail) from None
    if not isinstance(raw, dict):
        raise NotAPeftAdapter(label, f"{CONFIG_FILE} is not a JSON object")
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterValidationError(
            "unsupported_peft_type",
            f"peft_type {raw.get('peft_type')!r} is not supported; only LORA adapters are",
        )
    try:
        return LoraConfig.model_validate(raw)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        raise NotAPeftAdapter(
            label, f"{CONFIG_FILE} is missing or has bad fields: {fields}"
        ) from None


def unsupported_dora() -> AdapterValidationError:
    """The refusal of a DoRA adapter (``use_dora=true``) by a backend whose
    :attr:`Capabilities.dora` is false."""
    return AdapterValidationError(
        "unsupported_dora",
        "the adapter is DoRA (use_dora=true) and this backend does not serve DoRA; serve it "
        "with one that does (TorchBackend, on a base model whose projections have no bias) "
        "or retrain with use_dora=false",
    )


def check_supported(files: AdapterFiles, caps: Capabilities) -> None:
    """Refuse an adapter the backend cannot serve, saying what to change."""
    cfg = files.config
    if cfg.use_dora and not caps.dora:
        raise unsupported_dora()
    if cfg.bias != "none":
        raise AdapterValidationError(
            "unsupported_bias", f"bias={cfg.bias!r} is not supported; train with bias='none'"
        )
    if cfg.modules_to_save:
        raise AdapterValidationError(
            "unsupported_modules_to_save",
            f"modules_to_save={list(cfg.modules_to_save)} is not supported; a LoRA adapter "
            "must only add low-rank deltas",
        )
    if cfg.r > caps.max_rank:
        raise AdapterValidationError(
            "unsupported_rank",
            f"rank {cfg.r} is above the backend's max_rank {caps.max_rank}; raise max_rank "
            "or retrain with a smaller r",
        )
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in files.tensors}
    unknown = sorted(modules - caps.target_modules)
    if unknown:
        raise AdapterValidationError(
            "unsupported_target",
            f"target modules {unknown} are not LoRA-able in this base model; supported: "
            f"{sorted(caps.target_modules)}",
        )
