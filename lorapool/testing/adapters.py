"""Writing real PEFT adapters for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ALL_LINEAR", "ATTENTION", "make_random_adapter"]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


def make_random_adapter(
    path: str | Path,
    base_model: str | Path | Any,
    *,
    rank: int,
    target_modules: Sequence[str] = ATTENTION,
    seed: int = 0,
    lora_alpha: int | None = None,
    use_rslora: bool = False,
    b_scale: float = 0.3,
    use_dora: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter with random A and B to ``path`` with peft's ``save_pretrained``.

    ``base_model`` is a checkpoint directory or an already loaded transformers
    model (faster when making many). ``b_scale`` scales the random B matrices
    so the adapter visibly changes the output without destroying it. ``use_dora``
    makes a DoRA adapter whose magnitudes are moved off their initial norms by a few
    percent, so its DoRA scale visibly differs from 1. Returns ``path``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(path)
    model = (
        AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        if isinstance(base_model, (str, Path))
        else base_model
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=int(lora_alpha if lora_alpha is not None else 2 * rank),
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    generator = torch.Generator().manual_seed(seed)
    peft_model = get_peft_model(model, config, adapter_name="default")
    try:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    fan_in = param.shape[1]
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * b_scale / rank**0.5)
                elif "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.05 * torch.randn(param.shape, generator=generator))
        peft_model.save_pretrained(str(out), safe_serialization=True)
    finally:
        if not isinstance(base_model, (str, Path)):
            peft_model.unload()
    return out
