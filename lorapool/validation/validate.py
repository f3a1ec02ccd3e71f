""":func:`validate_adapter`: read an adapter with :mod:`lorapool.formats`, run every check."""

from __future__ import annotations

import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import AdapterValidationError, SourceNotFound
from ..formats import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    BaseModelSpec,
    ValidationLimits,
    check_adapter_config,
    extract_archive,
    is_archive,
    read_config_file,
    read_safetensors_header_file,
)
from ..types import Capabilities
from .base import check_base
from .report import ValidationReport
from .tensors import check_tensors
from .values import check_values

__all__ = ["validate_adapter"]


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
    if is_archive(source):
        with tempfile.TemporaryDirectory(prefix="lorapool-validate-") as tmp:
            try:
                root = extract_archive(source, Path(tmp), limits)
            except AdapterValidationError as exc:
                report.add_error(exc)
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
        if entry.name.lower().endswith(PICKLE_SUFFIXES):
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
    try:
        raw_config = read_config_file(config_path, limits.max_config_bytes)
    except AdapterValidationError as exc:
        report.add_error(exc)
    else:
        check = check_adapter_config(raw_config)
        report.config, report.targets = check.config, check.targets
        for error in check.problems:
            report.add_error(error)
    try:
        header = read_safetensors_header_file(weights_path, limits)
    except AdapterValidationError as exc:
        report.add_error(exc)
        return
    report.tensors = dict(header.tensors)
    check_tensors(header, report, base, caps)
    check_base(d, header, report, base)
    if limits.scan_values:
        check_values(weights_path, header, report, limits, population)
    else:
        report.notes.append("values not scanned (scan_values=False): no NaN/Inf or norm checks")
    if report.forced:
        for problem in report.problems:
            if problem.forceable:
                report.notes.append(f"accepted with --force: {problem}")
