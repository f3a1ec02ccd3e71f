"""TorchBackend on a CUDA GPU with the Triton LoRA kernel: PEFT equivalence and the
conformance suite, on the real SmolLM2 model and real PEFT adapters.

Skipped without a CUDA device (``tests/gpu/run_on_gpu.sh`` runs it on one). With
``LORAPOOL_GPU_TEST_DEVICE=cpu`` the same tests run on CPU instead (the C kernel
there, no Triton), to check the tests themselves on a machine without a GPU.

- fp32: one engine batch mixing 5 adapters and a base row gives, row by row, PEFT's
  32 greedy tokens for that adapter alone and allclose last-step logits
  (``test_peft_equivalence.py``'s check, on the GPU). cuBLAS runs fp32 without TF32
  unless asked to; the test makes sure.
- bf16 (the engine's default on CUDA, the arena in bf16): against PEFT in fp32, step
  by step while the token streams agree (the same context on both sides): the first
  token equal, every compared step's logits within bf16's error, each adapter's
  effect far above it (``test_bf16_mixed_batch_tracks_fp32_peft``'s check).
- Both count the Triton kernel's launches: a silent fallback to PyTorch's matmuls
  would pass the comparisons and fail here.
- The conformance suite in fp32 (exact: mixed batches equal solo runs token for token;
  ``LORAPOOL_GPU_PREFIX_TOKENS=N`` compares only the first N tokens instead, should
  cuBLAS's batch-size-dependent kernels ever flip a near tie).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lorapool.testing import ALL_CHECKS, check_backend

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

torch = pytest.importorskip("torch")
DEVICE = os.environ.get("LORAPOOL_GPU_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tests.integration.test_peft_equivalence import (  # noqa: E402
    NEW_TOKENS,
    PROMPTS,
    _mixed_batch,
    _peft_greedy,
)

_prefix = os.environ.get("LORAPOOL_GPU_PREFIX_TOKENS")
PREFIX_TOKENS = int(_prefix) if _prefix else None


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Any:
    """PEFT's reference model: fp32 on CPU, as in the CPU equivalence tests."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def _count_triton_launches(backend: Any) -> list[int]:
    """Wrap the engine's Triton kernel so its launches are counted (CUDA only)."""
    launches = [0]
    lora = backend._engine.lora
    if DEVICE != "cuda":
        return launches
    assert lora.triton is not None, "the Triton kernel is not in use on CUDA"
    run = lora.triton.run

    def counted(*args: Any) -> bool:
        ran: bool = run(*args)
        launches[0] += ran
        return ran

    lora.triton.run = counted
    return launches


async def _started(model_dir: Path, dtype: str) -> Any:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(
        model_dir,
        max_slots=6,
        max_rank=32,
        max_batch=8,
        max_seq_len=256,
        dtype=dtype,
        device=DEVICE,
    )
    await backend.start()
    return backend


KERNEL_DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16 activations, fp32 arena": (torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("blocks", [{}, {"block_n": 16, "block_k": 16}], ids=["default", "small"])
@pytest.mark.parametrize("dtypes", list(KERNEL_DTYPES))
def test_triton_kernel_compiled_matches_per_row_reference(dtypes: str, blocks: Any) -> None:
    """The compiled kernel (the CPU tests run it interpreted) on every plan shape of
    test_lora_plan.py: mixed ranks, missing modules, DoRA rows, rows without adapter."""
    if DEVICE != "cuda":
        pytest.skip("the Triton kernel runs on CUDA (interpreted on CPU: tests/unit)")
    from lorapool.backends.torch.lora import LoraSlots, PreparedAdapter
    from lorapool.backends.torch.triton_lora import TritonLora
    from tests.unit.test_lora_plan import CASES, LAYERS, SHAPES, SLOTS, _reference, _slots

    dtype, arena = KERNEL_DTYPES[dtypes]
    host, adapters = _slots(arena)  # the adapters, rounded to the arena's dtype
    cuda = torch.device("cuda")
    slots = LoraSlots(SHAPES, LAYERS, SLOTS, 8, arena, cuda)
    assert slots.triton is not None, "triton did not import"
    slots.triton = TritonLora(slots, **blocks)
    for s, adapter in enumerate(adapters):
        slots.copy_in(
            s,
            PreparedAdapter(
                adapter.adapter_id,
                adapter.rank,
                {m: t.to(arena) for m, t in adapter.a.items()},
                {m: t.to(arena) for m, t in adapter.b.items()},
                0,
                {m: t.to(arena) for m, t in adapter.dora.items()},
            ),
        )
    del host
    tol: dict[str, Any] = (
        {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.3, "rtol": 0.05}
    )
    gen = torch.Generator().manual_seed(1)
    for token_slots in CASES.values():
        plan = slots.plan(token_slots)
        n = len(token_slots)
        for layer in range(LAYERS):
            h = torch.randn(n, 16, generator=gen).to(dtype)
            qkv = torch.zeros(n, 32, dtype=dtype, device=cuda)
            slots.apply_qkv(layer, plan, h.to(cuda), qkv)
            qkv_mods = ("q_proj", "k_proj", "v_proj")
            want = torch.cat([_reference(adapters, layer, m, token_slots, h) for m in qkv_mods], 1)
            torch.testing.assert_close(qkv.float().cpu(), want, **tol)
            gu = torch.zeros(n, 48, dtype=dtype, device=cuda)
            slots.apply_gate_up(layer, plan, h.to(cuda), gu)
            gu_mods = ("gate_proj", "up_proj")
            want = torch.cat([_reference(adapters, layer, m, token_slots, h) for m in gu_mods], 1)
            torch.testing.assert_close(gu.float().cpu(), want, **tol)
            act = torch.randn(n, 24, generator=gen).to(dtype)
            for module, x in (("o_proj", h), ("down_proj", act)):
                y = torch.ones(n, 16, dtype=dtype)
                want = _reference(adapters, layer, module, token_slots, x, y)
                y = y.to(cuda)
                slots.apply(layer, module, plan, x.to(cuda), y)
                torch.testing.assert_close(y.float().cpu(), want, **tol)
    torch.cuda.synchronize()


