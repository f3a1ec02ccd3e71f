"""Which base-model linear each adapter tensor goes to, decided exactly as PEFT decides it.

An adapter is served only if lorapool applies exactly the tensors PEFT's
``PeftModel.from_pretrained`` would load, each to the same module. PEFT (0.21)
wraps the modules its config targets (``check_target_module_exists``: the
``target_modules`` list matched as a module key or a ``.``-suffix of it, or
``"all-linear"``; ``layers_to_transform`` with ``layers_pattern``;
``exclude_modules``), then maps each wrapped parameter
``base_model.model.<module key>.lora_A.default.weight`` to the checkpoint key
with the adapter name removed, ``...lora_A.weight``, and loads the state dict
with ``strict=False``. A DoRA adapter (``use_dora=true``) also has one magnitude
vector per wrapped module, saved as ``...<module>.lora_magnitude_vector`` (shape
``[out_features]``; PEFT also loads it named ``...lora_magnitude_vector.weight`` or
``...lora_magnitude_vector.default.weight``). So PEFT *silently ignores*:

* a tensor for a module the config does not target (``untargeted_tensors``),
* a tensor named without the ``base_model.model.`` prefix, under another
  adapter name than ``default``, or under a parent the module does not have
  (``unknown_module``),
* ``...lora_A.default.weight`` when ``...lora_A.weight`` is present too: both
  name the same parameter and the plain one wins (``ambiguous_tensor_names``; a
  magnitude stored under two of its names likewise),
* a magnitude vector in an adapter without ``use_dora`` (``magnitude_without_dora``),

and keeps its freshly initialised (possibly random) weights for a wrapped
module the file has no tensors for (``missing_tensors``), and its initial
magnitude for a DoRA module whose magnitude is missing (``unpaired_magnitude``).
lorapool refuses all of these rather than serve something PEFT would not:
:func:`map_lora_tensors` is the one function that decides, used by validation
(:mod:`lorapool.validation.tensors`) and by an engine's loader
(``backends/torch/lora.py``) alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import AdapterValidationError
from ..types import LoraConfig

__all__ = [
    "ALL_LINEAR",
    "LLAMA_PARENTS",
    "MAGNITUDE",
    "PEFT_PREFIX",
    "LoraTargets",
    "LoraTensorMap",
    "Side",
    "TensorSite",
    "map_lora_tensors",
    "missing_sites",
    "module_key",
]

ALL_LINEAR = "all-linear"
"""PEFT's shorthand for every linear layer but the output head (``target_modules`` as a string)."""

PEFT_PREFIX = "base_model.model."
"""What ``save_pretrained`` puts before a module key; PEFT loads no tensor named without it."""

LLAMA_PARENTS: Mapping[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
"""Module name -> the decoder-layer child holding it, in Llama-family models (Llama,
Mistral, Qwen2, SmolLM2)."""

_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,8})\.([A-Za-z_][A-Za-z0-9_]*)\."
    r"([A-Za-z_][A-Za-z0-9_]*)\.(?:lora_([AB])(?:\.([A-Za-z0-9_]+))?\.weight"
    r"|lora_(magnitude_vector)(?:(?:\.([A-Za-z0-9_]+))?\.(weight))?)$",
    re.ASCII,
)
"""A LoRA weight (groups 4-5: side, adapter name) or a DoRA magnitude (groups 6-8:
``magnitude_vector``, adapter name, ``weight``) of a decoder layer's linear."""
MAGNITUDE = "lora_magnitude_vector"
"""The name PEFT saves a DoRA module's magnitude vector under (after the module key)."""
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
"""PEFT's layer index of a module key when ``layers_pattern`` is empty (the first numbered
segment)."""
_ADAPTER_NAME = "default"
"""The adapter name ``PeftModel.from_pretrained`` loads under."""

Side = Literal["A", "B", "M"]
"""``A`` and ``B``: the LoRA matrices; ``M``: a DoRA module's magnitude vector."""


def module_key(layer: int, parent: str, module: str) -> str:
    """The key of a decoder layer's linear in the base model (``model.layers.N.parent.module``)."""
    return f"model.layers.{layer}.{parent}.{module}"


@dataclass(frozen=True)
class LoraTargets:
    """The modules a PEFT LoRA config wraps, as ``check_target_module_exists`` decides.

    ``modules`` is the ``target_modules`` list (``None`` for ``"all-linear"``);
    ``layers`` is ``layers_to_transform`` (``None``: every layer);
    ``layers_pattern`` the names a layer index follows (empty: the first
    numbered segment); ``exclude`` the ``exclude_modules`` list. Regex
    strings are never held here: the config checks refuse them. ``dora`` is
    ``use_dora``: PEFT then gives every module it wraps a magnitude vector too.
    """

    modules: frozenset[str] | None
    layers: frozenset[int] | None = None
    layers_pattern: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    dora: bool = False

    @classmethod
    def from_config(cls, config: LoraConfig) -> LoraTargets:
        """The targets of a parsed :class:`LoraConfig` (its ``target_modules`` and
        ``use_dora`` only: the layer and exclusion options are not kept there, so this
        wraps at least as much as the full config did)."""
        names = config.target_modules
        if len(names) == 1 and names[0].lower() == ALL_LINEAR:
            return cls(None, dora=config.use_dora)
        return cls(frozenset(names), dora=config.use_dora)

    def wraps(self, key: str) -> bool:
        """Whether PEFT wraps the linear at module ``key`` (e.g. ``model.layers.3.mlp.up_proj``).

        Only meaningful for linears (``"all-linear"`` says yes to every key).
        """
        if key in self.exclude or any(key.endswith(f".{x}") for x in self.exclude):
            return False
        if self.modules is None:
            return True
        if key in self.modules:
            return True
        if not any(key.endswith(f".{t}") for t in self.modules):
            return False
        if self.layers is None:
            return True
        return _layer_index(key, self.layers_pattern) in self.layers


