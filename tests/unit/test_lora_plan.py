"""The segmented LoRA matmuls against a plain per-row reference, on small random adapters.

Covers both paths (the C kernel in its AVX-512 and portable builds, PyTorch's
per-slot matmuls), both layouts (each adapter at its own rank, and padded to
``max_rank``), rows without an adapter, uneven groups, unused slots, mixed ranks
and modules, DoRA rows beside LoRA rows, and 16-bit activations and arenas; no
model needed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lorapool.backends.torch.kernel import DEFAULT_FLAGS, SgmvKernel, build_kernel
from lorapool.backends.torch.lora import (
    KERNEL_SEGMENT_ROWS,
    LoraBatch,
    LoraSlots,
    PreparedAdapter,
)

SHAPES = {
    "q_proj": (16, 16),
    "k_proj": (16, 8),
    "v_proj": (16, 8),
    "o_proj": (16, 16),
    "gate_proj": (16, 24),
    "up_proj": (16, 24),
    "down_proj": (24, 16),
}
LAYERS, SLOTS, MAX_RANK = 2, 12, 8


def _adapter(
    name: str, rank: int, modules: list[str], gen: torch.Generator, dora: bool = False
) -> PreparedAdapter:
    a = {m: torch.randn(LAYERS, SHAPES[m][0], rank, generator=gen) for m in modules}
    b = {m: torch.randn(LAYERS, rank, SHAPES[m][1], generator=gen) for m in modules}
    scales = {m: 0.5 + torch.rand(LAYERS, SHAPES[m][1], generator=gen) for m in modules}
    return PreparedAdapter(name, rank, a, b, 0, scales if dora else {})


class CountingKernel:
    """The real kernel, counting its calls so a test knows it ran."""

    def __init__(self, kernel: SgmvKernel) -> None:
        self.path = kernel.path
        self._kernel = kernel
        self.calls = 0

    def sgmv_f32(self, *args: object) -> None:
        self.calls += 1
        self._kernel.sgmv_f32(*args)

    def sgmv_bf16(self, *args: object) -> None:
        self.calls += 1
        self._kernel.sgmv_bf16(*args)


KERNEL_BUILDS = {
    "native": DEFAULT_FLAGS,
    # Without AVX-512 the portable loops are compiled instead of the intrinsics.
    "portable": (*DEFAULT_FLAGS, "-mno-avx512f"),
}


@pytest.fixture(scope="module", params=["torch", *KERNEL_BUILDS])
def kernel(request: pytest.FixtureRequest) -> CountingKernel | None:
    if request.param == "torch":
        return None
    return CountingKernel(build_kernel(flags=KERNEL_BUILDS[request.param]))


def _slots(
    dtype: torch.dtype,
    kernel: CountingKernel | None = None,
    max_rank: int = MAX_RANK,
    padded: bool = False,
) -> tuple[LoraSlots, list[PreparedAdapter]]:
    gen = torch.Generator().manual_seed(0)
    slots = LoraSlots(
        SHAPES,
        LAYERS,
        SLOTS,
        max_rank,
        dtype,
        torch.device("cpu"),
        kernel,  # type: ignore[arg-type]
        padded=padded,
    )
    adapters = []
    for s in range(SLOTS):
        modules = list(SHAPES) if s % 2 == 0 else ["q_proj", "v_proj", "down_proj"]
        rank = (max_rank // 2, max_rank, 1, max_rank // 4)[s % 4]
        prepared = _adapter(f"a{s}", rank=rank, modules=modules, gen=gen, dora=s % 3 == 1)
        # 16-bit stacks hold rounded weights; the reference uses the same rounding.
        prepared = PreparedAdapter(
            prepared.adapter_id,
            prepared.rank,
            {m: t.to(dtype).float() for m, t in prepared.a.items()},
            {m: t.to(dtype).float() for m, t in prepared.b.items()},
            0,
            {m: t.to(dtype).float() for m, t in prepared.dora.items()},
        )
        slots.copy_in(s, prepared)
        adapters.append(prepared)
    return slots, adapters


def _reference(
    adapters: list[PreparedAdapter],
    layer: int,
    module: str,
    token_slots: list[int],
    x: torch.Tensor,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``y`` (zeros when not given) becomes: ``y + x A B`` per row, times the DoRA
    scale for a DoRA adapter's rows."""
    out = torch.zeros(len(token_slots), SHAPES[module][1]) if y is None else y.float().clone()
    for i, s in enumerate(token_slots):
        if s >= 0 and module in adapters[s].a:
            out[i] += x[i].float() @ adapters[s].a[module][layer] @ adapters[s].b[module][layer]
            if module in adapters[s].dora:
                out[i] *= adapters[s].dora[module][layer]
    return out


