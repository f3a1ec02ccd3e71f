"""What validation finds: reason codes, problems, and the report of one adapter."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterValidationError
from ..formats import MAGNITUDE, LoraTargets, TensorInfo
from ..types import LoraConfig

__all__ = ["REASONS", "Problem", "ValidationReport"]

REASONS: Mapping[str, str] = {
    "pickle_weights": "weights are a pickle file (.bin/.pt); only safetensors is loaded",
    "not_peft": "not a PEFT LoRA adapter directory",
    "bad_config": "adapter_config.json is malformed or has fields of the wrong type",
    "unsupported_peft_type": "peft_type is not LORA",
    "unsupported_dora": "a DoRA adapter (use_dora) and a backend that does not serve DoRA",
    "unsupported_bias": "bias training is not supported",
    "unsupported_modules_to_save": "modules_to_save is not supported",
    "unsupported_option": "a PEFT option serving cannot honour (rank_pattern, fan_in_fan_out...)",
    "unsupported_rank": "rank is above the backend's max rank",
    "unsupported_target": "a target module is not LoRA-able in this backend",
    "unknown_module": "a tensor name does not map to a LoRA-able linear of the base model "
    "as PEFT loads it",
    "untargeted_tensors": "tensors for modules adapter_config.json does not target "
    "(PEFT ignores them)",
    "ambiguous_tensor_names": "one LoRA weight stored under two names "
    "(lora_A.weight and lora_A.default.weight)",
    "missing_tensors": "a module the config targets has no LoRA tensors "
    "(PEFT would use its initial weights)",
    "layer_out_of_range": "a tensor names a layer the base model does not have",
    "shape_mismatch": "a tensor's shape does not match the base layer's in/out features",
    "rank_mismatch": "a tensor's rank does not match the declared r",
    "unpaired_lora": "a lora_A has no lora_B (or the reverse)",
    "unpaired_magnitude": "a DoRA module has lora_A/lora_B but no lora_magnitude_vector "
    "(or the reverse)",
    "magnitude_without_dora": "DoRA magnitude vectors in an adapter without use_dora "
    "(PEFT ignores them)",
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
"""Every reason code :func:`lorapool.validation.validate_adapter` can report, with its meaning."""


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


@dataclass
class ValidationReport:
    """Everything :func:`lorapool.validation.validate_adapter` found about one adapter."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    config: LoraConfig | None = None
    targets: LoraTargets | None = None
    """The modules the config targets, with its layer and exclusion options."""
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    """Per-tensor Frobenius norms (empty when values were not scanned)."""
    notes: list[str] = field(default_factory=list)
    """Checks that were skipped, and problems accepted with ``force``."""
    forced: bool = False
    size_bytes: int = 0

    @property
    def norm(self) -> float | None:
        """The adapter's norm for the outlier test: the RMS of its per-tensor norms.

        Only the LoRA matrices count: a DoRA adapter's magnitude vectors (the
        row norms of its modules' weights, orders of magnitude above A and B)
        would set it apart from plain LoRA adapters of the same shape.
        """
        values = [v for name, v in self.norms.items() if MAGNITUDE not in name]
        if not values:
            return None
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

    def add_error(self, error: AdapterValidationError) -> None:
        """Record a reader's refusal as a problem."""
        self.add(error.reason, error.detail)
