"""The segmented-LoRA CPU kernel (``sgmv.c``): built once with the system compiler, cached.

PyTorch's batched matmul reads LoRA stacks at well under the machine's memory
bandwidth on the tiny per-slot products of a decode step, and each of its
calls carries a gather and an add. ``sgmv.c`` does shrink, expand and add for
all of a pass's slots in one call per projection group, reading every slot's
weights once. It has an AVX-512 path and a portable one (docs/decisions.md,
"A C kernel for CPU LoRA").

The kernel is optional: without a C compiler with OpenMP, with
``LORAPOOL_LORA_KERNEL=0``, or when a build fails, :func:`cpu_kernel`
returns ``None`` and :class:`~lorapool.backends.torch.lora.LoraSlots` uses
PyTorch matmuls. Builds are keyed by the source, the compiler and its flags,
and this CPU's feature flags, under ``<cache dir>/kernels/``.

Its OpenMP loop hands segments to threads dynamically by default, one at a time, so a
thread descheduled by another process's work holds up only its own segment;
``LORAPOOL_KERNEL_SCHEDULE=static`` (or ``dynamic,N`` for chunks of N segments), read when
the kernel loads, or :meth:`SgmvKernel.set_schedule` chooses. The setting is the
process's: every backend shares the one loaded library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lorapool.cache import default_cache_dir

__all__ = [
    "DEFAULT_SCHEDULE",
    "DESC_FIELDS",
    "KernelUnavailable",
    "SgmvGroup",
    "SgmvKernel",
    "build_kernel",
    "cpu_kernel",
    "parse_schedule",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sgmv.c")
DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")

_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


SCHEDULE_ENV = "LORAPOOL_KERNEL_SCHEDULE"
DEFAULT_SCHEDULE = ("dynamic", 1)
"""The kernel's loop schedule unless :data:`SCHEDULE_ENV` says otherwise: segments one at a
time to whichever thread is free."""


def parse_schedule(text: str) -> tuple[str, int]:
    """``"static"``, ``"dynamic"`` or ``"dynamic,N"`` as ``(kind, chunk)``; anything else
    is a :class:`ValueError` naming :data:`SCHEDULE_ENV`."""
    kind, _, chunk_text = text.strip().lower().partition(",")
    try:
        chunk = int(chunk_text) if chunk_text else 1
    except ValueError:
        chunk = 0
    if kind not in ("static", "dynamic") or chunk < 1 or (kind == "static" and chunk_text):
        raise ValueError(
            f"{SCHEDULE_ENV} takes static, dynamic or dynamic,N (N >= 1 segments), not {text!r}"
        )
    return kind, chunk


MAX_MODULES = 4
"""Modules per projection group the kernel's group record holds (``SGMV_MAX_MODULES``)."""

DESC_FIELDS = 16
"""Int64s in one slot's descriptor (``SGMV_DESC``): its ``A`` block's offset in the arena
(``-1``: the slot has nothing in this group), ``A``'s width, the rank, then per module
the ``B`` panels' offset, the module's first column among the shrunk activations and its
DoRA scale's offset (``-1`` where absent)."""


class SgmvGroup(ctypes.Structure):
    """``sgmv_group`` of ``sgmv.c``: one layer's projection group, fixed between calls."""

    _fields_ = [
        ("base", _P),
        ("desc", _P),
        ("in_dim", _I64),
        ("n_mod", _I64),
        ("t_ld", _I64),
        ("out", _I64 * MAX_MODULES),
        ("y_off", _I64 * MAX_MODULES),
    ]


class SgmvKernel:
    """The loaded kernel: ``sgmv_f32`` and ``sgmv_bf16``, the argument lists of ``sgmv.c``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KernelUnavailable(f"cannot load {path}: {exc}") from exc
        fn = lib.lorapool_sgmv_f32
        fn.argtypes = [_P, _I, _P, _P, _P, _P, _I64, _P, _I64, _P, _I]
        fn.restype = None
        self.sgmv_f32 = fn
        fn = lib.lorapool_sgmv_bf16
        fn.argtypes = [_P, _I, _P, _P, _P, _P, _I64, _P, _I64, _P, _P, _I64, _I]
        fn.restype = None
        self.sgmv_bf16 = fn
        self._lib = lib
        try:
            self._set_schedule = lib.lorapool_sgmv_set_schedule
            self._get_schedule = lib.lorapool_sgmv_get_schedule
        except AttributeError as exc:
            raise KernelUnavailable(f"{path} is an older build: {exc}") from exc
        self._set_schedule.argtypes = [_I, _I]
        self._set_schedule.restype = None
        self._get_schedule.argtypes = [ctypes.POINTER(_I)]
        self._get_schedule.restype = _I
        env = os.environ.get(SCHEDULE_ENV, "").strip()
        self.set_schedule(*(parse_schedule(env) if env else DEFAULT_SCHEDULE))

    def set_schedule(self, kind: str, chunk: int = 1) -> None:
        """Hand segments to threads ``"dynamic"`` (``chunk`` at a time, to whichever
        thread is free) or ``"static"`` (equal blocks fixed in advance); for the process."""
        parse_schedule(kind if kind == "static" else f"{kind},{chunk}")  # validates
        self._set_schedule(1 if kind == "dynamic" else 0, chunk)

    @property
    def schedule(self) -> tuple[str, int]:
        """The schedule now in force, ``(kind, chunk)``."""
        chunk = _I(0)
        dynamic = self._get_schedule(ctypes.byref(chunk))
        return ("dynamic", chunk.value) if dynamic else ("static", 1)

    def __repr__(self) -> str:
        return f"SgmvKernel({str(self.path)!r})"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_kernel(
    cache_dir: Path | None = None,
    *,
    cc: str | None = None,
    flags: Sequence[str] = DEFAULT_FLAGS,
) -> SgmvKernel:
    """Compile ``sgmv.c`` (once per source, compiler, flags and CPU) and load it.

    Raises :class:`KernelUnavailable` with the compiler's output when it fails.
    """
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"C compiler {compiler!r} does not run: {exc}") from exc
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    out_dir = (cache_dir or default_cache_dir()) / "kernels"
    target = out_dir / f"sgmv-{key}.so"
    if not target.is_file():
        try:
            _compile(compiler, flags, out_dir, target)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailable(f"cannot build {SOURCE.name} in {out_dir}: {exc}") from exc
    return SgmvKernel(target)


def _compile(compiler: str, flags: Sequence[str], out_dir: Path, target: Path) -> None:
    """Compile to a temporary file beside ``target`` and rename it into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", tmp],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise KernelUnavailable(
                f"{compiler} failed to build {SOURCE.name}:\n{proc.stderr.strip()}"
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def cpu_kernel(cache_dir: Path | None = None) -> SgmvKernel | None:
    """The kernel for this process, or ``None`` (logged once) when it is not available."""
    if os.environ.get("LORAPOOL_LORA_KERNEL", "1").strip().lower() in {"0", "false", "off"}:
        return None
    try:
        return build_kernel(cache_dir)
    except KernelUnavailable as exc:
        log.warning("LoRA CPU kernel unavailable, PyTorch matmuls instead: %s", exc)
        return None