CASES = {
    "even, every row adapted": [s for s in range(SLOTS) for _ in range(3)],
    "interleaved": [i % SLOTS for i in range(2 * SLOTS)],
    "rows without adapter": [0, -1, 1, 2, -1, 3, 4, 5, 0, 1, 2, 3],
    "full span plus base rows": [0, 1, 2, 3, 4, 5, -1, -1],
    "unused slot in the span": [0, 0, 2, 2, 3, 3, 5, 5, -1],
    "one big group": [1] * 10 + [4, -1],
    "spread-out slots": [0] * 10 + [11] * 9 + [5] * 10 + [-1, -1],
    "spread-out slots, every row adapted": [0, 11, 6] * 10,
    "very uneven groups": [0] * 40 + [1, 7, 3, -1],
    "single adapter": [3, -1, 3, 3],
}


DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16 activations, fp32 stacks": (torch.bfloat16, torch.float32),
    # The kernel takes fp32 and bf16 activations only: fp16 runs PyTorch's path on
    # stacks laid out for the kernel (B in panels).
    "fp16 activations, fp32 stacks": (torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
}


@pytest.mark.parametrize("layout", ["paged", "padded"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_per_row_reference(
    case: str, dtypes: str, layout: str, kernel: CountingKernel | None
) -> None:
    token_slots = CASES[case]
    dtype, stack_dtype = DTYPES[dtypes]
    slots, adapters = _slots(stack_dtype, kernel, padded=layout == "padded")
    plan = slots.plan(token_slots)
    runs_kernel = kernel is not None and stack_dtype == torch.float32 and dtype != torch.float16
    calls = kernel.calls if kernel is not None else 0
    n = len(token_slots)
    gen = torch.Generator().manual_seed(1)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.3, "rtol": 0.05}
    for layer in range(LAYERS):
        h = torch.randn(n, 16, generator=gen).to(dtype)
        qkv = torch.zeros(n, 32, dtype=dtype)
        slots.apply_qkv(layer, plan, h, qkv)
        qkv_modules = ("q_proj", "k_proj", "v_proj")
        want = torch.cat([_reference(adapters, layer, m, token_slots, h) for m in qkv_modules], 1)
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
    if kernel is not None:
        # Four projection groups per layer, each one call when the kernel runs the plan.
        assert kernel.calls - calls == (4 * LAYERS if runs_kernel else 0)


def test_each_adapter_takes_its_own_bytes_and_padding_takes_max_rank() -> None:
    """The paged arena holds each adapter at its rank and modules; the padded layout (the
    old one) holds every adapter at max_rank over every module: the same results."""
    paged, adapters = _slots(torch.float32)
    padded, _ = _slots(torch.float32, padded=True)
    own = sum(paged.adapter_nbytes(a) for a in adapters)
    assert paged.used_bytes == own
    raw = sum(t.nbytes for a in adapters for d in (a.a, a.b, a.dora) for t in d.values())
    assert raw <= own <= 1.1 * raw + 64 * 4 * len(SHAPES) * LAYERS * SLOTS  # alignment only
    assert padded.used_bytes == sum(padded.adapter_nbytes(a) for a in adapters)
    assert len({padded.adapter_nbytes(a) for a in adapters if not a.dora}) == 1, "max_rank each"
    assert padded.used_bytes > 2 * paged.used_bytes
    token_slots = CASES["interleaved"]
    x = torch.randn(len(token_slots), 24)
    ys = [torch.zeros(len(token_slots), 16) for _ in range(2)]
    for slots, y in zip((paged, padded), ys, strict=True):
        slots.apply(1, "down_proj", slots.plan(token_slots), x, y)
    torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-5)


def test_random_plans_match_reference() -> None:
    rng = random.Random(7)
    slots, adapters = _slots(torch.float32)
    for _ in range(40):
        token_slots = [rng.choice([-1, *range(SLOTS)]) for _ in range(rng.randint(1, 20))]
        plan = LoraBatch(token_slots, torch.device("cpu"))
        x = torch.randn(len(token_slots), 24)
        y = torch.zeros(len(token_slots), 16)
        slots.apply(1, "down_proj", plan, x, y)
        want = _reference(adapters, 1, "down_proj", token_slots, x)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build", list(KERNEL_BUILDS))
def test_kernel_matches_torch_on_random_plans_and_wide_ranks(build: str) -> None:
    """Rank 32 makes the q/k/v shrink 96 columns wide: two register tiles, one masked."""
    kernel = CountingKernel(build_kernel(flags=KERNEL_BUILDS[build]))
    slots, adapters = _slots(torch.float32, kernel, max_rank=32)
    rng = random.Random(11)
    for _ in range(30):
        n = rng.randint(1, 40)
        token_slots = [rng.choice([-1, *range(SLOTS)]) for _ in range(n)]
        x = torch.randn(n, 16)
        for segments in (True, False):
            plan = LoraBatch(token_slots, torch.device("cpu"), segments=segments)
            qkv = torch.randn(n, 32)
            before = qkv.clone()
            slots.apply_qkv(0, plan, x, qkv)
            cols = {"q_proj": (0, 16), "k_proj": (16, 24), "v_proj": (24, 32)}
            want = torch.cat(
                [
                    _reference(adapters, 0, m, token_slots, x, before[:, lo:hi])
                    for m, (lo, hi) in cols.items()
                ],
                1,
            )
            torch.testing.assert_close(qkv, want, atol=1e-4, rtol=1e-4)
    assert kernel.calls > 0


