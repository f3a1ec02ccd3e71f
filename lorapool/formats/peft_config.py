"""``adapter_config.json`` parsed strictly: types, and the PEFT options serving cannot honour.

The rule is PEFT parity: a config is accepted only if ``PeftModel.from_pretrained``
would load it onto the unchanged base model and the result is plain LoRA
(``W x + scale * B A x`` on the modules :class:`LoraTargets` names) or DoRA
(``use_dora``: that output scaled per row by ``magnitude / ||W + scale * B A||``;
whether the backend serves DoRA is decided with its capabilities, not here).
Options that change the forward pass otherwise (the other LoRA variants, biases, patterns),
that make PEFT rewrite the base weights at load (``init_lora_weights`` of
PiSSA, OLoRA, CorDA, LoftQ), or that PEFT reads as regular expressions are
refused, naming the option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..errors import AdapterValidationError
from ..types import LoraConfig
from ._json import is_int, load_strict, short
from .peft import CONFIG_FILE
from .peft_targets import ALL_LINEAR, LoraTargets

__all__ = ["AdapterConfigCheck", "check_adapter_config", "config_problems", "parse_adapter_config"]

_UNSUPPORTED_OPTIONS = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out=true (transposed weights)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias=true",
    "use_qalora": "QA-LoRA (use_qalora)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
"""Options that change what the adapter computes (PEFT's LoRA variants among them): refused
when set to anything but their off value."""

_PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal", "lora_ga")
"""``init_lora_weights`` values under which PEFT leaves the base weights alone at load and
the forward pass plain (checked against peft 0.21: "pissa", "olora", "corda" and "loftq"
rewrite the base weights; "mica" is a LoRA variant)."""


_Add = Callable[[str, str], None]


@dataclass
class AdapterConfigCheck:
    """What :func:`check_adapter_config` found: the config, the modules it targets, or problems."""

    config: LoraConfig | None = None
    targets: LoraTargets | None = None
    """With the layer and exclusion options :class:`LoraConfig` does not keep."""
    problems: list[AdapterValidationError] = field(default_factory=list)


def config_problems(data: bytes) -> tuple[LoraConfig | None, list[AdapterValidationError]]:
    """Strict checks of ``adapter_config.json``'s bytes: the config, or every problem found.

    :func:`check_adapter_config` without the targets.
    """
    check = check_adapter_config(data)
    return check.config, check.problems


def check_adapter_config(data: bytes) -> AdapterConfigCheck:
    """Strict checks of ``adapter_config.json``'s bytes: the config and its targets, or every
    problem found.

    The JSON must be UTF-8 without duplicate keys or ``NaN``, nested at most
    :data:`lorapool.formats.MAX_JSON_DEPTH` deep. Each problem is an
    :class:`AdapterValidationError` (``bad_config``, ``unsupported_peft_type``,
    ``unsupported_bias``, ``unsupported_modules_to_save``, ``unsupported_option``),
    returned, not raised. DoRA (``use_dora=true``) is accepted here: a backend
    that does not serve it refuses it (:func:`lorapool.formats.check_supported`,
    ``unsupported_dora``).
    """
    try:
        raw = load_strict(data, CONFIG_FILE, "bad_config")
    except AdapterValidationError as exc:
        return AdapterConfigCheck(problems=[exc])
    if not isinstance(raw, dict):
        error = AdapterValidationError("bad_config", f"{CONFIG_FILE} is not a JSON object")
        return AdapterConfigCheck(problems=[error])
    problems: list[AdapterValidationError] = []

    def add(reason: str, detail: str) -> None:
        problems.append(AdapterValidationError(reason, detail))

    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        add(
            "unsupported_peft_type",
            f"peft_type {short(peft_type, 60)} is not supported; only LORA adapters are",
        )
    r = raw.get("r")
    if not (is_int(r) and 1 <= r <= 65536):
        add("bad_config", f"r must be an integer between 1 and 65536, got {short(r)}")
    alpha = raw.get("lora_alpha")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1e6):
        add("bad_config", f"lora_alpha must be a positive number up to 1e6, got {short(alpha)}")
    targets = _target_modules(raw.get("target_modules"), add)
    for key in ("use_rslora", "use_dora", "inference_mode"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], bool):
            add("bad_config", f"{key} must be true or false")
    bias = raw.get("bias", "none")
    if bias != "none":
        add("unsupported_bias", f"bias={short(bias)} is not supported; train with bias='none'")
    mts = raw.get("modules_to_save")
    if mts not in (None, [], ()):
        add(
            "unsupported_modules_to_save",
            f"modules_to_save={short(mts, 80)} is not supported; a LoRA adapter must only "
            "add low-rank deltas (retrain without modules_to_save)",
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(key) not in (None, False, {}, [], 0):
            add("unsupported_option", f"{what} is not supported; retrain without it")
    init = raw.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        add(
            "unsupported_option",
            f"init_lora_weights={short(init)}: PEFT rewrites the base model's weights (or "
            "runs a LoRA variant) when it loads such an adapter, so it cannot be served on "
            "the unchanged base; convert it to plain LoRA (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) or retrain",
        )
    layers, patterns, exclude = _layer_options(raw, targets is None, add)
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        add("bad_config", "base_model_name_or_path must be a string")
    if problems:
        return AdapterConfigCheck(problems=problems)
    try:
        config = LoraConfig.model_validate(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "target_modules": [ALL_LINEAR] if targets is None else sorted(targets),
                "use_rslora": bool(raw.get("use_rslora") or False),
                "use_dora": bool(raw.get("use_dora") or False),
                "base_model_name_or_path": base,
            }
        )
    except ValidationError as exc:  # pragma: no cover - the checks above are stricter
        detail = f"{CONFIG_FILE}: {exc.errors()[0]['msg']}"
        return AdapterConfigCheck(problems=[AdapterValidationError("bad_config", detail)])
    return AdapterConfigCheck(
        config=config,
        targets=LoraTargets(targets, layers, patterns, exclude, dora=config.use_dora),
    )


def _target_modules(value: object, add: _Add) -> frozenset[str] | None:
    """``target_modules`` as PEFT reads it: a list of names, or ``None`` for ``"all-linear"``.

    Any other string is a regular expression to PEFT (matched against whole
    module keys), refused; so is a list holding ``"all-linear"``, which PEFT
    reads as a module name matching nothing.
    """
    if isinstance(value, str):
        if value.lower() != ALL_LINEAR:
            add(
                "bad_config",
                f"target_modules is the string {value[:60]!r}, which PEFT reads as a regular "
                "expression over whole module names; list the module names instead (e.g. "
                '["q_proj", "v_proj"]), or write "all-linear"',
            )
        return None
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        add("bad_config", "target_modules must be a non-empty list of module names")
        return frozenset()
    if any(t.lower() == ALL_LINEAR for t in value):
        add(
            "bad_config",
            'target_modules lists "all-linear", which PEFT reads as a module name that matches '
            'nothing; write target_modules: "all-linear" (a string), or list the modules',
        )
    return frozenset(value)


def _layer_options(
    raw: dict[str, object], all_linear: bool, add: _Add
) -> tuple[frozenset[int] | None, frozenset[str], frozenset[str]]:
    """``layers_to_transform``, ``layers_pattern`` and ``exclude_modules``, checked as PEFT
    checks them (regular expressions refused)."""
    layers_raw = raw.get("layers_to_transform")
    layers: frozenset[int] | None = None
    if is_int(layers_raw):
        layers = frozenset({layers_raw})
    elif isinstance(layers_raw, list) and all(is_int(x) for x in layers_raw):
        layers = frozenset(layers_raw) if layers_raw else None
    elif layers_raw is not None:
        add("bad_config", "layers_to_transform must be an integer or a list of integers")
    pattern_raw = raw.get("layers_pattern")
    patterns: frozenset[str] = frozenset()
    if isinstance(pattern_raw, str):
        pattern_raw = [pattern_raw] if pattern_raw else []
    if isinstance(pattern_raw, list) and all(
        isinstance(p, str) and p.isidentifier() and p.isascii() for p in pattern_raw
    ):
        patterns = frozenset(pattern_raw)
    elif pattern_raw is not None:
        add(
            "unsupported_option",
            f"layers_pattern={short(pattern_raw)} is a regular expression to PEFT; only "
            'plain names (e.g. "layers") are supported',
        )
    if (layers_raw is not None or pattern_raw is not None) and all_linear:
        add("bad_config", "layers_to_transform and layers_pattern need a target_modules list")
    if pattern_raw and layers_raw is None:
        add("bad_config", "layers_pattern is set without layers_to_transform")
    exclude_raw = raw.get("exclude_modules")
    exclude: frozenset[str] = frozenset()
    if isinstance(exclude_raw, list) and all(isinstance(x, str) for x in exclude_raw):
        exclude = frozenset(exclude_raw)
    elif isinstance(exclude_raw, str) and exclude_raw:
        add(
            "unsupported_option",
            f"exclude_modules is the string {exclude_raw[:60]!r}, a regular expression to "
            "PEFT; list the module names instead",
        )
    elif exclude_raw not in (None, ""):
        add("bad_config", "exclude_modules must be a list of module names")
    return layers, patterns, exclude


def parse_adapter_config(data: bytes | str) -> LoraConfig:
    """Parse ``adapter_config.json`` strictly; raise the first problem.

    Raises :class:`AdapterValidationError` (``bad_config``,
    ``unsupported_peft_type``, ``unsupported_bias``,
    ``unsupported_modules_to_save``, ``unsupported_option``) and nothing else.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    config, problems = config_problems(raw)
    if problems:
        raise problems[0]
    if config is None:  # pragma: no cover - no config always comes with a problem
        raise AdapterValidationError("bad_config", "no config")
    return config
