"""Tensor checks: every name a LoRA-able linear of the base, shapes, rank, pairs, dtypes."""

from __future__ import annotations

import re

from ..formats import WEIGHTS_FILE, BaseModelSpec, SafetensorsHeader
from ..types import Capabilities
from .report import ValidationReport

__all__ = ["ALLOWED_DTYPES", "check_tensors"]

ALLOWED_DTYPES = frozenset({"F32", "F16", "BF16"})
"""Tensor dtypes an adapter may use."""

_LORA_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+?)"
    r"\.lora_([AB])(?:\.\w+)?\.weight$"
)


def check_tensors(
    header: SafetensorsHeader,
    report: ValidationReport,
    base: BaseModelSpec | None,
    caps: Capabilities | None,
) -> None:
    """Check the header's tensors against the config's rank, the base model and the backend.

    Every tensor must be ``...layers.N.(self_attn|mlp).MODULE.lora_(A|B)[.x].weight``
    with ``MODULE`` a LoRA-able linear of ``base`` and ``N`` one of its layers,
    A ``[r, in]`` and B ``[out, r]``, in pairs, of an :data:`ALLOWED_DTYPES`
    dtype. Without ``base`` the module, layer and shape checks are skipped
    (a note says so).
    """
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
