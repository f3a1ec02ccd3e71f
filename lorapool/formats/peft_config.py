"""``adapter_config.json`` parsed strictly: types, and the PEFT options serving cannot honour."""

from __future__ import annotations

from pydantic import ValidationError

from ..errors import AdapterValidationError
from ..types import LoraConfig
from ._json import is_int, load_strict, short
from .peft import CONFIG_FILE

__all__ = ["config_problems", "parse_adapter_config"]

_UNSUPPORTED_OPTIONS = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out=true (transposed weights)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias=true",
    "use_qalora": "QA-LoRA (use_qalora)",
    "trainable_token_indices": "trainable_token_indices",
}


def config_problems(data: bytes) -> tuple[LoraConfig | None, list[AdapterValidationError]]:
    """Strict checks of ``adapter_config.json``'s bytes: the config, or every problem found.

    The JSON must be UTF-8 without duplicate keys or ``NaN``. Each problem is
    an :class:`AdapterValidationError` (``bad_config``, ``unsupported_peft_type``,
    ``unsupported_dora``, ``unsupported_bias``, ``unsupported_modules_to_save``,
    ``unsupported_option``), returned, not raised.
    """
    try:
        raw = load_strict(data, CONFIG_FILE, "bad_config")
    except AdapterValidationError as exc:
        return None, [exc]
    if not isinstance(raw, dict):
        return None, [AdapterValidationError("bad_config", f"{CONFIG_FILE} is not a JSON object")]
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
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear" and not targets.isidentifier():
            add(
                "bad_config",
                f"target_modules is the pattern {targets[:60]!r}; list the module names "
                '(e.g. ["q_proj", "v_proj"])',
            )
        targets = [targets]
    elif (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        add("bad_config", "target_modules must be a non-empty list of module names")
        targets = None
    for key in ("use_rslora", "use_dora", "inference_mode"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], bool):
            add("bad_config", f"{key} must be true or false")
    if raw.get("use_dora") is True:
        add(
            "unsupported_dora",
            "DoRA adapters (use_dora=true) are not supported; retrain with use_dora=false",
        )
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
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        add("bad_config", "base_model_name_or_path must be a string")
    if problems:
        return None, problems
    try:
        config = LoraConfig.model_validate(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "target_modules": sorted(targets or ()),
                "use_rslora": bool(raw.get("use_rslora") or False),
                "base_model_name_or_path": base,
            }
        )
    except ValidationError as exc:  # pragma: no cover - the checks above are stricter
        detail = f"{CONFIG_FILE}: {exc.errors()[0]['msg']}"
        return None, [AdapterValidationError("bad_config", detail)]
    return config, []


def parse_adapter_config(data: bytes | str) -> LoraConfig:
    """Parse ``adapter_config.json`` strictly; raise the first problem.

    Raises :class:`AdapterValidationError` (``bad_config``,
    ``unsupported_peft_type``, ``unsupported_dora``, ``unsupported_bias``,
    ``unsupported_modules_to_save``, ``unsupported_option``) and nothing else.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    config, problems = config_problems(raw)
    if problems:
        raise problems[0]
    if config is None:  # pragma: no cover - no config always comes with a problem
        raise AdapterValidationError("bad_config", "no config")
    return config
