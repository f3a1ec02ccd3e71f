"""The caps every reader of an adapter's (or a base checkpoint's) files works under.

There is one set: :class:`ValidationLimits`, whose defaults every reader uses
unless a caller passes its own, one cap on a safetensors JSON header
(:data:`MAX_HEADER_BYTES`), one on a JSON config file (:data:`MAX_CONFIG_BYTES`),
one on how deeply any JSON the readers parse may nest (:data:`MAX_JSON_DEPTH`)
and one list of pickle weight files that are refused by name and never opened
(:data:`PICKLE_SUFFIXES`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterValidationError

__all__ = [
    "CHECKPOINT_LIMITS",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MIB",
    "PICKLE_SUFFIXES",
    "ValidationLimits",
    "read_capped",
    "read_config_file",
]

MIB = 1 << 20
"""Bytes in a mebibyte."""

MAX_HEADER_BYTES = 16 * MIB
"""The cap on a safetensors file's JSON header, checked from its 8-byte length before reading.

An adapter at the tensor cap (20,000 entries of about 150 bytes each) has a
header of about 3 MiB, and a sharded base checkpoint's files have headers well
under 1 MiB each, so 16 MiB is a wide margin that still bounds what one parse of
untrusted JSON may allocate.
"""

MAX_CONFIG_BYTES = 1 * MIB
"""The cap on ``adapter_config.json`` (and the ``lorapool.json`` sidecar), checked from the
file's size before any byte is read.

PEFT writes about 1.5 KiB; a config with long module lists stays far below
1 MiB, while a config of hundreds of megabytes would cost twice its size in
memory to read and decode.
"""

MAX_JSON_DEPTH = 64
"""How deeply any JSON the readers parse may nest (objects and arrays), checked on the
bytes before they are decoded.

PEFT configs, safetensors headers and base-model configs nest 3 to 5 levels;
past about a thousand levels Python's decoder raises ``RecursionError``.
"""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in pickle formats: refused by name, never opened."""


@dataclass(frozen=True)
class ValidationLimits:
    """Caps and thresholds; the defaults fit adapters of models up to ~70B parameters."""

    max_total_bytes: int = 2 << 30
    """Config plus weights, and everything extracted from an archive."""
    max_header_bytes: int = MAX_HEADER_BYTES
    """A safetensors JSON header (see :data:`MAX_HEADER_BYTES`)."""
    max_config_bytes: int = MAX_CONFIG_BYTES
    """``adapter_config.json`` and the ``lorapool.json`` sidecar (see :data:`MAX_CONFIG_BYTES`)."""
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


CHECKPOINT_LIMITS = ValidationLimits(max_tensors=1_000_000)
"""Limits for a base model's safetensors files: the same header cap as an adapter's; a
checkpoint file may hold more tensors than an adapter (the header cap bounds their count)."""


def read_capped(path: Path, cap: int) -> bytes | None:
    """The bytes of ``path``, or ``None`` when it holds more than ``cap``.

    The size is taken from ``fstat`` first: a larger file is not read at all.
    Otherwise at most ``cap + 1`` bytes are read, so a file that grows, or one
    whose size the filesystem does not report, is still bounded. Raises
    ``OSError`` when the file cannot be read.
    """
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size > cap:
            return None
        data = f.read(cap + 1)
    return None if len(data) > cap else data


def read_config_file(path: Path, cap: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a JSON config file of at most ``cap`` bytes (see :func:`read_capped`).

    Raises :class:`AdapterValidationError` (``too_large``) naming the file, its
    size and the cap when it is larger, having read none of it; ``OSError``
    when it cannot be read.
    """
    data = read_capped(path, cap)
    if data is None:
        raise AdapterValidationError(
            "too_large",
            f"{path.name} is {_size_of(path)} bytes, larger than the cap of {cap} bytes; "
            "a PEFT config is a few KiB, check that this is the file save_pretrained wrote",
        )
    return data


def _size_of(path: Path) -> str:
    try:
        return str(path.stat().st_size)
    except OSError:  # pragma: no cover - it was just opened
        return "more than the cap"