def _layer_index(key: str, patterns: frozenset[str]) -> int | None:
    """PEFT's layer index of ``key`` for ``layers_to_transform`` (``None``: no index)."""
    if not patterns:
        m = _LAYER_INDEX.match(key)
    else:
        # patterns are identifiers (checked with the config), so escaping changes nothing
        m = next(
            (
                found
                for p in sorted(patterns)
                if (found := re.match(rf"(?:^|.*?\.){re.escape(p)}\.(?P<idx>\d+)\.", key))
            ),
            None,
        )
    return None if m is None else int(m.group("idx"))


@dataclass(frozen=True)
class TensorSite:
    """Where one adapter tensor goes: a side of the LoRA of one decoder layer's linear."""

    layer: int
    parent: str
    module: str
    side: Side

    @property
    def key(self) -> str:
        """The module's key in the base model."""
        return module_key(self.layer, self.parent, self.module)


@dataclass
class LoraTensorMap:
    """What :func:`map_lora_tensors` decided: each served tensor's site, and every refusal."""

    sites: dict[str, TensorSite] = field(default_factory=dict)
    """Tensor name -> site, for the tensors PEFT loads (and lorapool serves)."""
    problems: list[AdapterValidationError] = field(default_factory=list)
    """Why the adapter cannot be served as PEFT would serve it; empty when it can."""

    def raise_first(self) -> None:
        """Raise the first problem, if any."""
        if self.problems:
            raise self.problems[0]


def map_lora_tensors(
    names: Iterable[str],
    targets: LoraTargets,
    parents: Mapping[str, str] | None = None,
) -> LoraTensorMap:
    """Decide, as PEFT does, which module each tensor name goes to; refuse what PEFT ignores.

    ``parents`` maps the base model's LoRA-able module names to the
    decoder-layer child holding them (:data:`LLAMA_PARENTS`,
    :attr:`BaseModelSpec.module_parents`); ``None`` when the base is not known
    (module names and parents are then not checked). A DoRA magnitude vector
    gets a site of side ``"M"``. Each problem is an
    :class:`AdapterValidationError` (``unknown_module``, ``untargeted_tensors``,
    ``ambiguous_tensor_names``, ``magnitude_without_dora``,
    ``unpaired_magnitude``), collected, not raised; a tensor with a problem
    gets no site (of a weight stored under two names, one keeps its site).
    Layers, shapes and the pairing of A with B are the caller's to check; the
    pairing of a DoRA module's magnitude with its A and B is checked here.
    """
    out = LoraTensorMap()
    stored: dict[tuple[int, str, Side], list[str]] = {}
    untargeted: list[tuple[str, str]] = []
    magnitudes_ignored: list[str] = []
    for name in names:
        m = _NAME.match(name)
        if m is None:
            out.problems.append(_unknown(name, _grammar_detail(name)))
            continue
        layer, parent, module = int(m.group(1)), m.group(2), m.group(3)
        side: Side = "M" if m.group(6) else ("A" if m.group(4) == "A" else "B")
        adapter = m.group(7) if side == "M" else m.group(5)
        key = module_key(layer, parent, module)
        if parents is not None and parents.get(module) != parent:
            out.problems.append(_unknown(name, _module_detail(key, module, parents)))
            continue
        if adapter is not None and adapter != _ADAPTER_NAME:
            what = MAGNITUDE if side == "M" else f"lora_{side}.weight"
            out.problems.append(
                _unknown(
                    name,
                    f"it is stored under the adapter name {adapter!r}; PEFT loads "
                    f"'{what}' (or the name with '.{_ADAPTER_NAME}') and ignores it. "
                    "Re-save the adapter with save_pretrained",
                )
            )
            continue
        if not targets.wraps(key):
            untargeted.append((name, key))
            continue
        if side == "M" and not targets.dora:
            magnitudes_ignored.append(name)
            continue
        stored.setdefault((layer, module, side), []).append(name)
        out.sites[name] = TensorSite(layer, parent, module, side)
    for site, stored_as in stored.items():
        if len(stored_as) > 1:
            _refuse_duplicates(out, site, stored_as)
    if untargeted:
        name, key = untargeted[0]
        out.problems.append(
            AdapterValidationError(
                "untargeted_tensors",
                f"{len(untargeted)} tensor(s) are for modules adapter_config.json does not "
                f"target (first: {name!r}, for {key}); PEFT does not wrap those modules and "
                "ignores the tensors. Remove them, or retrain with the module in "
                "target_modules",
            )
        )
    if magnitudes_ignored:
        out.problems.append(
            AdapterValidationError(
                "magnitude_without_dora",
                f"{len(magnitudes_ignored)} tensor(s) are DoRA magnitude vectors (first: "
                f"{magnitudes_ignored[0][:200]!r}) but adapter_config.json does not set "
                "use_dora=true; PEFT ignores them and serves plain LoRA. Set use_dora=true "
                "if the adapter was trained with DoRA, or remove them",
            )
        )
    if targets.dora:
        _check_magnitudes(out, {(layer, module, side) for layer, module, side in stored})
    return out


