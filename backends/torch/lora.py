"""Device slots holding LoRA weights at each adapter's own rank, and the mixed-adapter matmuls.

All resident adapters live in one flat tensor, the *arena* (:mod:`.arena`): each
adapter in one contiguous block of its own size, laid out by :class:`ImageLayout`.
A block repeats one stretch per layer; in it, for each projection group the
adapter targets (``q/k/v``, ``gate/up``, ``o``, ``down``), ``A^T`` of the targeted
modules side by side as ``[in, n * r]`` (they share their input, so one shrink
serves them), then each targeted module's ``scale * B^T`` (in 16-column panels
``[ceil(out / 16), r, 16]`` for the C kernel, ``[r, out]`` otherwise), then, for a
DoRA adapter, each module's output scale ``[out]``. An adapter of rank 8 in a pool
built for ``max_rank=64`` takes and reads an eighth of the bytes a rank-64 one
does; ``max_rank`` only caps what may be loaded. ``padded=True`` keeps the old
layout for comparison: every adapter at ``max_rank`` over every module, zero-filled.

A *slot* is a small descriptor (where the slot's adapter sits in the arena, its
rank, which modules it has), one row per layer and group of :attr:`LoraSlots.desc`.
Loading writes a block and its descriptors between forward passes; when the free
room is split into holes too small for the new block, the arena is compacted first
(the blocks slide together, their descriptors follow).

A forward pass gets one :class:`LoraBatch` plan (which token uses which slot). On
CPU with the C kernel (``kernel.py``), one kernel call per projection group does
every slot's shrink, expand, DoRA scale and add, each slot at its own rank.
On CUDA with Triton, its kernel (``triton_lora.py``) does the same in one launch per
group. Otherwise (no compiler, no Triton, fp16 activations on CPU) one matmul per slot
and side on views of the arena, again at the slot's own rank.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from .arena import Arena, rounded
from .kernel import DESC_FIELDS, MAX_MODULES, SgmvGroup, SgmvKernel
from .layout import GROUP_OF, GROUPS, GroupPiece, ImageLayout, panels
from .prepare import PreparedAdapter, prepare_adapter

if TYPE_CHECKING:
    from .triton_lora import TritonLora

__all__ = [
    "KERNEL_SEGMENT_ROWS",
    "ImageLayout",
    "LoraBatch",
    "LoraSlots",
    "PreparedAdapter",
    "prepare_adapter",
]

KERNEL_SEGMENT_ROWS = 4
"""A slot's tokens are cut into kernel segments of at most this many, so that one
adapter's rows spread over the threads (the later segments read its weights from
cache) and each segment's rows fit one register tile."""

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
"""Activation dtypes the C kernel takes."""


@dataclass(frozen=True)
class _Segments:
    """The C kernel's view of a plan: tokens sorted by slot, in segments of one slot each
    and at most :data:`KERNEL_SEGMENT_ROWS` tokens."""

    count: int
    ptr: torch.Tensor
    slot: torch.Tensor
    tok: torch.Tensor
    tokens: int
    rows: int
    """One past the highest token index."""
    addresses: tuple[int, int, int]
    """``ptr``, ``slot`` and ``tok``'s data pointers, read once per pass."""

    @classmethod
    def build(cls, groups: dict[int, list[int]]) -> _Segments:
        ptr = [0]
        tok: list[int] = []
        slots: list[int] = []
        for s in sorted(groups):
            members = groups[s]
            for i in range(0, len(members), KERNEL_SEGMENT_ROWS):
                tok.extend(members[i : i + KERNEL_SEGMENT_ROWS])
                ptr.append(len(tok))
                slots.append(s)
        ptr_t, slot_t, tok_t = (torch.tensor(v, dtype=torch.int32) for v in (ptr, slots, tok))
        addresses = (ptr_t.data_ptr(), slot_t.data_ptr(), tok_t.data_ptr())
        return cls(len(slots), ptr_t, slot_t, tok_t, len(tok), max(tok) + 1, addresses)


