"""The LoRA arena: adapters at their own size, loads and evictions in any order, no leaks.

A hypothesis state machine loads adapters of random ranks and modules into random slots
(replacing what is there), clears slots, and checks after every step that the arena's
bookkeeping adds up (used bytes are exactly the residents' own blocks, blocks never
overlap, free room plus used is the capacity) and that every resident adapter still
reads back exactly what was loaded, through the compactions that fragmented loads force.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lorapool.backends.torch.arena import ALIGN, Arena
from lorapool.backends.torch.lora import LoraSlots, PreparedAdapter

SHAPES = {
    "q_proj": (16, 16),
    "k_proj": (16, 8),
    "v_proj": (16, 8),
    "o_proj": (16, 16),
    "gate_proj": (16, 24),
    "up_proj": (16, 24),
    "down_proj": (24, 16),
}
LAYERS, SLOTS, MAX_RANK = 2, 8, 16
RANKS = (1, 2, 4, 8, 16)


def _adapter(name: str, rank: int, modules: list[str], seed: int, dora: bool) -> PreparedAdapter:
    gen = torch.Generator().manual_seed(seed)
    a = {m: torch.randn(LAYERS, SHAPES[m][0], rank, generator=gen) for m in modules}
    b = {m: torch.randn(LAYERS, rank, SHAPES[m][1], generator=gen) for m in modules}
    scales = {m: torch.rand(LAYERS, SHAPES[m][1], generator=gen) for m in modules}
    return PreparedAdapter(name, rank, a, b, 0, scales if dora else {})


def _check(slots: LoraSlots, resident: dict[int, PreparedAdapter]) -> None:
    arena = slots.arena
    blocks = arena.blocks()
    assert slots.used_bytes == sum(slots.adapter_nbytes(p) for p in resident.values())
    assert len(blocks) == len(resident)
    assert arena.used + sum(size for _, size in arena.holes()) == arena.capacity
    end = 0
    for offset, size in blocks:
        assert offset >= end and offset % ALIGN == 0 and size % ALIGN == 0
        end = offset + size
    assert end <= arena.capacity
    for slot in range(SLOTS):
        want = resident.get(slot)
        assert slots.occupant[slot] == (want.adapter_id if want else None)
        for module in SHAPES:
            a, b = slots.weights(slot, LAYERS - 1, module)
            if want is None or module not in want.a:
                assert a.numel() == 0
                continue
            assert torch.equal(a, want.a[module][-1]) and torch.equal(b, want.b[module][-1])
            scale = slots.dora_scale(slot, LAYERS - 1, module)
            if want.dora:
                assert scale is not None and torch.equal(scale, want.dora[module][-1])
            else:
                assert scale is None


class ArenaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Room for about three rank-16 all-module adapters: loads must evict and compact.
        probe = LoraSlots(SHAPES, LAYERS, 1, MAX_RANK, torch.float32, torch.device("cpu"))
        big = probe.adapter_nbytes(_adapter("x", MAX_RANK, list(SHAPES), 0, True))
        self.slots = LoraSlots(
            SHAPES,
            LAYERS,
            SLOTS,
            MAX_RANK,
            torch.float32,
            torch.device("cpu"),
            capacity_bytes=3 * big,
        )
        self.resident: dict[int, PreparedAdapter] = {}
        self.count = 0

    @rule(
        slot=st.integers(0, SLOTS - 1),
        rank=st.sampled_from(RANKS),
        modules=st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, unique=True),
        dora=st.booleans(),
    )
    def load(self, slot: int, rank: int, modules: list[str], dora: bool) -> None:
        self.count += 1
        prepared = _adapter(f"a{self.count}", rank, modules, self.count, dora)
        need = self.slots.adapter_nbytes(prepared)
        old = self.resident.get(slot)
        room = self.slots.free_bytes + (self.slots.adapter_nbytes(old) if old else 0)
        if need > room:
            before = self.slots.arena.blocks()
            with pytest.raises(MemoryError, match="needs"):
                self.slots.copy_in(slot, prepared)
            assert self.slots.arena.blocks() == before, "a refused load changes nothing"
            return
        self.slots.copy_in(slot, prepared)
        self.resident[slot] = prepared

    @rule(slot=st.integers(0, SLOTS - 1))
    def clear(self, slot: int) -> None:
        self.slots.clear(slot)
        self.resident.pop(slot, None)

    @invariant()
    def consistent(self) -> None:
        _check(self.slots, self.resident)


ArenaMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=50, deadline=None, derandomize=True
)
test_arena_machine = ArenaMachine.TestCase


def test_a_thousand_loads_of_random_ranks_leak_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 loads and evictions of random ranks in a tight arena (compactions happen):
    every byte comes back, and what stays resident stays exact."""
    compactions = []
    compact = LoraSlots._compact
    monkeypatch.setattr(LoraSlots, "_compact", lambda self: (compactions.append(1), compact(self)))
    rng = random.Random(3)
    slots = LoraSlots(
        SHAPES, LAYERS, SLOTS, MAX_RANK, torch.float32, torch.device("cpu"), capacity_bytes=90_000
    )
    resident: dict[int, PreparedAdapter] = {}
    refused = 0
    for i in range(1000):
        slot = rng.randrange(SLOTS)
        if rng.random() < 0.3:
            slots.clear(slot)
            resident.pop(slot, None)
            continue
        modules = rng.sample(sorted(SHAPES), rng.randint(1, len(SHAPES)))
        prepared = _adapter(f"a{i}", rng.choice(RANKS), modules, i, rng.random() < 0.3)
        try:
            slots.copy_in(slot, prepared)
        except MemoryError:
            refused += 1
            continue
        resident[slot] = prepared
        if i % 50 == 0:
            _check(slots, resident)
    _check(slots, resident)
    for slot in range(SLOTS):
        slots.clear(slot)
    assert slots.used_bytes == 0 and slots.arena.holes() == [(0, slots.arena.capacity)]
    assert refused < 500, "the budget should hold most mixes"
    assert compactions, "the mix should have split the free room at least once"