def test_kernel_takes_prefill_sized_groups() -> None:
    """Large groups (a prefill) go to the kernel too: it beat PyTorch's matmuls there."""
    big = 1000
    plan = LoraBatch([0] * big + [1, -1], torch.device("cpu"), segments=True)
    assert plan.segments is not None
    assert plan._loop is None, "PyTorch's per-slot groups are only made on demand"
    # Each slot's tokens in pieces of KERNEL_SEGMENT_ROWS, so one adapter spreads over threads.
    assert plan.segments.count == big // KERNEL_SEGMENT_ROWS + 1
    assert plan.segments.slot.tolist() == [0] * (plan.segments.count - 1) + [1]
    assert plan.segments.tok.tolist() == [*range(big), big]
    assert LoraBatch([0] * big, torch.device("cpu")).segments is None


def test_kernel_layout_round_trips_every_module() -> None:
    """With the kernel, B sits in 16-column panels; weights() reads back what copy_in
    wrote, and a slot taken over by a smaller adapter holds only the new one."""
    slots, adapters = _slots(torch.float32, CountingKernel(build_kernel()))
    plain, _ = _slots(torch.float32)
    for s, adapter in enumerate(adapters):
        for module in SHAPES:
            for layer in range(LAYERS):
                a, b = slots.weights(s, layer, module)
                if module not in adapter.a:
                    assert a.numel() == 0 and b.numel() == 0
                    continue
                torch.testing.assert_close(a, adapter.a[module][layer], atol=0, rtol=0)
                torch.testing.assert_close(b, adapter.b[module][layer], atol=0, rtol=0)
                _, pb = plain.weights(s, layer, module)
                torch.testing.assert_close(pb, b, atol=0, rtol=0)
    gen = torch.Generator().manual_seed(9)
    small = _adapter("small", 2, ["k_proj"], gen)
    before = slots.used_bytes
    slots.copy_in(1, small)  # slot 1 held a rank-8 adapter on q, v and down
    assert slots.used_bytes == before - slots.adapter_nbytes(adapters[1]) + slots.adapter_nbytes(
        small
    )
    for module in SHAPES:
        a, b = slots.weights(1, 0, module)
        if module == "k_proj":
            torch.testing.assert_close(b, small.b[module][0], atol=0, rtol=0)
            torch.testing.assert_close(a, small.a[module][0], atol=0, rtol=0)
        else:
            assert a.numel() == 0 and b.numel() == 0, module


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_kernel_shares_pytorchs_openmp_runtime() -> None:
    """Two OpenMP runtimes would each keep spinning threads on the same cores."""
    build_kernel()
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


def test_kernel_refuses_tensors_that_do_not_fit_the_plan() -> None:
    """The kernel indexes raw pointers; a mismatched call must fail before it runs."""
    kernel = CountingKernel(build_kernel())
    slots, _ = _slots(torch.float32, kernel)
    plan = slots.plan([0, 1, 2, 3])
    with pytest.raises(ValueError, match="indexes token 3"):
        slots.apply(0, "o_proj", plan, torch.randn(3, 16), torch.zeros(3, 16))
    with pytest.raises(ValueError, match="do not fit"):
        slots.apply(0, "o_proj", plan, torch.randn(4, 24), torch.zeros(4, 16))
    assert kernel.calls == 0


@pytest.mark.parametrize("build", list(KERNEL_BUILDS))
def test_kernel_bf16_output_is_rounded_once_to_nearest_even(build: str) -> None:
    """bf16 rows: y = bf16(float(y) + delta), as PyTorch's add of an fp32 delta rounds."""
    kernel = CountingKernel(build_kernel(flags=KERNEL_BUILDS[build]))
    slots, adapters = _slots(torch.float32, kernel)
    token_slots = [i % SLOTS for i in range(2 * SLOTS)] + [-1]
    n = len(token_slots)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 24, generator=gen).to(torch.bfloat16)
    y = (torch.randn(n, 16, generator=gen) * 4).to(torch.bfloat16)
    y0 = y.clone()
    want = _reference(adapters, 1, "down_proj", token_slots, x, y).to(torch.bfloat16)
    slots.apply(1, "down_proj", slots.plan(token_slots), x, y)
    assert kernel.calls == 1
    exact = (y == want).float().mean().item()
    # The delta itself is summed in fp32 in another order: a rare last-bit tie may differ.
    assert exact > 0.98, exact
    torch.testing.assert_close(y.float(), want.float(), atol=0, rtol=2**-7)
    assert torch.equal(y[-1], y0[-1]), "a row without an adapter must be left as it was"
