"""Tensor checks: every name a LoRA-able linear of the base as PEFT loads it, targeted by the
config, shapes, rank, pairs (and DoRA magnitudes), dtypes; the backend's rank and DoRA."""

from __future__ import annotations

from ..formats import (
    LLAMA_PARENTS,
    WEIGHTS_FILE,
    BaseModelSpec,
    LoraTargets,
    SafetensorsHeader,
    TensorInfo,
    TensorSite,
    map_lora_tensors,
    missing_sites,
    unsupported_dora,
)
from ..types import Capabilities
from .report import ValidationReport

__all__ = ["ALLOWED_DTYPES", "check_tensors"]

ALLOWED_DTYPES = frozenset({"F32", "F16", "BF16"})
"""Tensor dtypes an adapter may use."""


def check_tensors(
    header: SafetensorsHeader,
    report: ValidationReport,
    base: BaseModelSpec | None,
    caps: Capabilities | None,
) -> None:
    """Check the header's tensors against the config, the base model and the backend.

    Which module each tensor goes to is decided by
    :func:`lorapool.formats.map_lora_tensors`, as PEFT decides it when it loads
    the adapter (the engine's loader uses the same function): every tensor
    must be ``base_model.model.model.layers.N.<parent>.MODULE.lora_(A|B)[.default].weight``
    for a linear the config targets (``unknown_module``, ``untargeted_tensors``,
    ``ambiguous_tensor_names``), ``MODULE`` a LoRA-able linear of ``base``
    under its own parent and ``N`` one of its layers, A ``[r, in]`` and B
    ``[out, r]``, in pairs, of an :data:`ALLOWED_DTYPES` dtype. A DoRA adapter
    also has each module's ``...MODULE.lora_magnitude_vector``, ``[out]``
    (``unpaired_magnitude``; ``magnitude_without_dora`` without ``use_dora``),
    and is refused by a backend whose capabilities lack ``dora``
    (``unsupported_dora``). When nothing else is wrong, every linear the
    config targets must have its pair (``missing_tensors``). Without ``base``
    the module, layer, shape and missing-module checks are skipped (a note
    says so).
    """
    cfg = report.config
    r = cfg.r if cfg is not None else None
    if caps is not None and r is not None and r > caps.max_rank:
        report.add(
            "unsupported_rank",
            f"rank {r} is above the backend's max_rank {caps.max_rank}; raise max_rank or "
            "retrain with a smaller r",
        )
    if caps is not None and cfg is not None and cfg.use_dora and not caps.dora:
        report.add_error(unsupported_dora())
    if not header.tensors:
        report.add("not_peft", f"{WEIGHTS_FILE} holds no tensors")
        return
    targets = report.targets or (LoraTargets.from_config(cfg) if cfg is not None else None)
    parents = base.module_parents if base is not None else None
    # Without a config there are no targets to check: every well-named tensor is mapped.
    mapping = map_lora_tensors(header.tensors, targets or LoraTargets(None), parents)
    first = len(report.problems)
    for error in mapping.problems:
        report.add_error(error)
    seen: dict[tuple[int, str], set[str]] = {}
    bad_dtypes = {info.dtype for info in header.tensors.values()} - ALLOWED_DTYPES
    for name, site in mapping.sites.items():
        info = header.tensors[name]
        layer, module, side = site.layer, site.module, site.side
        seen.setdefault((layer, module), set()).add(side)
        if side == "M":
            _check_magnitude(report, name, info, site, base)
            continue
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
        _check_layer(report, name, layer, base)
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
        # a magnitude alone is map_lora_tensors' to refuse (unpaired_magnitude)
        if (sides & {"A", "B"}) not in ({"A", "B"}, set()):
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
    elif targets is not None and len(report.problems) == first:
        _check_missing(report, seen, targets, base)


def _check_layer(report: ValidationReport, name: str, layer: int, base: BaseModelSpec) -> None:
    if layer >= base.num_layers:
        report.add(
            "layer_out_of_range",
            f"tensor {name!r} names layer {layer}; {base.name} has {base.num_layers} "
            "layers: the adapter was trained for another base model",
        )


def _check_magnitude(
    report: ValidationReport,
    name: str,
    info: TensorInfo,
    site: TensorSite,
    base: BaseModelSpec | None,
) -> None:
    """A DoRA magnitude vector: 1-D, one value per output feature of its module."""
    if len(info.shape) != 1:
        report.add(
            "shape_mismatch",
            f"tensor {name!r} has shape {info.shape}; a DoRA magnitude is 1-D [out_features]",
        )
        return
    if base is None:
        return
    _check_layer(report, name, site.layer, base)
    fan_out = base.module_shapes[site.module][1]
    if info.shape[0] != fan_out:
        report.add(
            "shape_mismatch",
            f"tensor {name!r} has shape {info.shape}; {site.module} of {base.name} has "
            f"out_features={fan_out}",
        )


def _check_missing(
    report: ValidationReport,
    seen: dict[tuple[int, str], set[str]],
    targets: LoraTargets,
    base: BaseModelSpec,
) -> None:
    """Every linear PEFT wraps has its tensors (checked once the tensors are otherwise sound,
    so an adapter for another base is reported as that, not as thousands of gaps)."""
    parents = base.module_parents or LLAMA_PARENTS
    gaps = missing_sites(seen, targets, parents, base.num_layers)
    if gaps:
        layer, module = gaps[0]
        report.add(
            "missing_tensors",
            f"{len(gaps)} module(s) the config targets have no LoRA tensors (first: layer "
            f"{layer} {module}); PEFT would serve them with their initial, possibly random, "
            "weights. Save the adapter with save_pretrained, or narrow target_modules "
            "(or layers_to_transform) to what was trained",
        )
