"""One engine batch mixing 5 adapters (ranks 8/16/32, attention-only and all-linear,
rsLoRA) plus a base-model row gives, row by row, exactly what PEFT gives for that
adapter alone: the same 32 greedy tokens and allclose last-step logits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from lorapool.adapters import inspect_adapter_dir
from lorapool.types import GenerationRequest, LoadedAdapter, SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
PROMPTS = {
    None: "Tell me a story about a lighthouse keeper.",
    "r8-attn": "What is two plus two?",
    "r16-all": "Write a haiku about the sea.",
    "r32-attn": "Name three colours of the rainbow.",
    "r16-qv-rslora": "Why is the sky blue?",
    "r32-all": "Describe your favourite breakfast.",
}


def _loaded(name: str, path: Path) -> LoadedAdapter:
    files = inspect_adapter_dir(path)
    return LoadedAdapter(
        name, files.config, (path / "adapter_model.safetensors").read_bytes(), files.sha256
    )


def _peft_greedy(
    hf_model: Any, tokenizer: Any, adapter: Path | None, prompt: str
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with PEFT, one adapter alone, no KV cache: the plain reference."""
    from peft import PeftModel

    model = hf_model if adapter is None else PeftModel.from_pretrained(hf_model, str(adapter))
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        out: list[int] = []
        logits = torch.empty(0)
        with torch.inference_mode():
            for _ in range(NEW_TOKENS):
                logits = model(ids).logits[0, -1].float()
                nxt = int(logits.argmax())
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return out, logits
    finally:
        if adapter is not None:
            model.unload()


async def test_mixed_batch_matches_peft_per_adapter(
    backend: Any, adapters: dict[str, Path], hf_model: Any
) -> None:
    slots = {}
    for slot, name in enumerate(adapters):
        await backend.load(_loaded(name, adapters[name]), slot)
        slots[name] = slot

    steps: list[set[str]] = []
    last_logits: dict[str, torch.Tensor] = {}

    def hook(request_ids: list[str], logits: torch.Tensor) -> None:
        steps.append(set(request_ids))
        for rid, row in zip(request_ids, logits, strict=True):
            last_logits[rid] = row.clone()

    backend._engine.logits_hook = hook
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    async def run(name: str | None) -> list[int]:
        rid = f"req-{name or 'base'}"
        request = GenerationRequest(
            rid,
            [{"role": "user", "content": PROMPTS[name]}],
            params,
            name,
            None if name is None else slots[name],
        )
        ids: list[int] = []
        async for chunk in backend.generate(request):
            ids.extend(chunk.token_ids)
        return ids

    names: list[str | None] = [None, *adapters]
    results = dict(zip(names, await asyncio.gather(*(run(n) for n in names)), strict=True))

    # The rows really shared forward passes: some step held every request.
    assert any(len(s) == len(names) for s in steps), "requests never ran in one batch"
    assert max(backend.stats.distinct_adapters) >= 4

    outputs = set()
    for name in names:
        ref_tokens, ref_logits = _peft_greedy(
            hf_model, backend._tokenizer, None if name is None else adapters[name], PROMPTS[name]
        )
        assert results[name] == ref_tokens, f"{name}: tokens differ from PEFT"
        mine = last_logits[f"req-{name or 'base'}"]
        torch.testing.assert_close(mine, ref_logits, atol=2e-3, rtol=1e-3)
        outputs.add(tuple(ref_tokens))
    assert len(outputs) == len(names), "adapters should change the output"
