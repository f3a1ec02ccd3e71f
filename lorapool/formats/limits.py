"""The caps every reader of an adapter's (or a base checkpoint's) files works under.

There is one set: :class:`ValidationLimits`, whose defaults every reader uses
unless a caller passes its own, one cap on a safetensors JSON header
(:data:`MAX_HEADER_BYTES`) and one list of pickle weight files that are
refused by name and never opened (:data:`PICKLE_SUFFIXES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHECKPOINT_LIMITS",
    "MAX_HEADER_BYTES",
    "MIB",
    "PICKLE_SUFFIXES",
    "ValidationLimits",
    "read_capped",
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

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in pickle formats: refused by name, never opened."""


@dataclass(frozen=True)
class ValidationLimits:
    """Caps and thresholds; the defaults fit adapters of models up to ~70B parameters."""

    max_total_bytes: int = 2 << 30
    """Config plus weights, and everything extracted from an archive."""
    max_header_bytes: int = MAX_HEADER_BYTES
    """A safetensors JSON header (see :data:`MAX_HEADER_BYTES`)."""
    max_config_bytes: int = 1 * MIB
    """``adapter_config.json`` and the ``lorapool.json`` sidecar."""
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
    """The bytes of ``path``, or ``None`` when it holds more than ``cap`` (reads at most cap + 1).

    Raises ``OSError`` when the file cannot be read.
    """
    with path.open("rb") as f:
        data = f.read(cap + 1)
    return None if len(data) > cap else data