@pytest.mark.timeout(1200)
async def test_fp32_mixed_batch_matches_peft_per_adapter(
    model_dir: Path, adapters: dict[str, Path], hf_model: Any
) -> None:
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    backend = await _started(model_dir, "float32")
    try:
        assert backend.device.type == DEVICE
        launches = _count_triton_launches(backend)
        run = await _mixed_batch(backend, adapters, NEW_TOKENS)
    finally:
        await backend.aclose()
    if DEVICE == "cuda":
        assert launches[0] > 0, "the Triton kernel never ran"
    outputs = set()
    for name in [None, *adapters]:
        ref_tokens, ref_logits, _ = _peft_greedy(
            hf_model, backend._tokenizer, None if name is None else adapters[name], PROMPTS[name]
        )
        assert run.tokens[name] == ref_tokens, f"{name}: tokens differ from PEFT"
        mine = run.logits[f"req-{name or 'base'}"][-1].cpu()
        torch.testing.assert_close(mine, ref_logits[-1], atol=2e-3, rtol=1e-3)
        outputs.add(tuple(ref_tokens))
    assert len(outputs) == len(adapters) + 1, "adapters should change the output"


@pytest.mark.timeout(1200)
async def test_bf16_mixed_batch_tracks_fp32_peft(
    model_dir: Path, adapters: dict[str, Path], hf_model: Any
) -> None:
    backend = await _started(model_dir, "bfloat16")
    try:
        if DEVICE == "cuda":
            assert backend.lora_dtype == torch.bfloat16, "the arena is bf16 on CUDA"
        launches = _count_triton_launches(backend)
        run = await _mixed_batch(backend, adapters, NEW_TOKENS)
    finally:
        await backend.aclose()
    if DEVICE == "cuda":
        assert launches[0] > 0, "the Triton kernel never ran"
    decode_steps_compared = 0
    for name in [None, *adapters]:
        mine_tokens = run.tokens[name]
        assert len(mine_tokens) == NEW_TOKENS, f"{name}: {len(mine_tokens)} tokens"
        ref_tokens, ref_logits, base_first = _peft_greedy(
            hf_model,
            backend._tokenizer,
            None if name is None else adapters[name],
            PROMPTS[name],
            follow=mine_tokens,
        )
        mine = [step.cpu() for step in run.logits[f"req-{name or 'base'}"]]
        assert mine_tokens[0] == ref_tokens[0], f"{name}: first token differs from PEFT fp32"
        same = next(
            (i for i, (a, b) in enumerate(zip(mine_tokens, ref_tokens, strict=False)) if a != b),
            NEW_TOKENS,
        )
        print(f"{name}: {same} of {NEW_TOKENS} greedy tokens equal to PEFT fp32's")
        for step in range(min(same + 1, NEW_TOKENS)):
            err = float((mine[step] - ref_logits[step]).abs().max())
            assert err < 1.5, f"{name} step {step}: bf16 logits off by {err:.2f}"
            decode_steps_compared += step > 0
        if name is not None:
            effect = float((ref_logits[0] - base_first).abs().max())
            err0 = float((mine[0] - ref_logits[0]).abs().max())
            assert effect > 4 * err0, f"{name}: adapter effect {effect:.2f} vs error {err0:.2f}"
    assert decode_steps_compared >= 2 * (len(adapters) + 1)


@pytest.mark.timeout(1200)
async def test_torch_backend_on_the_device_passes_the_conformance_suite(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    from lorapool.backends.torch import TorchBackend

    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    report = await check_backend(
        lambda: TorchBackend(
            model_dir,
            max_slots=2,
            max_rank=32,
            max_batch=8,
            max_seq_len=256,
            dtype="float32",
            device=DEVICE,
        ),
        {name: adapters[name] for name in ("r8-attn", "r16-all", "r32-attn")},
        prefix_tokens=PREFIX_TOKENS,
    )
    assert report.checks == list(ALL_CHECKS)
    assert report.prefix_tokens == PREFIX_TOKENS
