"""Value checks: NaN/Inf, a bound on each tensor's norm, and norm outliers among adapters."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import AdapterValidationError
from ..formats import SafetensorsHeader, TensorInfo, ValidationLimits, iter_tensor_values
from .report import ValidationReport
from .tensors import ALLOWED_DTYPES

__all__ = ["check_values", "is_norm_outlier"]


def check_values(
    weights: Path,
    header: SafetensorsHeader,
    report: ValidationReport,
    limits: ValidationLimits,
    population: Sequence[float],
) -> None:
    """Scan each tensor (one at a time) for NaN/Inf and its Frobenius norm; test the adapter's
    norm against ``population`` (the norms of registered adapters).

    Records the per-tensor norms in ``report.norms``. Without numpy the scan is
    skipped and a note says so.
    """
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
                report.add_error(exc)
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


def _scan_tensor(f: BinaryIO, header: SafetensorsHeader, info: TensorInfo) -> tuple[bool, float]:
    """``(all finite, Frobenius norm)`` of one tensor, reading only its bytes."""
    import numpy as np

    finite = True
    total = 0.0
    for values in iter_tensor_values(f, header, info):
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
