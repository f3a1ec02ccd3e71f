"""Real PEFT DoRA (and plain LoRA) adapters for the demo model, written by ``save_pretrained``.

:func:`make_peft_adapter` is :func:`lorapool.testing.make_random_adapter` with
``use_dora``: PEFT computes each module's magnitude when it wraps it (the row
norms of ``W + scale * B A`` for the A and B it starts with); A and B are then
drawn again and the magnitudes jittered, so the scale DoRA applies
(``magnitude / ||W + scale * B A||``) is nowhere near 1 and an engine that
ignored it would give other logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def make_peft_adapter(
    path: Path,
    base_model: Any,
    *,
    rank: int,
    target_modules: Sequence[str],
    seed: int,
    use_rslora: bool = False,
    use_dora: bool = False,
    b_scale: float = 0.3,
    magnitude_jitter: float = 0.1,
) -> Path:
    """Write a PEFT adapter with random A, B (and, with ``use_dora``, jittered magnitudes).

    ``base_model`` is a loaded transformers model; it is left as it was.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # PEFT's initial A and B set the magnitudes: reproducible
        torch.manual_seed(seed)
        peft_model = get_peft_model(base_model, config, adapter_name="default")
    try:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    fan_in = param.shape[1]
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
                elif "lora_B" in name:
                    noise = torch.randn(param.shape, generator=generator)
                    param.copy_(noise * b_scale / rank**0.5)
                elif "lora_magnitude_vector" in name:
                    noise = torch.randn(param.shape, generator=generator)
                    param.mul_(1 + magnitude_jitter * noise)
        peft_model.save_pretrained(str(path), safe_serialization=True)
    finally:
        peft_model.unload()
    return path
