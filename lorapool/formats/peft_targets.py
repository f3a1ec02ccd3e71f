"""Which base-model linear each adapter tensor goes to, decided exactly as PEFT decides it.

An adapter is served only if lorapool applies exactly the tensors PEFT's
``PeftModel.from_pretrained`` would load, each to the same module. PEFT (0.21)
wraps the modules its config targets (``check_target_module_exists``: the
``target_modules`` list matched as a module key or a ``.``-suffix of it, or
``"all-linear"``; ``layers_to_transform`` with ``layers_pattern``;
``exclude_modules``), then maps each wrapped parameter
``base_model.model.<module key>.lora_A.default.weight`` to the checkpoint key
with the adapter name removed, ``...lora_A.weight``, and loads the state dict
with ``strict=False``. So PEFT *silently ignores*:

* a tensor for a module the config does not target (``untargeted_tensors``),
* a tensor named without the ``base_model.model.`` prefix, under another
  adapter name than ``default``, or under a parent the module does not have
  (``unknown_module``),
* ``...lora_A.default.weight`` when ``...lora_A.weight`` is present too: both
  name the same parameter and the plain one wins (``ambiguous_tensor_names``),

and keeps its freshly initialised (possibly random) weights for a wrapped
module the file has no tensors for (``missing_tensors``). lorapool refuses all
of these rather than serve something PEFT would not: :func:`map_lora_tensors`
is the one function that decides, used by validation
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
    "PEFT_PREFIX",
    "LoraTargets",
    "LoraTensorMap",
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
    r"([A-Za-z_][A-Za-z0-9_]*)\.lora_([AB])(?:\.([A-Za-z0-9_]+))?\.weight$",
    re.ASCII,
)
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
"""PEFT's layer index of a module key when ``layers_pattern`` is empty (the first numbered
segment)."""
_ADAPTER_NAME = "default"
"""The adapter name ``PeftModel.from_pretrained`` loads under."""

Side = Literal["A", "B"]


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
    strings are never held here: the config checks refuse them.
    """

    modules: frozenset[str] | None
    layers: frozenset[int] | None = None
    layers_pattern: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: LoraConfig) -> LoraTargets:
        """The targets of a parsed :class:`LoraConfig` (its ``target_modules`` only: the
        layer and exclusion options are not kept there, so this wraps at least as much as
        the full config did)."""
        names = config.target_modules
        if len(names) == 1 and names[0].lower() == ALL_LINEAR:
            return cls(None)
        return cls(frozenset(names))

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
    (module names and parents are then not checked). Each problem is an
    :class:`AdapterValidationError` (``unknown_module``, ``untargeted_tensors``,
    ``ambiguous_tensor_names``), collected, not raised; a tensor with a
    problem gets no site (of a weight stored under two names, the one PEFT
    loads keeps its site). Layers and shapes are the caller's to check.
    """
    out = LoraTensorMap()
    plain: dict[tuple[int, str, Side], str] = {}
    named: dict[tuple[int, str, Side], str] = {}
    untargeted: list[tuple[str, str]] = []
    for name in names:
        m = _NAME.match(name)
        if m is None:
            out.problems.append(_unknown(name, _grammar_detail(name)))
            continue
        layer, parent, module, adapter = int(m.group(1)), m.group(2), m.group(3), m.group(5)
        side: Side = "A" if m.group(4) == "A" else "B"
        key = module_key(layer, parent, module)
        if parents is not None and parents.get(module) != parent:
            out.problems.append(_unknown(name, _module_detail(key, module, parents)))
            continue
        if adapter is not None and adapter != _ADAPTER_NAME:
            out.problems.append(
                _unknown(
                    name,
                    f"it is stored under the adapter name {adapter!r}; PEFT loads "
                    f"'lora_{side}.weight' (or 'lora_{side}.{_ADAPTER_NAME}.weight') and ignores "
                    "it. Re-save the adapter with save_pretrained",
                )
            )
            continue
        if not targets.wraps(key):
            untargeted.append((name, key))
            continue
        (named if adapter else plain)[(layer, module, side)] = name
        out.sites[name] = TensorSite(layer, parent, module, side)
    for site, name in named.items():
        if site in plain:
            del out.sites[name]  # PEFT loads the plain name; the problem refuses both
            out.problems.append(
                AdapterValidationError(
                    "ambiguous_tensor_names",
                    f"layer {site[0]} {site[1]} lora_{site[2]} is stored twice, as "
                    f"{plain[site]!r} and {name!r}; PEFT loads one and ignores the other. "
                    "Keep only the name save_pretrained writes (without '.default')",
                )
            )
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
    return out


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
    return (
        "not a lora_A/lora_B weight of a decoder layer's linear as PEFT saves it "
        f"('{PEFT_PREFIX}model.layers.N.<self_attn|mlp>.<module>.lora_A.weight')"
    )


def _module_detail(key: str, module: str, parents: Mapping[str, str]) -> str:
    if module in parents:
        return (
            f"it names {key}, but the base model has {module} under "
            f"{parents[module]}; PEFT ignores it"
        )
    return f"{module!r} is not a LoRA-able linear of the base model; it has {sorted(parents)}"