class LoraBatch:
    """Which tokens of a forward pass use which slot, grouped by slot.

    With ``segments=True`` (a plan for :class:`LoraSlots` with the C or Triton kernel)
    the kernel's segments are made too; :attr:`loop` (each slot's tokens, as a slice when
    they are contiguous) serves PyTorch's path.
    """

    def __init__(
        self, token_slots: list[int], device: torch.device, *, segments: bool = False
    ) -> None:
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(token_slots):
            if s >= 0:
                groups.setdefault(s, []).append(i)
        self.slots = sorted(groups)
        self.num_tokens = sum(len(v) for v in groups.values())
        self.segments: _Segments | None = None
        """Set when a kernel can run this plan."""
        self._groups = groups
        self._device = device
        self._loop: list[tuple[int, torch.Tensor | slice]] | None = None
        if self.slots and segments:
            self.segments = _Segments.build(groups)

    @property
    def loop(self) -> list[tuple[int, torch.Tensor | slice]]:
        """``(slot, its tokens)`` for PyTorch's path, made on first use."""
        if self._loop is None:
            self._loop = []
            for s in self.slots:
                idx = self._groups[s]
                if idx[-1] - idx[0] + 1 == len(idx):
                    self._loop.append((s, slice(idx[0], idx[-1] + 1)))
                else:
                    self._loop.append((s, torch.tensor(idx, dtype=torch.long, device=self._device)))
        return self._loop

    @property
    def distinct(self) -> int:
        """Distinct adapters in this forward pass."""
        return len(self.slots)


class _KernelGroup(NamedTuple):
    record: SgmvGroup
    """Held here so the memory behind ``address`` lives as long as the stacks."""
    address: int
    """Where ``record`` lives, passed as the kernel's first argument."""
    in_dim: int
    width: int
    """Columns of the group's fused output."""


class _Resident(NamedTuple):
    adapter_id: str
    offset: int
    layout: ImageLayout


