"""safetensors files read without torch: the header, checked, and tensor values in chunks.

The header is read from its 8-byte length prefix, refused above
:attr:`ValidationLimits.max_header_bytes` before it is read, and checked against
the file's size from ``fstat``; the data section is only read by
:func:`iter_tensor_values`, one tensor at a time.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import AdapterValidationError
from ._json import is_int, load_strict, short
from .limits import MIB, ValidationLimits

__all__ = [
    "SafetensorsHeader",
    "TensorInfo",
    "iter_tensor_values",
    "parse_safetensors_header",
    "read_safetensors_header",
    "read_safetensors_header_bytes",
    "read_safetensors_header_file",
]

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
        """``{name: shape}``, as :func:`read_safetensors_header` returns."""
        return {name: t.shape for name, t in self.tensors.items()}


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
    header = load_strict(raw, "the safetensors header", "bad_header")
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
            "bad_header", f"tensor {name[:200]!r}: unknown dtype {short(dtype)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(is_int(d) and 0 <= d < 1 << 40 for d in shape)
    ):
        raise AdapterValidationError(
            "bad_header", f"tensor {name[:200]!r}: shape must be a list of non-negative ints"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) and 0 <= o < 1 << 62 for o in offsets)
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


def read_safetensors_header(
    data: bytes | Path, limits: ValidationLimits | None = None
) -> dict[str, tuple[int, ...]]:
    """Return ``{tensor name: shape}`` from a safetensors file or its bytes.

    The header is checked strictly (dtypes, shapes, offsets tiling the data
    section, the file's size) under ``limits`` (the defaults when ``None``); a
    file's data section is never read. Raises :class:`AdapterValidationError`
    (a ``ValueError``) with reason ``truncated``, ``bad_header`` or ``too_large``.
    """
    limits = limits or ValidationLimits()
    if isinstance(data, Path):
        return read_safetensors_header_file(data, limits).shapes
    return read_safetensors_header_bytes(data, limits).shapes


_FLOAT_LAYOUTS = {"F16": "<f2", "F32": "<f4"}


def iter_tensor_values(f: BinaryIO, header: SafetensorsHeader, info: TensorInfo) -> Iterator[Any]:
    """One F32/F16/BF16 tensor's values as numpy float arrays, in chunks of about 4 MiB.

    ``f`` is the open safetensors file that ``header`` was read from; only the
    tensor's own bytes are read. Needs numpy. Raises ``ValueError`` for another
    dtype and :class:`AdapterValidationError` (``truncated``) when the file is
    shorter than the header said.
    """
    import numpy as np

    if info.dtype != "BF16" and info.dtype not in _FLOAT_LAYOUTS:
        raise ValueError(f"no float decoding for dtype {info.dtype}")
    item = _DTYPE_SIZES[info.dtype]
    step = max(item, (4 * MIB) // item * item)
    f.seek(header.data_start + info.begin)
    left = info.nbytes
    while left > 0:
        chunk = f.read(min(step, left))
        if not chunk:
            raise AdapterValidationError("truncated", "the file shrank while being read")
        left -= len(chunk)
        if info.dtype == "BF16":
            yield (np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            yield np.frombuffer(chunk, dtype=_FLOAT_LAYOUTS[info.dtype])