def _refuse_duplicates(
    out: LoraTensorMap, site: tuple[int, str, Side], stored_as: list[str]
) -> None:
    """One weight stored under several names: PEFT loads one; refuse them all (the name
    PEFT prefers keeps its site: a LoRA matrix's plain name, a magnitude's last name)."""
    layer, module, side = site
    if side == "M":
        keep = max(stored_as)
        what = f"{MAGNITUDE} is stored {len(stored_as)} times, as {sorted(stored_as)!r}"
        fix = f"Keep only the name save_pretrained writes ('...{module}.{MAGNITUDE}')"
    else:
        keep = min(stored_as, key=len)  # the plain name is the shorter
        other = next(n for n in stored_as if n != keep)
        what = f"lora_{side} is stored twice, as {keep!r} and {other!r}"
        fix = "Keep only the name save_pretrained writes (without '.default')"
    for name in stored_as:
        if name != keep:
            del out.sites[name]
    out.problems.append(
        AdapterValidationError(
            "ambiguous_tensor_names",
            f"layer {layer} {module} {what}; PEFT loads one and ignores the other. {fix}",
        )
    )


def _check_magnitudes(out: LoraTensorMap, stored: set[tuple[int, str, Side]]) -> None:
    """A DoRA adapter: each module with lora_A or lora_B has its magnitude, and the reverse.

    PEFT would serve a module without its magnitude with the magnitude it
    initialises, and a magnitude without its A and B over initial A and B.
    """
    pairs = {(layer, module) for layer, module, side in stored if side != "M"}
    magnitudes = {(layer, module) for layer, module, side in stored if side == "M"}
    for missing, what in (
        (sorted(pairs - magnitudes), f"lora_A/lora_B but no {MAGNITUDE}"),
        (sorted(magnitudes - pairs), f"a {MAGNITUDE} but no lora_A/lora_B"),
    ):
        if missing:
            layer, module = missing[0]
            out.problems.append(
                AdapterValidationError(
                    "unpaired_magnitude",
                    f"{len(missing)} module(s) of this DoRA adapter have {what} (first: "
                    f"layer {layer} {module}); PEFT would serve them with initial weights. "
                    "Save the adapter with save_pretrained",
                )
            )


def missing_sites(
    present: Iterable[tuple[int, str]],
    targets: LoraTargets,
    parents: Mapping[str, str],
    num_layers: int,
) -> list[tuple[int, str]]:
    """The ``(layer, module)`` linears PEFT wraps that have no tensor in ``present``.

    PEFT leaves such a module at its initial weights, which are random unless
    the config's ``init_lora_weights`` zeroes B; lorapool would add nothing.
    """
    have = set(present)
    return [
        (layer, module)
        for layer in range(num_layers)
        for module, parent in sorted(parents.items())
        if (layer, module) not in have and targets.wraps(module_key(layer, parent, module))
    ]


def _unknown(name: str, detail: str) -> AdapterValidationError:
    return AdapterValidationError("unknown_module", f"tensor {name[:200]!r}: {detail}")


def _grammar_detail(name: str) -> str:
    if not name.startswith(PEFT_PREFIX) and ".lora_" in name:
        return (
            f"PEFT loads LoRA weights only under '{PEFT_PREFIX}<module>.lora_A.weight' and "
            "ignores this one. Re-save the adapter with save_pretrained"
        )
    if MAGNITUDE in name:
        return (
            f"PEFT loads a DoRA magnitude only as '<module>.{MAGNITUDE}' (or with "
            f"'.weight' or '.{_ADAPTER_NAME}.weight' after it) and ignores this one. "
            "Re-save the adapter with save_pretrained"
        )
    return (
        "not a lora_A/lora_B weight or DoRA magnitude of a decoder layer's linear as PEFT "
        f"saves it ('{PEFT_PREFIX}model.layers.N.<self_attn|mlp>.<module>.lora_A.weight')"
    )


def _module_detail(key: str, module: str, parents: Mapping[str, str]) -> str:
    if module in parents:
        return (
            f"it names {key}, but the base model has {module} under "
            f"{parents[module]}; PEFT ignores it"
        )
    return f"{module!r} is not a LoRA-able linear of the base model; it has {sorted(parents)}"
