"""One engine batch mixing 5 adapters (ranks 8/16/32, attention-only and all-linear,
rsLoRA) plus a base-model row gives, row by row, exactly what PEFT gives for that
adapter alone: the same 32 greedy tokens and allclose last-step logits."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lorapool.formats import inspect_adapter_dir
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
    hf_model: Any,
    tokenizer: Any,
    adapter: Path | None,
    prompt: str,
    *,
    follow: list[int] | None = None,
) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
    """Greedy decoding with PEFT, one adapter alone, no KV cache: the plain reference.

    Returns the tokens, the logits of every step, and the base model's logits
    for the prompt (what the first step would be without the adapter). With
    ``follow`` (another run's tokens), it stops after the first step whose token
    differs from ``follow``'s: later steps would have another context.
    """
    from peft import PeftModel

    model = hf_model if adapter is None else PeftModel.from_pretrained(hf_model, str(adapter))
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        with torch.inference_mode():
            base_first = hf_model(ids).logits[0, -1].float() if adapter is None else None
            if adapter is not None:
                with model.disable_adapter():
                    base_first = model(ids).logits[0, -1].float()
        out: list[int] = []
        steps: list[torch.Tensor] = []
        with torch.inference_mode():
            for _ in range(NEW_TOKENS):
                logits = model(ids).logits[0, -1].float()
                steps.append(logits)
                nxt = int(logits.argmax())
                out.append(nxt)
                if follow is not None and nxt != follow[len(out) - 1]:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert base_first is not None
        return out, steps, base_first
    finally:
        if adapter is not None:
            model.unload()


class _Run:
    """What one mixed batch produced, per request name (``None`` is the base model)."""

    def __init__(self) -> None:
        self.tokens: dict[str | None, list[int]] = {}
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.steps: list[set[str]] = []


async def _mixed_batch(backend: Any, adapters: dict[str, Path], new_tokens: int) -> _Run:
    """Every adapter plus the base model, submitted together to one engine."""
    slots = {}
    for slot, name in enumerate(adapters):
        await backend.load(_loaded(name, adapters[name]), slot)
        slots[name] = slot
    run = _Run()

    def hook(request_ids: list[str], logits: torch.Tensor) -> None:
        run.steps.append(set(request_ids))
        for rid, row in zip(request_ids, logits, strict=True):
            run.logits.setdefault(rid, []).append(row.clone())

    backend._engine.logits_hook = hook
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(name: str | None) -> list[int]:
        request = GenerationRequest(
            f"req-{name or 'base'}",
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
    run.tokens = dict(zip(names, await asyncio.gather(*(one(n) for n in names)), strict=True))
    # The rows really shared forward passes: some step held every request.
    assert any(len(s) == len(names) for s in run.steps), "requests never ran in one batch"
    assert max(backend.stats.distinct_adapters) >= 4
    return run


async def test_mixed_batch_matches_peft_per_adapter(
    backend: Any, adapters: dict[str, Path], hf_model: Any
) -> None:
    # On CPU the decode steps run through the C kernel (prefill through PyTorch's
    # matmuls); CI has a compiler, so a missing kernel is a failure here.
    if backend.device.type == "cpu" and shutil.which("cc"):
        assert backend._engine.lora.kernel is not None, "LoRA CPU kernel did not build"
    run = await _mixed_batch(backend, adapters, NEW_TOKENS)
    outputs = set()
    for name in [None, *adapters]:
        ref_tokens, ref_logits, _ = _peft_greedy(
            hf_model, backend._tokenizer, None if name is None else adapters[name], PROMPTS[name]
        )
        assert run.tokens[name] == ref_tokens, f"{name}: tokens differ from PEFT"
        mine = run.logits[f"req-{name or 'base'}"][-1]
        torch.testing.assert_close(mine, ref_logits[-1], atol=2e-3, rtol=1e-3)
        outputs.add(tuple(ref_tokens))
    assert len(outputs) == len(adapters) + 1, "adapters should change the output"


# A hang guard, not a speed bound: about 20 s on 2 idle cores, 100 s on one core shared with
# two busy processes, and over 600 s when 2 cores run 10 busy processes (PyTorch's threads
# wait on each other), so well above the suite's 600 s.
@pytest.mark.timeout(1800)
async def test_bf16_mixed_batch_tracks_fp32_peft(
    model_dir: Path, adapters: dict[str, Path], hf_model: Any
) -> None:
    """The bf16 CPU path (fp32 attention, fp32 LoRA stacks) in one mixed batch.

    bf16 greedy decoding drifts from fp32 after a few tokens, so this compares
    logits step by step for as long as the two token streams agree (the same
    context on both sides): the first token must agree, every compared step,
    prefill and decode, must be within bf16 error of PEFT's fp32 logits, and
    each adapter's effect on the first step must be far larger than that error.
    """
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(
        model_dir, max_slots=6, max_rank=32, max_batch=8, max_seq_len=256, dtype="bfloat16"
    )
    await backend.start()
    try:
        assert backend.lora_dtype == torch.float32
        run = await _mixed_batch(backend, adapters, NEW_TOKENS)
    finally:
        await backend.aclose()
    decode_steps_compared = 0
    for name in [None, *adapters]:
        mine_tokens = run.tokens[name]
        assert len(mine_tokens) == NEW_TOKENS, f"{name}: {len(mine_tokens)} tokens"
        # PEFT's steps only as far as the comparison below reads them (the first step
        # whose token differs, then stop): all of them where the two runs agree.
        ref_tokens, ref_logits, base_first = _peft_greedy(
            hf_model,
            backend._tokenizer,
            None if name is None else adapters[name],
            PROMPTS[name],
            follow=mine_tokens,
        )
        mine = run.logits[f"req-{name or 'base'}"]
        assert mine_tokens[0] == ref_tokens[0], f"{name}: first token differs from PEFT fp32"
        same = next(
            (i for i, (a, b) in enumerate(zip(mine_tokens, ref_tokens, strict=False)) if a != b),
            NEW_TOKENS,
        )
        for step in range(min(same + 1, NEW_TOKENS)):
            err = float((mine[step] - ref_logits[step]).abs().max())
            assert err < 1.5, f"{name} step {step}: bf16 logits off by {err:.2f}"
            decode_steps_compared += step > 0
        if name is not None:
            effect = float((ref_logits[0] - base_first).abs().max())
            err0 = float((mine[0] - ref_logits[0]).abs().max())
            assert effect > 4 * err0, f"{name}: adapter effect {effect:.2f} vs error {err0:.2f}"
    assert decode_steps_compared >= 2 * (len(adapters) + 1)
