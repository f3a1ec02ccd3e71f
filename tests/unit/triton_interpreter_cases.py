"""The Triton LoRA kernel through Triton's interpreter, on CPU tensors, against the
per-row reference of ``test_lora_plan.py`` for every plan shape it covers.

Not collected by itself (no ``test_`` prefix): ``test_triton_lora.py`` runs this file
in a child pytest with ``TRITON_INTERPRET=1``, which Triton reads once, at import, so
it must be set before anything in the process imports triton.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by test_triton_lora.py with TRITON_INTERPRET=1", allow_module_level=True)

from lorapool.backends.torch.lora import LoraBatch, LoraSlots, PreparedAdapter
from lorapool.backends.torch.triton_lora import TritonLora

from .test_lora_plan import CASES, LAYERS, SHAPES, SLOTS, _adapter, _reference, _slots

# Small tiles so the tiny shapes still take several output tiles and shrink steps (the
# widest module, 24 columns, is two 16-column tiles; a 24-wide input two masked steps).
BLOCKS = {"block_n": 16, "block_k": 16}


class Counting(TritonLora):
    """The kernel, counting the groups it ran (``run`` returned ``True``)."""

    def __init__(self, slots: LoraSlots) -> None:
        super().__init__(slots, **BLOCKS)
        self.launches = 0

    def run(self, *args: Any) -> bool:
        ran = super().run(*args)
        self.launches += ran
        return ran


def _triton_slots(
    stack_dtype: torch.dtype, max_rank: int = 8, padded: bool = False
) -> tuple[LoraSlots, list[PreparedAdapter], Counting]:
    slots, adapters = _slots(stack_dtype, None, max_rank=max_rank, padded=padded)
    kernel = Counting(slots)
    slots.triton = kernel
    return slots, adapters, kernel


DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16 activations, fp32 stacks": (torch.bfloat16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
}
"""(activations, arena): the engine's pairs on CUDA are fp32/fp32 and bf16/bf16."""


def _check_plan(
    slots: LoraSlots,
    adapters: list[PreparedAdapter],
    token_slots: list[int],
    dtype: torch.dtype,
) -> None:
    """Every group of every layer against the reference, as test_lora_plan checks them."""
    plan = slots.plan(token_slots)
    assert plan.segments is not None, "a plan for the Triton kernel carries segments"
    n = len(token_slots)
    gen = torch.Generator().manual_seed(1)
    tol: dict[str, Any] = (
        {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.3, "rtol": 0.05}
    )
    for layer in range(LAYERS):
        h = torch.randn(n, 16, generator=gen).to(dtype)
        qkv = torch.zeros(n, 32, dtype=dtype)
        slots.apply_qkv(layer, plan, h, qkv)
        want = torch.cat(
            [
                _reference(adapters, layer, m, token_slots, h)
                for m in ("q_proj", "k_proj", "v_proj")
            ],
            1,
        )
        torch.testing.assert_close(qkv.float(), want, **tol)

        gu = torch.zeros(n, 48, dtype=dtype)
        slots.apply_gate_up(layer, plan, h, gu)
        want = torch.cat(
            [_reference(adapters, layer, m, token_slots, h) for m in ("gate_proj", "up_proj")], 1
        )
        torch.testing.assert_close(gu.float(), want, **tol)

        act = torch.randn(n, 24, generator=gen).to(dtype)
        for module, x in (("o_proj", h), ("down_proj", act)):
            y = torch.ones(n, 16, dtype=dtype)
            want = _reference(adapters, layer, module, token_slots, x, y)
            slots.apply(layer, module, plan, x, y)
            torch.testing.assert_close(y.float(), want, **tol)


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_per_row_reference(case: str, dtypes: str) -> None:
    """Mixed ranks (1 to 8), adapters missing modules, DoRA rows beside LoRA rows, rows
    without an adapter: each adapter at its own rank in the arena."""
    dtype, stack_dtype = DTYPES[dtypes]
    slots, adapters, kernel = _triton_slots(stack_dtype)
    _check_plan(slots, adapters, CASES[case], dtype)
    assert kernel.launches == 4 * LAYERS, "every group went to the kernel"


@pytest.mark.parametrize("case", ["interleaved", "rows without adapter", "very uneven groups"])
def test_padded_layout_matches_reference(case: str) -> None:
    """The padded layout: every adapter at max_rank over every module, zeros and unit
    DoRA scales where it has nothing."""
    slots, adapters, kernel = _triton_slots(torch.float32, padded=True)
    _check_plan(slots, adapters, CASES[case], torch.float32)
    assert kernel.launches == 4 * LAYERS