def test_arena_first_fit_and_compaction_moves() -> None:
    arena = Arena(10 * ALIGN)
    a = arena.alloc(3 * ALIGN)
    b = arena.alloc(2 * ALIGN - 1)  # rounded up
    c = arena.alloc(ALIGN)
    assert (a, b, c) == (0, 3 * ALIGN, 5 * ALIGN)
    assert arena.alloc(5 * ALIGN) is None
    arena.release(b)
    assert arena.alloc(5 * ALIGN) is None, "free room split in two holes"
    moves = arena.compact()
    assert [(m.src, m.dst, m.size) for m in moves] == [(5 * ALIGN, 3 * ALIGN, ALIGN)]
    assert arena.alloc(5 * ALIGN) == 4 * ALIGN
    assert arena.free == ALIGN
    with pytest.raises(KeyError):
        arena.release(123)


def test_a_load_that_fails_part_way_leaves_every_resident_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure while compacting (after some blocks moved) or while writing the new block
    leaves the books and the bytes agreeing: every resident reads back what was loaded,
    the replaced occupant is kept when it did not have to go, and a later load works."""
    probe = LoraSlots(SHAPES, LAYERS, 1, MAX_RANK, torch.float32, torch.device("cpu"))
    resident = {s: _adapter(f"a{s}", 4, list(SHAPES), s, s == 2) for s in range(6)}
    full = sum(probe.adapter_nbytes(p) for p in resident.values())
    slots = LoraSlots(
        SHAPES, LAYERS, SLOTS, MAX_RANK, torch.float32, torch.device("cpu"), capacity_bytes=full
    )
    for s, p in resident.items():
        slots.copy_in(s, p)
    for s in (0, 2, 4):  # three holes of one unit each
        slots.clear(s)
        del resident[s]
    _check(slots, resident)
    big = _adapter("big", 8, list(SHAPES), 99, False)  # about two units: needs a compaction
    moves = []
    real_move = slots.arena.move

    def failing_move(src: int, dst: int) -> None:
        if moves:
            raise RuntimeError("copy failed")
        moves.append((src, dst))
        real_move(src, dst)

    monkeypatch.setattr(slots.arena, "move", failing_move)
    with pytest.raises(RuntimeError, match="copy failed"):
        slots.copy_in(0, big)
    assert moves, "one block moved before the failure"
    _check(slots, resident)
    monkeypatch.undo()
    # A failure writing the new block keeps the slot's occupant, which had not had to go.
    small = _adapter("small", 1, ["q_proj"], 7, False)
    monkeypatch.setattr(slots, "_write", lambda *a: (_ for _ in ()).throw(RuntimeError("write")))
    with pytest.raises(RuntimeError, match="write"):
        slots.copy_in(1, small)
    _check(slots, resident)
    monkeypatch.undo()
    slots.copy_in(0, big)
    resident[0] = big
    _check(slots, resident)
