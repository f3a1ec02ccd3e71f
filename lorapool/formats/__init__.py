"""The file formats an adapter arrives in, read defensively and without torch.

This wing owns reading: safetensors headers and tensor values
(:mod:`.safetensors`), a PEFT adapter directory and its digests (:mod:`.peft`),
``adapter_config.json`` parsed strictly (:mod:`.peft_config`), which module
each adapter tensor goes to, decided as PEFT decides it (:mod:`.peft_targets`),
archives extracted safely (:mod:`.archives`), the base model's description and the
sidecar an adapter declares it in (:mod:`.base_model`), and the one set of caps
all of them read under (:mod:`.limits`). It judges nothing beyond a file being
well formed: the checks of an adapter against a base model and a backend are
:mod:`lorapool.validation`, which builds on this package (never the reverse).
Every reader raises :class:`lorapool.errors.AdapterValidationError` with a
stable ``reason`` code.
"""

from .archives import (
    ARCHIVE_SUFFIXES,
    check_archive_members,
    check_member_name,
    extract_archive,
    is_archive,
)
from .base_model import (
    SIDECAR_FILE,
    BaseModelSpec,
    base_fingerprint,
    read_sidecar,
    stamp_adapter,
    tokenizer_hash,
)
from .limits import (
    CHECKPOINT_LIMITS,
    MAX_CONFIG_BYTES,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    PICKLE_SUFFIXES,
    ValidationLimits,
    read_capped,
    read_config_file,
)
from .peft import (
    ADAPTER_FILES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFiles,
    adapter_digest,
    check_supported,
    inspect_adapter_dir,
    sha256_of_files,
    unsupported_dora,
)
from .peft_config import (
    AdapterConfigCheck,
    check_adapter_config,
    config_problems,
    parse_adapter_config,
)
from .peft_targets import (
    ALL_LINEAR,
    LLAMA_PARENTS,
    MAGNITUDE,
    PEFT_PREFIX,
    LoraTargets,
    LoraTensorMap,
    TensorSite,
    map_lora_tensors,
    missing_sites,
    module_key,
)
from .safetensors import (
    SafetensorsHeader,
    TensorInfo,
    iter_tensor_values,
    parse_safetensors_header,
    read_safetensors_header,
    read_safetensors_header_bytes,
    read_safetensors_header_file,
)

__all__ = [
    "ADAPTER_FILES",
    "ALL_LINEAR",
    "ARCHIVE_SUFFIXES",
    "CHECKPOINT_LIMITS",
    "CONFIG_FILE",
    "LLAMA_PARENTS",
    "MAGNITUDE",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "PEFT_PREFIX",
    "PICKLE_SUFFIXES",
    "SIDECAR_FILE",
    "WEIGHTS_FILE",
    "AdapterConfigCheck",
    "AdapterFiles",
    "BaseModelSpec",
    "LoraTargets",
    "LoraTensorMap",
    "SafetensorsHeader",
    "TensorInfo",
    "TensorSite",
    "ValidationLimits",
    "adapter_digest",
    "base_fingerprint",
    "check_adapter_config",
    "check_archive_members",
    "check_member_name",
    "check_supported",
    "config_problems",
    "extract_archive",
    "inspect_adapter_dir",
    "is_archive",
    "iter_tensor_values",
    "map_lora_tensors",
    "missing_sites",
    "module_key",
    "parse_adapter_config",
    "parse_safetensors_header",
    "read_capped",
    "read_config_file",
    "read_safetensors_header",
    "read_safetensors_header_bytes",
    "read_safetensors_header_file",
    "read_sidecar",
    "sha256_of_files",
    "stamp_adapter",
    "tokenizer_hash",
    "unsupported_dora",
]