class LoraSlots:
    """``max_slots`` adapters for every LoRA-able linear, in an arena of ``capacity_bytes``.

    ``capacity_bytes`` defaults to what ``max_slots`` adapters at ``max_rank`` over
    every module (DoRA included) take, so any ``max_slots`` adapters fit; a smaller
    budget holds as many adapters as their own sizes allow (:meth:`adapter_nbytes`).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        kernel: SgmvKernel | None = None,
        *,
        capacity_bytes: int | None = None,
        padded: bool = False,
    ) -> None:
        self.shapes = shapes
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.padded = padded
        """Every adapter laid out at ``max_rank`` over every module (the old layout)."""
        self.kernel = kernel if device.type == "cpu" and dtype == torch.float32 else None
        """The C kernel, used for fp32 stacks on CPU when one was given."""
        self._itemsize = torch.empty(0, dtype=dtype).element_size()
        if capacity_bytes is None:
            capacity_bytes = (
                max_slots
                * self._itemsize
                * self._layout(max_rank, frozenset(shapes), dora=True).size
            )
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, not {capacity_bytes}")
        self.arena = Arena(capacity_bytes // self._itemsize)
        self.memory = torch.zeros(self.arena.capacity, dtype=dtype, device=device)
        """The arena's storage: every resident adapter's weights."""
        self.occupant: list[str | None] = [None] * max_slots
        self._resident: dict[int, _Resident] = {}
        self.desc_version = 0
        """Moves whenever :attr:`desc` changes (the Triton kernel keeps a device copy)."""
        self.desc = torch.full(
            (num_layers, len(GROUPS), max_slots, DESC_FIELDS), -1, dtype=torch.int64
        )
        """Per layer, group and slot, the kernel's descriptor (``sgmv.c``): block offsets,
        width, rank; ``-1`` where the slot has nothing."""
        # Each group's modules as column blocks of its fused output.
        self._columns: dict[str, list[tuple[str, int, int]]] = {}
        for group, modules in GROUPS.items():
            start = 0
            self._columns[group] = []
            for m in modules:
                self._columns[group].append((m, start, start + shapes[m][1]))
                start += shapes[m][1]
        self._group_index = {g: i for i, g in enumerate(GROUPS)}
        self._kernel_groups = self._bind_kernel() if self.kernel is not None else {}
        self._scratch = torch.empty(0, dtype=torch.float32)
        self._scratch_addr = 0
        self._work = torch.empty(0, dtype=torch.float32)
        self._widest = max(max(shape) for shape in shapes.values())
        self._widest_rank = max(len(ms) for ms in GROUPS.values()) * max_rank
        """Scratch columns per token: the widest group's shrunk activations."""
        self._threads = torch.get_num_threads()
        self.triton: TritonLora | None = _triton_kernel(self) if device.type == "cuda" else None
        """The Triton kernel (``triton_lora.py``), used on CUDA when triton imports."""

    # -- memory ------------------------------------------------------------------------

    def _layout(self, rank: int, modules: frozenset[str], dora: bool) -> ImageLayout:
        if self.padded:
            rank, modules = self.max_rank, frozenset(self.shapes)
        return ImageLayout.build(
            self.shapes, self.num_layers, rank, modules, dora, self.kernel is not None
        )

    def layout_of(self, prepared: PreparedAdapter) -> ImageLayout:
        """The block ``prepared`` takes in this arena."""
        return self._layout(prepared.rank, frozenset(prepared.a), bool(prepared.dora))

    def adapter_nbytes(self, prepared: PreparedAdapter) -> int:
        """Bytes of the arena ``prepared`` takes when loaded (its block, aligned)."""
        return max(rounded(self.layout_of(prepared).size), 16) * self._itemsize

    @property
    def nbytes(self) -> int:
        """Device memory the arena holds (its capacity)."""
        return self.memory.nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the arena resident adapters take."""
        return self.arena.used * self._itemsize

    def resident_bytes(self) -> dict[str, int]:
        """``{adapter id: bytes of its block}`` of every resident adapter."""
        return {
            r.adapter_id: self.arena.size_of(r.offset) * self._itemsize
            for r in self._resident.values()
        }

    @property
    def free_bytes(self) -> int:
        """Bytes of the arena no adapter takes (possibly split into holes)."""
        return self.arena.free * self._itemsize

    # -- loading -------------------------------------------------------------------------

    def copy_in(self, slot: int, prepared: PreparedAdapter) -> None:
        """Put a prepared adapter in ``slot``, replacing what was there.

        Writes the adapter's block (compacting the arena first if the free room is
        split) and the slot's descriptors. Raises :class:`MemoryError` naming the
        sizes, before changing anything, when the arena cannot hold it even with the
        slot's current occupant gone.
        """
        if prepared.rank > self.max_rank:
            raise ValueError(f"rank {prepared.rank} exceeds max_rank {self.max_rank}")
        layout = self.layout_of(prepared)
        need = max(rounded(layout.size), 16)
        old = self._resident.get(slot)
        room = self.arena.free + (self.arena.size_of(old.offset) if old is not None else 0)
        if need > room:
            raise MemoryError(
                f"adapter {prepared.adapter_id!r} needs {need * self._itemsize} bytes of the"
                f" LoRA arena; {room * self._itemsize} of {self.nbytes} are free"
            )
        offset = self.arena.alloc(need)
        if offset is None and old is not None:
            self.clear(slot)  # its room is needed; the slot is empty until the write
            old = None
            offset = self.arena.alloc(need)
        if offset is None:
            self._compact()
            offset = self.arena.alloc(need)
            assert offset is not None, "a compacted arena has one hole of all its free room"
        try:
            self.memory[offset : offset + need].zero_()
            self._write(offset, layout, prepared)
        except BaseException:
            self.arena.release(offset)
            raise
        if old is not None:
            self.arena.release(old.offset)
        self._resident[slot] = _Resident(prepared.adapter_id, offset, layout)
        self._describe(slot)
        self.occupant[slot] = prepared.adapter_id

    def _write(self, offset: int, layout: ImageLayout, prepared: PreparedAdapter) -> None:
        """Copy the adapter's tensors into its block, every layer at once per module."""
        stride = layout.layer_stride
        lead = (self.num_layers,)
        r = prepared.rank
        for group, piece in layout.groups.items():
            for j, module in enumerate(GROUPS[group]):
                fan_in, out = self.shapes[module]
                if piece.dora[j] >= 0:
                    scales = prepared.dora.get(module)
                    view = self.memory.as_strided((*lead, out), (stride, 1), offset + piece.dora[j])
                    if scales is None:
                        view.fill_(1.0)  # padded: a module the adapter does not have
                    else:
                        view.copy_(scales)
                if piece.b[j] < 0 or module not in prepared.a:
                    continue
                col = piece.t_col[j]
                a = self.memory.as_strided(
                    (*lead, fan_in, r), (stride, piece.width, 1), offset + piece.a + col
                )
                a.copy_(prepared.a[module])
                b = prepared.b[module]
                if layout.panels:
                    b = torch.nn.functional.pad(b, (0, panels(out) * 16 - out))
                    b = b.view(self.num_layers, r, panels(out), 16).transpose(1, 2)
                    dest = self.memory.as_strided(
                        (*lead, panels(out), r, 16),
                        (stride, layout.rank * 16, 16, 1),
                        offset + piece.b[j],
                    )
                else:
                    dest = self.memory.as_strided(
                        (*lead, r, out), (stride, out, 1), offset + piece.b[j]
                    )
                dest.copy_(b)

    def _describe(self, slot: int) -> None:
        """Write ``slot``'s descriptors from where its block is (or ``-1`` when empty)."""
        self.desc_version += 1
        self.desc[:, :, slot] = -1
        resident = self._resident.get(slot)
        if resident is None:
            return
        layout = resident.layout
        rows = torch.arange(self.num_layers, dtype=torch.int64) * layout.layer_stride
        rows += resident.offset
        for group, piece in layout.groups.items():
            d = self.desc[:, self._group_index[group], slot]
            d[:, 0] = rows + piece.a
            d[:, 1] = piece.width
            d[:, 2] = layout.rank
            for j in range(len(GROUPS[group])):
                if piece.b[j] >= 0:
                    d[:, 3 + j] = rows + piece.b[j]
                    d[:, 3 + MAX_MODULES + j] = piece.t_col[j]
                if piece.dora[j] >= 0:
                    d[:, 3 + 2 * MAX_MODULES + j] = rows + piece.dora[j]

    def _compact(self) -> None:
        """Slide the blocks together, one at a time: each block's copy, then its books and
        descriptors, so a failure part way leaves every block where the books say."""
        slot_at = {r.offset: slot for slot, r in self._resident.items()}
        for m in self.arena.compaction():
            self._move(m.src, m.dst, m.size)
            self.arena.move(m.src, m.dst)
            slot = slot_at[m.src]
            self._resident[slot] = self._resident[slot]._replace(offset=m.dst)
            self._describe(slot)

    def _move(self, src: int, dst: int, size: int) -> None:
        """Copy ``size`` elements of the arena from ``src`` down to ``dst`` (the ranges may
        overlap). On CPU a ``memmove``, with no temporary: a clone of a whole block at each
        compaction let glibc's heap grow by its fragments (measured: +126 MiB of a server's
        RSS over 160 requests with two slots and mixed ranks)."""
        if self.memory.device.type == "cpu":
            item = self._itemsize
            base = self.memory.data_ptr()
            ctypes.memmove(base + dst * item, base + src * item, size * item)
            return
        block = self.memory[src : src + size]
        if src - dst < size:
            block = block.clone()  # the ranges overlap (a device allocator caches it)
        self.memory[dst : dst + size].copy_(block)

    def clear(self, slot: int) -> None:
        """Empty ``slot`` and give its block back to the arena."""
        resident = self._resident.pop(slot, None)
        if resident is not None:
            self.arena.release(resident.offset)
            self._describe(slot)
        self.occupant[slot] = None

    # -- reading back (tests, tools) -----------------------------------------------------

    def weights(self, slot: int, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A^T [in, r], scale * B^T [r, out])`` of ``module`` in ``slot``'s adapter at
        ``layer``, copied out of the arena (empty ``r = 0`` when it has none)."""
        fan_in, out = self.shapes[module]
        resident = self._resident.get(slot)
        piece = None if resident is None else resident.layout.groups.get(GROUP_OF[module])
        j = GROUPS[GROUP_OF[module]].index(module)
        if resident is None or piece is None or piece.b[j] < 0:
            return torch.zeros(fan_in, 0, dtype=self.dtype), torch.zeros(0, out, dtype=self.dtype)
        return self._a_view(resident, piece, layer, j), self._b_matrix(resident, piece, layer, j)

    def dora_scale(self, slot: int, layer: int, module: str) -> torch.Tensor | None:
        """The DoRA output scale of ``module`` in ``slot``'s adapter at ``layer``, if any."""
        resident = self._resident.get(slot)
        piece = None if resident is None else resident.layout.groups.get(GROUP_OF[module])
        j = GROUPS[GROUP_OF[module]].index(module)
        if resident is None or piece is None or piece.dora[j] < 0:
            return None
        at = resident.offset + layer * resident.layout.layer_stride + piece.dora[j]
        return self.memory[at : at + self.shapes[module][1]]

    def _a_view(self, res: _Resident, piece: GroupPiece, layer: int, j: int) -> torch.Tensor:
        """``A^T`` of module ``j`` of the piece's group, ``[in, r]`` (a view)."""
        at = res.offset + layer * res.layout.layer_stride + piece.a
        a = self.memory[at : at + piece.fan_in * piece.width].view(piece.fan_in, piece.width)
        return a[:, piece.t_col[j] : piece.t_col[j] + res.layout.rank]

    def _b_matrix(self, res: _Resident, piece: GroupPiece, layer: int, j: int) -> torch.Tensor:
        """``scale * B^T`` of module ``j``, ``[r, out]``: a view, or a copy out of panels."""
        out = self.shapes[GROUPS[piece.group][j]][1]
        r = res.layout.rank
        at = res.offset + layer * res.layout.layer_stride + piece.b[j]
        if not res.layout.panels:
            return self.memory[at : at + r * out].view(r, out)
        stored = self.memory[at : at + panels(out) * r * 16].view(panels(out), r, 16)
        return stored.transpose(0, 1).reshape(r, -1)[:, :out]

    # -- the forward pass ----------------------------------------------------------------

    def _bind_kernel(self) -> dict[tuple[int, str], _KernelGroup]:
        """Per layer and group, the kernel's record of what never changes: the arena, the
        descriptor rows, widths, output columns."""
        groups: dict[tuple[int, str], _KernelGroup] = {}
        for group, columns in self._columns.items():
            if len(columns) > MAX_MODULES:
                raise ValueError(f"{group}: {len(columns)} modules, the kernel takes {MAX_MODULES}")
            in_dim = self.shapes[columns[0][0]][0]
            for layer in range(self.num_layers):
                desc = self.desc[layer, self._group_index[group]]
                record = SgmvGroup(
                    self.memory.data_ptr(),
                    desc.data_ptr(),
                    in_dim,
                    len(columns),
                    len(GROUPS["qkv"]) * self.max_rank,
                )
                for j, (_, start, end) in enumerate(columns):
                    record.out[j] = end - start
                    record.y_off[j] = start
                groups[(layer, group)] = _KernelGroup(
                    record, ctypes.addressof(record), in_dim, columns[-1][2]
                )
        return groups

    def plan(self, token_slots: list[int]) -> LoraBatch:
        """The plan for one forward pass over these slots (kernel segments when it runs)."""
        kernel = self.kernel is not None or self.triton is not None
        plan = LoraBatch(token_slots, self.device, segments=kernel)
        if plan.segments is not None:
            self._threads = torch.get_num_threads()
        return plan

    def _run_kernel(
        self, layer: int, group: str, seg: _Segments, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        assert self.kernel is not None
        _, address, in_dim, width = self._kernel_groups[(layer, group)]
        # The kernel trusts its pointers: check what it will index.
        x_rows, x_cols = x.shape
        y_rows, y_cols = y.shape
        if x_cols != in_dim or y_cols != width:
            raise ValueError(f"{group}: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit")
        if x_rows < seg.rows or y_rows < seg.rows:
            raise ValueError(f"{group}: the plan indexes token {seg.rows - 1}, x has {x_rows}")
        if self._scratch.numel() < seg.tokens * self._widest_rank:
            self._scratch = torch.empty(seg.tokens * self._widest_rank, dtype=torch.float32)
            self._scratch_addr = self._scratch.data_ptr()
        ptr, slot, tok = seg.addresses
        args = (address, seg.count, ptr, slot, tok, x.data_ptr(), x.stride(0), y.data_ptr())
        if x.dtype is torch.float32:
            self.kernel.sgmv_f32(*args, y.stride(0), self._scratch_addr, self._threads)
            return
        # bf16: fp32 copies of a segment's input rows, then of its output rows.
        per_thread = KERNEL_SEGMENT_ROWS * self._widest
        if self._work.numel() < per_thread * self._threads:
            self._work = torch.empty(per_thread * self._threads, dtype=torch.float32)
        self.kernel.sgmv_bf16(
            *args,
            y.stride(0),
            self._scratch_addr,
            self._work.data_ptr(),
            per_thread,
            self._threads,
        )

    def _run(
        self, layer: int, group: str, plan: LoraBatch, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Add ``group``'s deltas into its fused output ``y`` (modules side by side)."""
        if not plan.slots:
            return
        seg = plan.segments
        if self.triton is not None and seg is not None and self.triton.run(layer, group, seg, x, y):
            return
        if (
            seg is not None
            and self.kernel is not None
            and x.dtype is y.dtype
            and x.dtype in _KERNEL_DTYPES
            and x.stride(1) == 1
            and y.stride(1) == 1
        ):
            self._run_kernel(layer, group, seg, x, y)
            return
        columns = self._columns[group]
        for slot, idx in plan.loop:
            res = self._resident.get(slot)
            piece = None if res is None else res.layout.groups.get(group)
            if res is None or piece is None:
                continue
            base = res.offset + layer * res.layout.layer_stride
            a = self.memory[base + piece.a : base + piece.a + piece.fan_in * piece.width]
            t = x[idx].to(self.dtype) @ a.view(piece.fan_in, piece.width)
            r = res.layout.rank
            for j, (_, start, end) in enumerate(columns):
                if piece.b[j] < 0:
                    continue
                b = self._b_matrix(res, piece, layer, j)
                out = t[:, piece.t_col[j] : piece.t_col[j] + r] @ b
                ys = y[:, start:end]
                if piece.dora[j] >= 0:
                    at = base + piece.dora[j]
                    scale = self.memory[at : at + end - start]
                    rows = ((ys[idx].float() + out.float()) * scale.float()).to(ys.dtype)
                    if isinstance(idx, slice):
                        ys[idx] = rows
                    else:
                        ys.index_copy_(0, idx, rows)
                elif isinstance(idx, slice):
                    ys[idx] += out.to(ys.dtype)
                else:
                    ys.index_add_(0, idx, out.to(ys.dtype))

    def apply_qkv(self, layer: int, plan: LoraBatch, x: torch.Tensor, qkv: torch.Tensor) -> None:
        """Add the q/k/v LoRA deltas into the fused projection output, in place."""
        self._run(layer, "qkv", plan, x, qkv)

    def apply_gate_up(self, layer: int, plan: LoraBatch, x: torch.Tensor, gu: torch.Tensor) -> None:
        """Add the gate/up LoRA deltas into the fused MLP input projection, in place."""
        self._run(layer, "gate_up", plan, x, gu)

    def apply(
        self, layer: int, module: str, plan: LoraBatch, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Add one single-module group's LoRA delta (``o_proj`` or ``down_proj``) into ``y``."""
        self._run(layer, GROUP_OF[module], plan, x, y)


def _triton_kernel(slots: LoraSlots) -> TritonLora | None:
    """The Triton kernel for a CUDA arena, or ``None`` (logged) when triton does not import."""
    try:
        from .triton_lora import triton_kernel
    except ImportError as exc:
        logging.getLogger(__name__).warning(
            "triton unavailable, PyTorch matmuls for LoRA on CUDA: %s", exc
        )
        return None
    return triton_kernel(slots)