def test_wide_ranks_and_random_plans_onto_nonzero_outputs() -> None:
    """Rank 32: two rank steps of 16 per program, the q/k/v shrink 96 columns wide."""
    slots, adapters, kernel = _triton_slots(torch.float32, max_rank=32)
    rng = random.Random(11)
    for _ in range(4):
        n = rng.randint(1, 40)
        token_slots = [rng.choice([-1, *range(SLOTS)]) for _ in range(n)]
        x = torch.randn(n, 16)
        qkv = torch.randn(n, 32)
        before = qkv.clone()
        slots.apply_qkv(0, slots.plan(token_slots), x, qkv)
        cols = {"q_proj": (0, 16), "k_proj": (16, 24), "v_proj": (24, 32)}
        want = torch.cat(
            [
                _reference(adapters, 0, m, token_slots, x, before[:, lo:hi])
                for m, (lo, hi) in cols.items()
            ],
            1,
        )
        torch.testing.assert_close(qkv, want, atol=1e-4, rtol=1e-4)
    assert kernel.launches == 4


def test_strided_rows_and_a_plan_not_made_by_the_slots() -> None:
    """x and y as column slices of wider tensors (row strides the kernel must use), and
    a LoraBatch built by hand with segments."""
    slots, adapters, kernel = _triton_slots(torch.float32)
    token_slots = [0, 11, 6, -1, 6, 3] * 3
    n = len(token_slots)
    wide_x = torch.randn(n, 40)
    wide_y = torch.randn(n, 30)
    x, y = wide_x[:, 8:32], wide_y[:, 4:20]
    want = _reference(adapters, 1, "down_proj", token_slots, x, y)
    outside = wide_y.clone()
    slots.apply(1, "down_proj", LoraBatch(token_slots, torch.device("cpu"), segments=True), x, y)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wide_y[:, :4], outside[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(wide_y[:, 20:], outside[:, 20:], atol=0, rtol=0)
    assert kernel.launches == 1


def test_descriptors_follow_loads_replacements_and_compaction() -> None:
    """The kernel's device copy of the descriptors follows copy_in and clear: a replaced
    slot serves its new adapter, a cleared one nothing, and blocks a compaction moved
    are read where they went."""
    gen = torch.Generator().manual_seed(3)
    first = [
        _adapter("a0", 4, list(SHAPES), gen),
        _adapter("a1", 8, list(SHAPES), gen, dora=True),
        _adapter("a2", 4, ["q_proj", "down_proj"], gen),
    ]
    big = _adapter("big", 8, list(SHAPES), gen, dora=True)
    probe = LoraSlots(SHAPES, LAYERS, 4, 8, torch.float32, torch.device("cpu"))
    n0, n1, n2, nb = (probe.adapter_nbytes(a) for a in (*first, big))
    # Room for a1, a2 and big: once a0 goes, big fits only with the holes joined.
    slots = LoraSlots(
        SHAPES, LAYERS, 4, 8, torch.float32, torch.device("cpu"), capacity_bytes=n1 + n2 + nb
    )
    kernel = Counting(slots)
    slots.triton = kernel
    adapters: list[PreparedAdapter | None] = [*first, None]
    for s, a in enumerate(first):
        slots.copy_in(s, a)
    token_slots = [1, 2, 0, 1, -1, 3, 2]
    n = len(token_slots)
    x = torch.randn(n, 24, generator=gen)

    def check(layer: int) -> None:
        present = [a if a is not None else PreparedAdapter("-", 1, {}, {}, 0, {}) for a in adapters]
        y = torch.zeros(n, 16)
        slots.apply(layer, "down_proj", slots.plan(token_slots), x, y)
        want = _reference(present, layer, "down_proj", token_slots, x)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)

    check(0)
    replacement = _adapter("a2-new", 3, ["down_proj"], gen, dora=True)
    slots.copy_in(2, replacement)
    adapters[2] = replacement
    check(1)
    itemsize = 4
    assert slots.arena.blocks()[1][0] == n0 // itemsize, "a1 right after a0"
    slots.clear(0)
    adapters[0] = None
    slots.copy_in(3, big)
    adapters[3] = big
    assert slots.arena.blocks()[0] == (0, n1 // itemsize), "a1 slid down: a compaction"
    check(1)
    assert kernel.launches == 3


def test_bf16_output_is_rounded_once_and_other_rows_kept() -> None:
    """bf16 rows: y = bf16(float(y) + delta), as PyTorch's add of an fp32 delta rounds;
    rows without an adapter are left as they were."""
    slots, adapters, kernel = _triton_slots(torch.float32)
    token_slots = [i % SLOTS for i in range(2 * SLOTS)] + [-1]
    n = len(token_slots)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 24, generator=gen).to(torch.bfloat16)
    y = (torch.randn(n, 16, generator=gen) * 4).to(torch.bfloat16)
    y0 = y.clone()
    want = _reference(adapters, 1, "down_proj", token_slots, x, y).to(torch.bfloat16)
    slots.apply(1, "down_proj", slots.plan(token_slots), x, y)
    assert kernel.launches == 1
    exact = (y == want).float().mean().item()
    assert exact > 0.98, exact
    torch.testing.assert_close(y.float(), want.float(), atol=0, rtol=2**-7)
    assert torch.equal(y[-1], y0[-1])
